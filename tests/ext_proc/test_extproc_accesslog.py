"""Usage reaches the data-plane service through Envoy's gRPC access log, for real.

What runs: the gateway `meshgen build` generates for tests/behaviour/policy.yaml (json_to_metadata request and
response rules, ext_authz, RBAC, routes, the `envoy.access_loggers.http_grpc` logger and the
`meshgen.service.grpc` cluster), run by the real Envoy, in front of the lab's mock providers. Its ALS cluster
points at `ext_proc.accesslog.serve_grpc`, started in this process with a recording callback.

Its ext_authz cluster points at a stand-in for admission: a few lines of HTTP that allow every request for tenant
`team` and answer a reservation `res-<user>` when the body names a `user` (none otherwise). The real service's
reservations are another change; this stand-in lets the test fix which request carries which reservation, while
everything between admission's answer and the callback is the shipped path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from ext_proc.accesslog import UsageRecord, serve_grpc, usage_from_entry
from meshgen import output
from meshgen.compile import compile_gateway, render_all
from meshgen.ir.model import Gateway, Ports
from tests.support import EnvoyProcess, MockUpstream, free_ports, require_binary

POLICY = Path(__file__).parents[1] / "behaviour" / "policy.yaml"
WAIT = 5.0  # seconds; the logger flushes every 0.5 s


# ---- the access-log service in this process ------------------------------------------------------------------
class AccessLogThread:
    """``serve_grpc`` (access log only) on its own asyncio loop in a thread; records every UsageRecord it is given."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.records: list[UsageRecord] = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="als", daemon=True)

    async def _record(self, record: UsageRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def __enter__(self) -> AccessLogThread:
        self._thread.start()
        start = serve_grpc("127.0.0.1", self.port, on_usage=self._record)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(WAIT)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(WAIT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)
        self._loop.close()

    def wait_for(self, reservation: str) -> UsageRecord:
        deadline = time.monotonic() + WAIT
        with self._cond:
            while True:
                found = [r for r in self.records if r.reservation == reservation]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no usage for {reservation} within {WAIT}s; got {self.records}")
                self._cond.wait(left)


# ---- a stand-in for admission ----------------------------------------------------------------------------------
class _Authz(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        user = json.loads(body).get("user") if body else None
        self.send_response(200)
        self.send_header("x-meshgen-tenant", "team")
        if isinstance(user, str):
            self.send_header("x-meshgen-reservation", f"res-{user}")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


@contextmanager
def admission(port: int) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Authz)
    thread = threading.Thread(target=server.serve_forever, name="authz", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


# ---- the gateway ------------------------------------------------------------------------------------------------
@dataclass
class Stack:
    gw: Gateway
    envoy: EnvoyProcess
    upstream: MockUpstream
    als: AccessLogThread
    port: int

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(
                "POST",
                path,
                body=json.dumps(body).encode(),
                headers={"content-type": "application/json", "authorization": "Bearer sk-test-team"},
            )
            response = conn.getresponse()
            raw = response.read()
            is_json = response.getheader("content-type", "").startswith("application/json")
            return response.status, json.loads(raw) if is_json else raw
        finally:
            conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_binary("envoy")
    gw = compile_gateway(POLICY)
    names = [name for name, _ in gw.ports.by_name]
    gw = gw.model_copy(update={"ports": Ports(by_name=tuple(zip(names, free_ports(len(names)), strict=True)))})
    out = tmp_path_factory.mktemp("accesslog")
    output.write(out / "gen", output.serialize(render_all(gw), source=POLICY.name, version="test"))
    with ExitStack() as es:
        als = es.enter_context(AccessLogThread(gw.ports.of("service.grpc")))
        es.enter_context(admission(gw.ports.of("service")))
        endpoints = {e.name: gw.ports.of(e.name) for c in gw.clusters for e in c.endpoints}
        upstream = es.enter_context(MockUpstream(endpoints))
        envoy = es.enter_context(EnvoyProcess(out / "gen/local/envoy/us-east.yaml", gw.ports.of("admin.us-east")))
        yield Stack(gw, envoy, upstream, als, gw.ports.of("listener.us-east"))


def _chat(model: str, user: str | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return body | ({"user": user} if user else {})


def _untimed(record: UsageRecord) -> UsageRecord:
    return dataclasses.replace(record, request_id=None, start_ns=None, duration_ns=None)


# ---- through Envoy ----------------------------------------------------------------------------------------------
def test_openai_usage_reaches_the_service(stack: Stack) -> None:
    status, body = stack.post("/v1/chat/completions", _chat("retry-model", "openai"))
    assert status == 200 and isinstance(body, dict)
    record = stack.als.wait_for("res-openai")
    assert record.request_id and record.start_ns and record.duration_ns is not None  # timing, for the span
    assert _untimed(record) == UsageRecord(
        reservation="res-openai",
        tenant="team",
        request_model="retry-model",
        served_model=body["model"],
        input_tokens=body["usage"]["prompt_tokens"],
        output_tokens=body["usage"]["completion_tokens"],
        status=200,
        has_usage=True,
        attempts=1,
        served_by="retrier",  # the route's x-meshgen-served-by, logged with the response
    )
    assert (record.input_tokens, record.output_tokens) == (7, 3)


def test_anthropic_usage_reaches_the_service(stack: Stack) -> None:
    message = {"model": "claude-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    status, body = stack.post("/v1/messages", message | {"user": "anthropic"})
    assert status == 200 and isinstance(body, dict) and body["type"] == "message"
    record = stack.als.wait_for("res-anthropic")
    assert record.request_id and record.start_ns and record.duration_ns is not None  # timing, for the span
    assert _untimed(record) == UsageRecord(
        reservation="res-anthropic",
        tenant="team",
        request_model="claude-model",
        served_model=body["model"],
        input_tokens=body["usage"]["input_tokens"],
        output_tokens=body["usage"]["output_tokens"],
        status=200,
        has_usage=True,
        served_by="claude",
    )
    assert (record.input_tokens, record.output_tokens) == (7, 3)


def test_anthropic_cached_prompt_tokens_count_as_input(stack: Stack) -> None:
    usage = {"input_tokens": 5, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 100, "output_tokens": 3}
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "usage": usage}
    answer |= {"content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn"}
    message = {"model": "claude-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=15)
    headers = {"content-type": "application/json", "authorization": "Bearer sk-test-team"}
    try:
        body = json.dumps(message | {"user": "cached"}).encode()
        conn.request("POST", "/v1/messages", body=body, headers=headers | {"x-mock": f"body={json.dumps(answer)}"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    record = stack.als.wait_for("res-cached")
    assert (record.has_usage, record.input_tokens, record.output_tokens) == (True, 5 + 20 + 100, 3)


def test_a_provider_error_and_a_stream_arrive_without_usage(stack: Stack) -> None:
    # 400 is neither retried nor counted against the provider; its error JSON has no usage.
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=15)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(_chat("retry-model", "bad")).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer sk-test-team", "x-mock": "status=400"},
    )
    assert conn.getresponse().status == 400
    conn.close()
    bad = stack.als.wait_for("res-bad")
    assert (bad.status, bad.has_usage, bad.input_tokens, bad.output_tokens) == (400, False, 0, 0)
    assert bad.request_model == "retry-model" and bad.served_model is None

    # SSE is not JSON: the response rules leave it alone (the streaming path counts it).
    status, raw = stack.post("/v1/chat/completions", _chat("retry-model", "sse", stream=True))
    assert status == 200 and isinstance(raw, bytes) and raw.startswith(b"data: ")
    sse = stack.als.wait_for("res-sse")
    assert (sse.status, sse.has_usage, sse.served_model) == (200, False, None)


def test_only_reserved_requests_are_logged_and_the_reservation_stays_home(stack: Stack) -> None:
    written = "access_logs.grpc_access_log.logs_written"
    before = stack.envoy.stats().get(written, 0)
    stack.upstream.clear()
    assert stack.post("/v1/chat/completions", _chat("retry-model", None))[0] == 200  # no reservation answered
    assert stack.post("/v1/chat/completions", _chat("retry-model", "last"))[0] == 200
    stack.als.wait_for("res-last")
    # Envoy's metadata filter sent only the reserved entry.
    assert stack.envoy.stat(written) == before + 1
    # Neither the reservation nor the tenant reaches a provider.
    for request in stack.upstream.requests():
        assert not any(name.startswith("x-meshgen-") for name in request.headers), request.headers


# ---- the entry → record mapping, at its edges ---------------------------------------------------------------------
def _entry(authz: dict[str, Any], resp: dict[str, Any], code: int | None = 200) -> Any:
    from envoy.data.accesslog.v3 import accesslog_pb2
    from google.protobuf import json_format

    data: dict[str, Any] = {
        "common_properties": {
            "metadata": {"filter_metadata": {"envoy.filters.http.ext_authz": authz, "meshgen.resp": resp}}
        }
    }
    if code is not None:
        data["response"] = {"response_code": code}
    return json_format.ParseDict(data, accesslog_pb2.HTTPAccessLogEntry())


def test_entries_map_to_records() -> None:
    assert usage_from_entry(_entry({"x-meshgen-tenant": "team"}, {"prompt_tokens": 1})) is None
    assert usage_from_entry(_entry({"x-meshgen-reservation": ""}, {})) is None
    half = usage_from_entry(_entry({"x-meshgen-reservation": "r"}, {"output_tokens": 5}, code=None))
    assert half is not None
    assert (half.has_usage, half.input_tokens, half.output_tokens, half.status, half.tenant) == (True, 0, 5, 0, None)
    junk = usage_from_entry(_entry({"x-meshgen-reservation": "r"}, {"prompt_tokens": -1, "completion_tokens": "x"}))
    assert junk is not None and not junk.has_usage and (junk.input_tokens, junk.output_tokens) == (0, 0)


# ---- one message, one batch ----------------------------------------------------------------------------------------
def _stream(*batches: list[Any]) -> Any:
    from envoy.service.accesslog.v3 import als_pb2

    async def messages() -> Any:
        for entries in batches:
            message = als_pb2.StreamAccessLogsMessage()
            message.http_logs.log_entry.extend(entries)
            yield message

    return messages()


def test_a_message_is_one_batch_and_a_failed_batch_goes_record_by_record() -> None:
    from ext_proc.accesslog import AccessLogServicer

    one: list[str] = []
    batches: list[list[str]] = []

    async def on_usage(record: UsageRecord) -> None:
        if record.reservation == "bad":
            raise RuntimeError("a bad record")
        one.append(record.reservation)

    async def on_usages(records: Any) -> None:
        if any(r.reservation == "bad" for r in records):
            raise RuntimeError("a bad record in the batch")
        batches.append([r.reservation for r in records])

    def entry(reservation: str | None) -> Any:
        authz = {} if reservation is None else {"x-meshgen-reservation": reservation}
        return _entry(authz, {"prompt_tokens": 1, "completion_tokens": 2})

    servicer = AccessLogServicer(on_usage, on_usages=on_usages, logger=logging.getLogger("test-als-batch"))
    first = [entry("a"), entry(None), entry("b")]
    second = [entry("c"), entry("bad"), entry("d")]
    asyncio.run(servicer.StreamAccessLogs(_stream(first, [entry(None)], second), None))
    assert batches == [["a", "b"]]  # an entry without a reservation is skipped; a message without any is no call
    assert one == ["c", "d"]  # the failed batch again, one by one: only the bad record is lost
