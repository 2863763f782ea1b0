"""Benchmark (not a test): what meshgen's gateway costs in Envoy's data path, against Envoy alone and no proxy at all.

In one run on this machine, side by side, with bounded load:

- **upstream**: a real Envoy whose ``direct_response`` routes are the mock provider (fast, not Python-bound):
  ``POST`` answers an OpenAI ``chat.completion`` JSON with ``usage``; with the header ``x-bench-stream: 1`` it answers
  ``text/event-stream`` with 50 ``chat.completion.chunk`` events, a usage chunk and ``data: [DONE]``
  (``direct_response`` cannot look at the body, so the bench client steers with that header).
- **direct**: the client straight to the upstream.
- **envoy**: a plain Envoy (HTTP connection manager + router, no other filter, no access log) routing to the upstream.
- **gateway**: ``meshgen build`` output for ``bench/gateway_policy.yaml`` (one region, one provider whose endpoint
  port is the upstream's, set through the IR ports; one tenant whose limits never refuse; prices set, so every request
  is reserved, priced and settled) run by the real Envoy in front of the real data-plane service
  (``python -m ext_proc`` with its ``--grpc-port`` access-log service and a SQLite ``--ledger`` in a temp dir),
  the way ``tests/behaviour/conftest.py`` runs it.

The gateway's Envoy and the plain Envoy are two processes with the same ``--concurrency`` (default 2, as in
../shared/PERF-FACTS.md: each may use both cores; only the target being measured is busy at any time, so each has
the machine to itself apart from wrk and the upstream). The upstream Envoy runs with the same concurrency.

Measured, for non-streaming and streaming (``"stream": true``) requests separately:

- throughput: ``wrk -t2 -c32 -d<duration>s --latency`` with a Lua script (POST body, ``authorization``) against each
  target, after a 1 s warm-up → RPS, p50, p99, non-2xx count; ratios gateway/envoy and envoy/direct;
- CPU µs per request per process: utime + stime from ``/proc/<pid>/stat`` (all threads) before the wrk run and
  once the work trailing it is done (≥ 1 s after: the access-log batches are flushed every 0.5 s and settled after;
  then until the processes are idle, at most 6 s), divided by wrk's request count —
  the gateway's Envoy, the data-plane service, the plain Envoy, the upstream;
- the added p50 at a steady 20 req/s: a Python client on one keep-alive connection, 200 requests paced at 20/s
  per target (full response time); ``added_p50_ms_at_20rps`` = gateway p50 − envoy p50;
- streaming: time to first body byte (TTFT) over 100 sequential requests paced at 20/s per target,
  ``ttft_added_ms`` = gateway median − envoy median; the gateway's CPU per streamed request against per non-streamed
  request (from the wrk runs).

When streaming through the gateway fails (its streaming ext_proc path may be unfinished), the stream figures of the
gateway are reported as unavailable and the rest still runs. The ledger is read (read-only) after each phase to show
how the gateway settled the reservations (``exact``, ``estimated``, still ``open``).

Goals (issue 4): non-streaming ≥ 0.40× Envoy-alone throughput, ≤ 0.6 ms added p50 at 20 req/s, TTFT added ≤ 1 ms.

    .venv/bin/python bench/gateway.py                  # table
    .venv/bin/python bench/gateway.py --json           # one JSON object
    .venv/bin/python bench/gateway.py --duration 10 --concurrency 1

Needs ``wrk`` on PATH (``apt-get install wrk``) and the venv's Envoy. Every process listens on 127.0.0.1 on free
ports and is stopped on exit, also on error or Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshgen import output
from meshgen.compile import compile_gateway, render_all
from meshgen.ir.model import Gateway, Ports
from meshgen.lab.envoy import EnvoyProcess
from meshgen.lab.run import signals_interrupt
from meshgen.lab.service import ServiceProcess

POLICY = Path(__file__).with_name("gateway_policy.yaml")
API_KEY = "sk-bench"
MODEL = "gpt-4o-mini"
REGION = "us-east"
ENDPOINT_PORT = "provider.openai.us-east.ep0"
STREAM_HEADER = "x-bench-stream"
STREAM_EVENTS = 50
HOST = "127.0.0.1"
TARGETS = ("direct", "envoy", "gateway")

GOAL_RPS_RATIO = 0.40
GOAL_ADDED_P50_MS = 0.6
GOAL_TTFT_ADDED_MS = 1.0

PROMPT = {"role": "user", "content": "Say hello in one short sentence, then count to fifty."}
REQUEST = {"model": MODEL, "messages": [PROMPT], "max_tokens": 64}
STREAM_REQUEST = {**REQUEST, "stream": True}


# ---- the mock provider's answers ---------------------------------------------------------------------------------
def completion_body() -> str:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! 1, 2, 3, and so on up to 50."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 17, "completion_tokens": 50, "total_tokens": 67},
        },
        separators=(",", ":"),
    )


def sse_body() -> str:
    """50 content chunks (the last one with ``finish_reason``), the usage chunk, ``[DONE]``."""
    events: list[str] = []
    for i in range(STREAM_EVENTS):
        last = i == STREAM_EVENTS - 1
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": f" {i + 1}"} if i == 0 else {"content": f" {i + 1}"},
                    "finish_reason": "stop" if last else None,
                }
            ],
        }
        events.append(json.dumps(chunk, separators=(",", ":")))
    usage = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 17, "completion_tokens": STREAM_EVENTS, "total_tokens": 17 + STREAM_EVENTS},
    }
    events.append(json.dumps(usage, separators=(",", ":")))
    events.append("[DONE]")
    return "".join(f"data: {e}\n\n" for e in events)


# ---- Envoy configs of the upstream and of Envoy alone ------------------------------------------------------------
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        "suppress_envoy_headers": True,
    },
}
BUFFER = {
    "name": "envoy.filters.http.buffer",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 1048576,
    },
}
"""The upstream reads the whole request before its ``direct_response``: answering before the request body is in
makes Envoy close the HTTP/1.1 connection after every request (no keep-alive, a new connection each time)."""


def _hcm(stat_prefix: str, route_config: dict[str, Any], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",
            "route_config": route_config,
            "http_filters": [*filters, ROUTER],
        },
    }


def _bootstrap(admin_port: int, port: int, hcm: dict[str, Any], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": HOST, "port_value": port}},
                    "filter_chains": [{"filters": [hcm]}],
                }
            ],
            "clusters": clusters,
        },
    }


def upstream_config(admin_port: int, port: int) -> dict[str, Any]:
    def answer(name: str, content_type: str, body: str, match: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "match": match,
            "direct_response": {"status": 200, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": content_type}}],
        }

    stream_match = {"prefix": "/", "headers": [{"name": STREAM_HEADER, "string_match": {"exact": "1"}}]}
    route_config = {
        "name": "upstream",
        # The SSE body (~8 KB) is over the 4 KB default.
        "max_direct_response_body_size_bytes": 65536,
        "virtual_hosts": [
            {
                "name": "mock",
                "domains": ["*"],
                "routes": [
                    answer("stream", "text/event-stream", sse_body(), stream_match),
                    answer("completion", "application/json", completion_body(), {"prefix": "/"}),
                ],
            }
        ],
    }
    return _bootstrap(admin_port, port, _hcm("upstream", route_config, [BUFFER]), [])


def envoy_alone_config(admin_port: int, port: int, upstream_port: int) -> dict[str, Any]:
    route_config = {
        "name": "envoy",
        "virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}
        ],
    }
    cluster = {
        "name": "upstream",
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": HOST, "port_value": p}}}}]}
                for p in [upstream_port]
            ],
        },
    }
    return _bootstrap(admin_port, port, _hcm("envoy", route_config, []), [cluster])


# ---- processes ---------------------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free on 127.0.0.1 a moment ago (all bound before any is closed)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid(part: EnvoyProcess | ServiceProcess) -> int:
    proc = part._proc  # noqa: SLF001 - the lab parts do not expose their pid; the bench reads /proc with it
    if proc is None:
        raise RuntimeError(f"{part!r} is not running")
    return int(proc.pid)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far, in seconds (``/proc/<pid>/stat`` fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces; fields from the state on
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from the first line of ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Running:
    ports: dict[str, int]
    """direct / envoy / gateway → the port a client sends to."""
    pids: dict[str, int]
    """upstream / envoy / gateway_envoy / service → pid."""
    ledger: Path
    stream_ext_proc: bool
    """Whether the generated gateway Envoy config has an ext_proc filter (the streaming accounting path)."""


def with_ports(gw: Gateway, fixed: Mapping[str, int]) -> Gateway:
    names = [name for name, _ in gw.ports.by_name if name not in fixed]
    ports = dict(zip(names, free_ports(len(names)), strict=True)) | dict(fixed)
    return gw.model_copy(update={"ports": Ports(by_name=tuple(ports.items()))})


@contextlib.contextmanager
def running(tmp: Path, concurrency: int) -> Iterator[Running]:
    """Upstream, Envoy alone and the gateway (Envoy + data-plane service), all stopped on leaving."""
    with contextlib.ExitStack() as stack:
        up_admin, up_port, env_admin, env_port = free_ports(4)
        up_cfg, env_cfg = tmp / "upstream.json", tmp / "envoy-alone.json"
        up_cfg.write_text(json.dumps(upstream_config(up_admin, up_port)))
        env_cfg.write_text(json.dumps(envoy_alone_config(env_admin, env_port, up_port)))

        def envoy(config: Path, admin: int, log: str) -> EnvoyProcess:
            part = EnvoyProcess(config, admin, concurrency=concurrency, log_path=tmp / log, process_group=0)
            return stack.enter_context(part)

        upstream = envoy(up_cfg, up_admin, "upstream.log")
        alone = envoy(env_cfg, env_admin, "envoy-alone.log")

        # The gateway as tests/behaviour/conftest.py runs it: service first (its port is then fixed in the IR).
        gw = compile_gateway(POLICY)
        config = tmp / "service.json"
        config.write_text(json.dumps(next(d for d in render_all(gw) if d.path == "local/service.json").data))
        grpc_port = free_ports(1)[0]
        ledger = tmp / "ledger.sqlite"
        service = stack.enter_context(
            ServiceProcess(
                config,
                grpc_port=grpc_port,
                ledger=ledger,
                log_path=tmp / "service.log",
                process_group=0,
                timeout=20.0,
            )
        )
        gw = with_ports(gw, {"service": service.port, "service.grpc": grpc_port, ENDPOINT_PORT: up_port})
        output.write(tmp / "gen", output.serialize(render_all(gw), source=POLICY.name, version="bench"))
        gateway_cfg = tmp / "gen" / "local" / "envoy" / f"{REGION}.yaml"
        gateway = envoy(gateway_cfg, gw.ports.of(f"admin.{REGION}"), "gateway-envoy.log")
        yield Running(
            ports={"direct": up_port, "envoy": env_port, "gateway": gw.ports.of(f"listener.{REGION}")},
            pids={
                "upstream": _pid(upstream),
                "envoy": _pid(alone),
                "gateway_envoy": _pid(gateway),
                "service": _pid(service),
            },
            ledger=ledger,
            stream_ext_proc="envoy.filters.http.ext_proc" in gateway_cfg.read_text(),
        )


# ---- a keep-alive HTTP/1.1 client that notes the first body byte --------------------------------------------------
class ClientError(RuntimeError):
    pass


@dataclass
class Reply:
    status: int
    body: bytes
    total_s: float
    first_byte_s: float
    """From just before sending to the first byte of the body."""


class Connection:
    """One keep-alive connection; ``post`` times the whole exchange and the first body byte (chunked or not)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ClientError("connection closed mid-response")
        self.buf += data

    def post(self, body: bytes, headers: Mapping[str, str]) -> Reply:
        lines = [f"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-length: {len(body)}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
        request = "".join(lines).encode() + b"\r\n" + body
        self.buf = b""
        start = time.perf_counter()
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        while not self.buf:
            self._more()
        first = time.perf_counter()
        if fields.get("transfer-encoding", "").lower() == "chunked":
            out = self._chunked()
        else:
            length = int(fields.get("content-length", "0"))
            while len(self.buf) < length:
                self._more()
            out, self.buf = self.buf[:length], self.buf[length:]
        end = time.perf_counter()
        return Reply(status, out, end - start, first - start)

    def _chunked(self) -> bytes:
        out = bytearray()
        while True:
            while b"\r\n" not in self.buf:
                self._more()
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                self._more()
            out += self.buf[:size]
            self.buf = self.buf[size + 2 :]
            if size == 0:  # no trailers expected; the final CRLF was taken above
                return bytes(out)


def _headers(stream: bool) -> dict[str, str]:
    headers = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}
    if stream:
        headers[STREAM_HEADER] = "1"
    return headers


def _body(stream: bool) -> bytes:
    return json.dumps(STREAM_REQUEST if stream else REQUEST, separators=(",", ":")).encode()


def check(port: int, stream: bool) -> str | None:
    """None when one request gets what the mock provider answers; otherwise why not."""
    try:
        with Connection(port) as conn:
            reply = conn.post(_body(stream), _headers(stream))
    except (OSError, ClientError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    if reply.status != 200:
        return f"status {reply.status}: {reply.body[:300]!r}"
    if stream:
        text = reply.body.decode(errors="replace")
        events = [e for e in text.split("\n\n") if e.startswith("data: ")]
        if not text.rstrip().endswith("data: [DONE]") or len(events) < STREAM_EVENTS + 1:
            return f"stream incomplete: {len(events)} events, ends {text[-80:]!r}"
    else:
        try:
            if "usage" not in json.loads(reply.body):
                return "no usage in the answer"
        except ValueError:
            return f"not JSON: {reply.body[:200]!r}"
    return None


def paced(port: int, stream: bool, count: int, rate: float) -> dict[str, float]:
    """``count`` requests on one keep-alive connection at ``rate`` per second; medians and p90 in ms."""
    total: list[float] = []
    first: list[float] = []
    with Connection(port) as conn:
        for _ in range(3):  # warm the connection and the caches on the way
            conn.post(_body(stream), _headers(stream))
        interval = 1.0 / rate
        due = time.perf_counter()
        for _ in range(count):
            due += interval
            reply = conn.post(_body(stream), _headers(stream))
            if reply.status != 200:
                raise ClientError(f"status {reply.status} at a steady {rate}/s: {reply.body[:200]!r}")
            total.append(reply.total_s * 1e3)
            first.append(reply.first_byte_s * 1e3)
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
    deciles = statistics.quantiles(total, n=10)
    return {
        "p50_ms": statistics.median(total),
        "p90_ms": deciles[-1],
        "ttfb_p50_ms": statistics.median(first),
        "requests": count,
    }


# ---- wrk ---------------------------------------------------------------------------------------------------------
WRK_LUA = """wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = [[{body}]]
{headers}
done = function(summary, latency, requests)
  io.write(string.format("BENCH %d %d %d %d %d %d %d %.1f %.1f\\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_script(tmp: Path, stream: bool) -> Path:
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in _headers(stream).items())
    path = tmp / ("stream.lua" if stream else "completion.lua")
    path.write_text(WRK_LUA.format(body=_body(stream).decode(), headers=headers))
    return path


@dataclass
class Load:
    requests: int
    seconds: float
    errors: int
    """Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers."""
    p50_ms: float
    p99_ms: float
    machine_busy: float = float("nan")
    """Share of all the machine's CPU time that was busy during the run (wrk included)."""
    cpu_us: dict[str, float] = field(default_factory=dict)
    """Process → CPU µs per request during the run (and 1 s after, for work that trails it)."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(port: int, script: Path, *, duration: float, threads: int, connections: int) -> Load:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        f"http://{HOST}:{port}/v1/chat/completions",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]}{done.stderr[-1000:]}")
    n, micros, connect, read, write, status, timeout, p50, p99 = line.split()[1:]
    errors = int(connect) + int(read) + int(write) + int(status) + int(timeout)
    return Load(int(n), int(micros) / 1e6, errors, float(p50) / 1e3, float(p99) / 1e3)


PROCESSES = {
    "direct": ("upstream",),
    "envoy": ("envoy", "upstream"),
    "gateway": ("gateway_envoy", "service", "upstream"),
}


def settled_cpu(run: Running, names: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds of ``names`` once the work trailing a run is done: the access-log batches (flushed every 0.5 s)
    and their settlement belong to it. At least 1 s after the run, then until no process used more than 10 ms in the
    last 0.5 s (at most 6 s)."""
    time.sleep(0.5)
    last = {name: cpu_seconds(run.pids[name]) for name in names}
    deadline = time.monotonic() + 5.5
    while True:
        time.sleep(0.5)
        now = {name: cpu_seconds(run.pids[name]) for name in names}
        quiet = all(now[name] - last[name] <= 0.010 for name in names)
        last = now
        if quiet or time.monotonic() >= deadline:
            return now


def measure(run: Running, target: str, script: Path, args: argparse.Namespace) -> Load:
    port = run.ports[target]
    wrk(port, script, duration=1, threads=args.threads, connections=args.connections)  # warm-up, not measured
    time.sleep(1.0)
    names = PROCESSES[target]
    before = {name: cpu_seconds(run.pids[name]) for name in names}
    busy_before = machine_ticks()
    load = wrk(port, script, duration=args.duration, threads=args.threads, connections=args.connections)
    busy_after = machine_ticks()
    spent = busy_after[1] - busy_before[1]
    load.machine_busy = (busy_after[0] - busy_before[0]) / spent if spent else float("nan")
    after = settled_cpu(run, names)
    for name in names:
        used = after[name] - before[name]
        load.cpu_us[name] = used * 1e6 / load.requests if load.requests else float("nan")
    return load


def ledger_states(path: Path) -> dict[str, int]:
    """Reservations by state (read-only; {} when the ledger cannot be read)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute("SELECT state, count(*) FROM reservations GROUP BY state").fetchall()
    except sqlite3.Error:
        return {}
    return {str(state): int(n) for state, n in rows}


def _delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}


# ---- the run -----------------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "settings": {
            "duration_s": args.duration,
            "wrk": f"-t{args.threads} -c{args.connections}",
            "envoy_concurrency": args.concurrency,
            "paced_rate": args.rate,
            "paced_requests": args.paced,
            "ttft_requests": args.ttft,
            "stream_events": STREAM_EVENTS,
        },
    }
    with running(tmp, args.concurrency) as run:
        result["stream_ext_proc_in_config"] = run.stream_ext_proc
        for target in TARGETS:
            problem = check(run.ports[target], stream=False)
            if problem is not None:
                raise RuntimeError(f"{target}: a non-streaming request fails: {problem}")
        stream_problem = check(run.ports["gateway"], stream=True)
        for target in ("direct", "envoy"):
            problem = check(run.ports[target], stream=True)
            if problem is not None:
                raise RuntimeError(f"{target}: a streaming request fails: {problem}")
        result["stream_gateway"] = "ok" if stream_problem is None else f"unavailable: {stream_problem}"

        for mode, stream in (("completion", False), ("stream", True)):
            script = wrk_script(tmp, stream)
            loads: dict[str, Load] = {}
            ledger_before = ledger_states(run.ledger)
            for target in TARGETS:
                if target == "gateway" and stream and stream_problem is not None:
                    continue
                try:
                    loads[target] = measure(run, target, script, args)
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    if not (target == "gateway" and stream):
                        raise
                    result["stream_gateway"] = f"unavailable: {error}"
            time.sleep(1.0)
            result[mode] = {
                "load": {
                    t: {
                        "rps": round(x.rps, 1),
                        "p50_ms": round(x.p50_ms, 3),
                        "p99_ms": round(x.p99_ms, 3),
                        "requests": x.requests,
                        "errors": x.errors,
                        "machine_busy": round(x.machine_busy, 3),
                        "cpu_us_per_request": {k: round(v, 1) for k, v in x.cpu_us.items()},
                    }
                    for t, x in loads.items()
                },
                "ledger_reservations": _delta(ledger_states(run.ledger), ledger_before),
            }
            gateway = loads.get("gateway")
            envoy = loads["envoy"]
            result[mode]["rps_ratio_vs_envoy"] = _ratio(gateway.rps if gateway else None, envoy.rps)
            result[mode]["rps_ratio_envoy_vs_direct"] = _ratio(envoy.rps, loads["direct"].rps)
            result[mode]["gateway_cpu_us_per_request"] = (
                gateway.cpu_us["gateway_envoy"] + gateway.cpu_us["service"] if gateway else None
            )

        latency: dict[str, dict[str, float]] = {}
        for target in TARGETS:
            latency[target] = paced(run.ports[target], False, args.paced, args.rate)
        result["paced_completion"] = latency

        ttft: dict[str, dict[str, float]] = {}
        for target in TARGETS:
            if target == "gateway" and not result["stream_gateway"].startswith("ok"):
                continue
            try:
                ttft[target] = paced(run.ports[target], True, args.ttft, args.rate)
            except (OSError, ClientError, ValueError) as error:
                if target != "gateway":
                    raise
                result["stream_gateway"] = f"unavailable: {error}"
        result["paced_stream"] = ttft

    comp, strm = result["completion"], result["stream"]
    result["rps_ratio_vs_envoy"] = comp["rps_ratio_vs_envoy"]
    result["rps_ratio_envoy_vs_direct"] = comp["rps_ratio_envoy_vs_direct"]
    result["stream_rps_ratio_vs_envoy"] = strm["rps_ratio_vs_envoy"]
    result["added_p50_ms_at_20rps"] = latency["gateway"]["p50_ms"] - latency["envoy"]["p50_ms"]
    result["ttft_ms"] = {t: v["ttfb_p50_ms"] for t, v in ttft.items()}
    result["ttft_added_ms"] = (
        ttft["gateway"]["ttfb_p50_ms"] - ttft["envoy"]["ttfb_p50_ms"] if "gateway" in ttft else None
    )
    result["completion_cpu_us_per_request"] = comp["gateway_cpu_us_per_request"]
    result["stream_cpu_us_per_request"] = strm["gateway_cpu_us_per_request"]
    result["stream_cpu_vs_completion"] = _ratio(strm["gateway_cpu_us_per_request"], comp["gateway_cpu_us_per_request"])
    for key in (
        "rps_ratio_vs_envoy",
        "rps_ratio_envoy_vs_direct",
        "stream_rps_ratio_vs_envoy",
        "stream_cpu_vs_completion",
    ):
        result[key] = None if result[key] is None else round(result[key], 3)
    for key in ("added_p50_ms_at_20rps", "ttft_added_ms", "completion_cpu_us_per_request", "stream_cpu_us_per_request"):
        result[key] = None if result[key] is None else round(result[key], 3)
    result["goals"] = {
        "rps_ratio_vs_envoy >= 0.40": result["rps_ratio_vs_envoy"] >= GOAL_RPS_RATIO,
        "added_p50_ms_at_20rps <= 0.6": result["added_p50_ms_at_20rps"] <= GOAL_ADDED_P50_MS,
        "ttft_added_ms <= 1.0": None
        if result["ttft_added_ms"] is None
        else result["ttft_added_ms"] <= GOAL_TTFT_ADDED_MS,
    }
    return result


# ---- the table ---------------------------------------------------------------------------------------------------
def _f(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(r: dict[str, Any]) -> str:
    s = r["settings"]
    out = [
        f"meshgen gateway bench — {r['machine']['cpus']} CPUs, wrk {s['wrk']} {s['duration_s']}s per target, "
        f"Envoy --concurrency {s['envoy_concurrency']} (gateway and Envoy alone: one process each)",
        f"streaming through the gateway: {r['stream_gateway']} "
        f"(ext_proc in the gateway config: {'yes' if r['stream_ext_proc_in_config'] else 'no'})",
        "",
    ]
    cpu_cols = ("gateway_envoy", "service", "envoy", "upstream")
    for mode, title in (("completion", "non-streaming (JSON)"), ("stream", f"streaming ({STREAM_EVENTS}-chunk SSE)")):
        m = r[mode]
        out.append(f"{title}; CPU µs per request by process; busy: share of both cores in use during the run")
        header = f"  {'target':<8} {'RPS':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'busy':>5} | "
        out.append(header + " ".join(f"{c:>13}" for c in cpu_cols))
        for target in TARGETS:
            x = m["load"].get(target)
            if x is None:
                out.append(f"  {target:<8} {'unavailable':>8}")
                continue
            used = x["cpu_us_per_request"]
            cpu = " ".join(f"{_f(used[c], '.0f') if c in used else '':>13}" for c in cpu_cols)
            out.append(
                f"  {target:<8} {x['rps']:>8.0f} {x['p50_ms']:>7.2f} {x['p99_ms']:>7.2f} {x['errors']:>6} "
                f"{x['machine_busy']:>5.0%} | {cpu}"
            )
        out.append(
            f"  gateway/envoy RPS {_f(m['rps_ratio_vs_envoy'])}×, envoy/direct {_f(m['rps_ratio_envoy_vs_direct'])}×; "
            f"gateway CPU (Envoy + service) {_f(m['gateway_cpu_us_per_request'], '.0f')} µs/request; "
            f"ledger reservations {m['ledger_reservations'] or '{}'}"
        )
        out.append("")
    pc, ps = r["paced_completion"], r["paced_stream"]
    out.append(
        f"steady {s['paced_rate']:g} req/s on one keep-alive connection ({s['paced_requests']} non-streaming, "
        f"{s['ttft_requests']} streaming requests per target)"
    )
    out.append(f"  {'target':<8} {'p50 ms':>8} {'p90 ms':>8}   {'stream TTFT p50':>15} {'stream p50':>10}")
    for target in TARGETS:
        st = ps.get(target)
        out.append(
            f"  {target:<8} {pc[target]['p50_ms']:>8.3f} {pc[target]['p90_ms']:>8.3f}   "
            f"{_f(st['ttfb_p50_ms'] if st else None, '.3f'):>15} {_f(st['p50_ms'] if st else None, '.3f'):>10}"
        )
    out.append("")
    g = r["goals"]
    out.append(
        f"gateway / Envoy alone RPS (non-streaming): {_f(r['rps_ratio_vs_envoy'])}×   "
        f"goal ≥ {GOAL_RPS_RATIO}: {g['rps_ratio_vs_envoy >= 0.40']}"
    )
    out.append(
        f"added p50 at {s['paced_rate']:g} req/s: {_f(r['added_p50_ms_at_20rps'], '+.3f')} ms   "
        f"goal ≤ {GOAL_ADDED_P50_MS}: {g['added_p50_ms_at_20rps <= 0.6']}"
    )
    out.append(
        f"TTFT added by the gateway: {_f(r['ttft_added_ms'], '+.3f')} ms   "
        f"goal ≤ {GOAL_TTFT_ADDED_MS}: {g['ttft_added_ms <= 1.0']}"
    )
    out.append(
        f"gateway CPU per streamed request {_f(r['stream_cpu_us_per_request'], '.0f')} µs vs per non-streamed "
        f"{_f(r['completion_cpu_us_per_request'], '.0f')} µs ({_f(r['stream_cpu_vs_completion'])}×)"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk load per target (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads of each Envoy (default 2)")
    parser.add_argument("--rate", type=float, default=20.0, help="steady request rate of the latency runs (default 20)")
    parser.add_argument("--paced", type=int, default=200, help="non-streaming requests at the steady rate (200)")
    parser.add_argument("--ttft", type=int, default=100, help="streaming requests for TTFT per target (default 100)")
    parser.add_argument("--keep", type=Path, default=None, help="keep configs, logs and the ledger in this directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 120 or not 1 <= args.connections <= 1024 or not 1 <= args.paced <= 5000:
        parser.error("--duration 1..120, --connections 1..1024, --paced 1..5000")
    if not 1 <= args.ttft <= 5000 or not 0.1 <= args.rate <= 1000:
        parser.error("--ttft 1..5000, --rate 0.1..1000")
    if shutil.which("wrk") is None:
        print("wrk not found on PATH: apt-get install wrk", file=sys.stderr)
        return 2
    with signals_interrupt(), contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshgen-bench-")))
        try:
            result = bench(args, tmp)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            print(f"bench/gateway.py: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=None if args.json else 2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
