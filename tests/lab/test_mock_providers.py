"""The mock providers as users and the lab run them: ``python -m meshgen.lab.providers`` as a real process on free
ports, driven over HTTP — every protocol, every fault (per request and global), the admin API and its client,
the opt-in auth and schema checks. The same faults through the real Envoy: tests/behaviour/test_mock_faults.py."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshgen.lab import mock_header
from meshgen.lab.mock_header import KEYS
from meshgen.lab.providers import (
    Behaviour,
    Fault,
    MockAdmin,
    MockAdminError,
    MockHeaderError,
    MockProviders,
    parse_mock_header,
)
from tests.support import free_ports

START_TIMEOUT = 15.0


@dataclass
class MockProcess:
    proc: subprocess.Popen[str]
    labels: dict[str, int]
    admin_port: int
    ready_line: str

    @property
    def admin(self) -> MockAdmin:
        return MockAdmin(f"http://127.0.0.1:{self.admin_port}")

    def port(self, label: str) -> int:
        return self.labels[label]


@contextmanager
def mock_process(labels: Mapping[str, int], admin_port: int, *extra: str, quiet: bool = True) -> Iterator[MockProcess]:
    """``python -m meshgen.lab.providers`` as a child process; ready when it printed its ready line. ``quiet``
    unless the test reads its access log (a pipe nobody reads would fill up)."""
    argv = [sys.executable, "-m", "meshgen.lab.providers", "--admin-port", str(admin_port), *extra]
    argv += ["--quiet"] if quiet else []
    for label, port in labels.items():
        argv += ["--listen", f"{label}={port}"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the process prints it or exits (closing stdout)
        if not line.startswith("mock providers ready"):
            proc.kill()
            _, err = proc.communicate(timeout=START_TIMEOUT)
            raise RuntimeError(f"mock providers did not start: {line!r} {err}")
        yield MockProcess(proc, dict(labels), admin_port, line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(START_TIMEOUT)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@dataclass
class Timed:
    """One response as it arrived: status, headers, the body's pieces with their arrival times, how it ended."""

    status: int
    headers: dict[str, str]
    t_headers: float
    pieces: list[tuple[float, bytes]] = field(default_factory=list)
    error: BaseException | None = None
    """What ended the body early (a reset, an incomplete chunked body, a read timeout), None when it was whole."""

    @property
    def body(self) -> bytes:
        return b"".join(p for _, p in self.pieces)

    @property
    def t_first(self) -> float:
        return self.pieces[0][0]

    def json(self) -> Any:
        return json.loads(self.body)

    def sse(self) -> list[str]:
        """The SSE events' ``data:`` payloads, in order."""
        return [
            line[len("data: ") :]
            for event in self.body.decode().split("\n\n")
            for line in event.split("\n")
            if line.startswith("data: ")
        ]

    def sse_json(self) -> list[Any]:
        return [json.loads(d) for d in self.sse() if d != "[DONE]"]

    def sse_names(self) -> list[str]:
        return [line[len("event: ") :] for line in self.body.decode().split("\n") if line.startswith("event: ")]

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.decode().splitlines() if line]


def call(
    port: int,
    path: str = "/v1/chat/completions",
    body: Mapping[str, Any] | bytes | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    method: str | None = None,
    timeout: float = 5.0,
) -> Timed:
    """One request on a fresh connection; the body read piece by piece as it arrives, each piece timed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    t0 = time.monotonic()
    try:
        conn.request(method or ("GET" if payload is None else "POST"), path, body=payload, headers=dict(headers or {}))
        resp = conn.getresponse()
        out = Timed(resp.status, {k.lower(): v for k, v in resp.getheaders()}, time.monotonic() - t0)
        try:
            while piece := resp.read1(65536):
                out.pieces.append((time.monotonic() - t0, piece))
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
            out.error = e
        return out
    finally:
        conn.close()


def chat(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def anthropic(model: str = "claude-sonnet", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **extra}


def gaps(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


# ---- the process ----------------------------------------------------------------------------------------------
OPENAI = "provider.openai.us-east.ep0"
ANTHROPIC = "provider.anthropic.us-east.ep0"
OLLAMA = "provider.ollama.us-east.ep0"
STRICT = "provider.strict.us-east.ep0"
KEYED = "provider.keyed.us-east.ep0"
LABELS = (OPENAI, ANTHROPIC, OLLAMA, STRICT, KEYED)


@pytest.fixture(scope="module")
def mocks() -> Iterator[MockProcess]:
    *ports, admin = free_ports(len(LABELS) + 1)
    extra = ("--require-auth", "provider.strict.*", "--strict-schema", "provider.strict.*")
    with mock_process(dict(zip(LABELS, ports, strict=True)), admin, *extra, "--require-auth", f"{KEYED}=sk-right") as m:
        yield m


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "mocks" in request.fixturenames:
        m: MockProcess = request.getfixturevalue("mocks")
        m.admin.clear_faults()
        m.admin.clear_requests()


def test_health_on_every_port_and_the_admin_port(mocks: MockProcess) -> None:
    assert mocks.ready_line.startswith(f"mock providers ready: {OPENAI}={mocks.port(OPENAI)}")
    for port in [*mocks.labels.values(), mocks.admin_port]:
        reply = call(port, "/healthz")
        assert (reply.status, reply.body) == (200, b"ok\n")
    assert mocks.admin.labels() == mocks.labels
    assert mocks.admin.count() == 0  # health checks are not recorded


def test_sigterm_exits_cleanly_and_frees_the_ports() -> None:
    port, admin = free_ports(2)
    with mock_process({OPENAI: port}, admin, quiet=False) as m:
        assert call(port, body=chat(), headers={"x-mock": "status=503"}).status == 503
        assert m.proc.stdout is not None
        assert m.proc.stdout.readline().startswith(f"{OPENAI} POST /v1/chat/completions 503 ")  # the access log
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(10) == 0
    for p in (port, admin):
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free again


def test_a_port_in_use_exits_1_and_a_bad_command_line_2() -> None:
    port, admin = free_ports(2)
    argv = [sys.executable, "-m", "meshgen.lab.providers", "--admin-port", str(admin)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run([*argv, "--listen", f"{OPENAI}={port}"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "could not listen" in done.stderr
    done = subprocess.run([*argv, "--listen", "no-port"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "LABEL=PORT" in done.stderr


# ---- protocols ------------------------------------------------------------------------------------------------
def test_openai_chat_completion(mocks: MockProcess) -> None:
    reply = call(mocks.port(OPENAI), body=chat("gpt-4o"))
    assert (reply.status, reply.headers["x-served-by"], reply.headers["content-type"]) == (
        200,
        OPENAI,
        "application/json",
    )
    assert reply.json() == {
        "id": "chatcmpl-mock-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"mock reply from {OPENAI}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


@pytest.mark.parametrize("include_usage", [True, False], ids=["include-usage", "no-usage"])
def test_openai_stream(mocks: MockProcess, include_usage: bool) -> None:
    body = chat(stream=True, stream_options={"include_usage": include_usage})
    reply = call(mocks.port(OPENAI), body=body)
    assert (reply.status, reply.headers["content-type"], reply.sse()[-1]) == (200, "text/event-stream", "[DONE]")
    chunks = reply.sse_json()
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == f"mock reply from {OPENAI} "
    usage = [c["usage"] for c in chunks if "usage" in c]
    assert usage == ([{"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}] if include_usage else [])


def test_openai_models(mocks: MockProcess) -> None:
    listed = call(mocks.port(OPENAI), "/v1/models").json()
    assert (
        listed["object"] == "list"
        and {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "mock"} in (listed["data"])
    )
    anthropic_shape = call(mocks.port(ANTHROPIC), "/v1/models", headers={"anthropic-version": "2023-06-01"}).json()
    assert anthropic_shape["has_more"] is False and anthropic_shape["data"][0]["type"] == "model"


def test_anthropic_message_and_stream(mocks: MockProcess) -> None:
    reply = call(mocks.port(ANTHROPIC), "/v1/messages", anthropic())
    message = reply.json()
    assert (message["type"], message["content"], message["usage"]) == (
        "message",
        [{"type": "text", "text": f"mock reply from {ANTHROPIC}"}],
        {"input_tokens": 7, "output_tokens": 3},
    )
    stream = call(mocks.port(ANTHROPIC), "/v1/messages", anthropic(stream=True))
    names = stream.sse_names()
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    events = stream.sse_json()
    assert events[0]["message"]["usage"] == {"input_tokens": 7, "output_tokens": 1}
    assert events[-2]["usage"] == {"output_tokens": 3}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == f"mock reply from {ANTHROPIC} "


def test_ollama_chat_streams_ndjson_by_default(mocks: MockProcess) -> None:
    reply = call(mocks.port(OLLAMA), "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.headers["content-type"] == "application/x-ndjson"
    lines = reply.ndjson()
    assert all(line["done"] is False for line in lines[:-1])
    assert "".join(line["message"]["content"] for line in lines) == f"mock reply from {OLLAMA} "
    last = lines[-1]
    assert (last["done"], last["done_reason"], last["prompt_eval_count"], last["eval_count"]) == (True, "stop", 7, 3)
    assert {"total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "created_at"} <= set(last)


def test_ollama_chat_not_streaming_and_its_openai_route(mocks: MockProcess) -> None:
    whole = call(mocks.port(OLLAMA), "/api/chat", {"model": "llama3", "stream": False}).json()
    assert (whole["message"], whole["done"], whole["prompt_eval_count"], whole["eval_count"]) == (
        {"role": "assistant", "content": f"mock reply from {OLLAMA}"},
        True,
        7,
        3,
    )
    openai_route = call(mocks.port(OLLAMA), "/v1/chat/completions", chat("llama3")).json()
    assert (openai_route["model"], openai_route["usage"]["total_tokens"]) == ("llama3", 10)
    assert call(mocks.port(OLLAMA), "/api/tags").json()["models"][0]["name"].endswith(":latest")


@pytest.mark.parametrize(
    ("path", "body", "usage"),
    [
        ("/v1/chat/completions", chat(), lambda r: r.json()["usage"]),
        ("/v1/messages", anthropic(), lambda r: r.json()["usage"]),
        ("/api/chat", {"model": "llama3", "stream": False}, lambda r: r.json()),
    ],
    ids=["openai", "anthropic", "ollama"],
)
def test_usage_and_words_are_steerable(mocks: MockProcess, path: str, body: dict[str, Any], usage: Any) -> None:
    reply = call(mocks.port(OPENAI), path, body, {"x-mock": "prompt_tokens=120;completion_tokens=45;words=4"})
    got = usage(reply)
    assert got.get("prompt_tokens", got.get("input_tokens", got.get("prompt_eval_count"))) == 120
    assert got.get("completion_tokens", got.get("output_tokens", got.get("eval_count"))) == 45
    assert b"w0 w1 w2 w3" in reply.body


# ---- faults, per request --------------------------------------------------------------------------------------
def test_delay(mocks: MockProcess) -> None:
    reply = call(mocks.port(OPENAI), body=chat(), headers={"x-mock": "delay_ms=300"})
    assert reply.status == 200 and reply.t_headers >= 0.3


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", chat(stream=True)), ("/v1/messages", anthropic(stream=True)), ("/api/chat", chat())],
    ids=["openai", "anthropic", "ollama"],
)
def test_slow_first_token_sends_the_headers_at_once(mocks: MockProcess, path: str, body: dict[str, Any]) -> None:
    reply = call(mocks.port(OPENAI), path, body, {"x-mock": "ttft_ms=800"})
    assert reply.status == 200 and reply.error is None
    assert reply.t_headers < 0.6 and reply.t_first >= 0.8
    assert reply.headers["transfer-encoding"] == "chunked"


def test_slow_first_token_of_a_json_answer_delays_it_all(mocks: MockProcess) -> None:
    reply = call(mocks.port(OPENAI), body=chat(), headers={"x-mock": "ttft_ms=300"})
    assert reply.status == 200 and reply.t_headers >= 0.3 and reply.json()["usage"]["total_tokens"] == 10


def test_event_delay_spaces_the_events(mocks: MockProcess) -> None:
    reply = call(mocks.port(OPENAI), body=chat(stream=True), headers={"x-mock": "event_delay_ms=80;words=3"})
    assert reply.sse()[-1] == "[DONE]"
    assert len(reply.pieces) >= 5 and min(gaps([t for t, _ in reply.pieces])) >= 0.07


@pytest.mark.parametrize(
    ("mock", "status", "retry_after"),
    [
        ("status=500", 500, None),
        ("status=503", 503, None),
        ("status=429", 429, None),
        ("status=429;retry_after=2", 429, "2"),
    ],
    ids=["500", "503", "429", "429-retry-after"],
)
def test_error_statuses_in_the_providers_shapes(
    mocks: MockProcess, mock: str, status: int, retry_after: str | None
) -> None:
    openai = call(mocks.port(OPENAI), body=chat(), headers={"x-mock": mock})
    assert (openai.status, openai.headers.get("retry-after")) == (status, retry_after)
    error = openai.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (
        ("rate_limit_error", "rate_limit_exceeded") if status == 429 else ("server_error", None)
    )
    claude = call(mocks.port(ANTHROPIC), "/v1/messages", anthropic(), {"x-mock": mock}).json()
    assert (claude["type"], claude["error"]["type"]) == ("error", "rate_limit_error" if status == 429 else "api_error")
    ollama = call(mocks.port(OLLAMA), "/api/chat", chat(), {"x-mock": mock})
    assert ollama.status == status and set(ollama.json()) == {"error"}


def test_reset_and_drop(mocks: MockProcess) -> None:
    for mock, expected in [("reset=1", ConnectionResetError), ("drop=1", http.client.RemoteDisconnected)]:
        with pytest.raises(expected):
            call(mocks.port(OPENAI), body=chat(), headers={"x-mock": mock})
    assert mocks.admin.count(OPENAI) == 2  # both recorded


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", chat(stream=True)), ("/v1/messages", anthropic(stream=True)), ("/api/chat", chat())],
    ids=["openai", "anthropic", "ollama"],
)
def test_stream_cut_midway(mocks: MockProcess, path: str, body: dict[str, Any]) -> None:
    reply = call(mocks.port(OPENAI), path, body, {"x-mock": "cut_after=2"})
    assert reply.status == 200
    assert isinstance(reply.error, ConnectionResetError | http.client.IncompleteRead)
    sep = b"\n" if path == "/api/chat" else b"\n\n"
    assert reply.body.count(sep) == 2 and reply.body.endswith(sep)  # two whole events, then the reset


def test_stream_stall_forever_and_for_a_while(mocks: MockProcess) -> None:
    stalled = call(mocks.port(OPENAI), body=chat(stream=True), headers={"x-mock": "stall_after=2"}, timeout=0.6)
    assert stalled.status == 200 and isinstance(stalled.error, TimeoutError)
    assert len(stalled.sse()) == 2  # then nothing, the connection still open
    paused = call(mocks.port(OPENAI), body=chat(stream=True), headers={"x-mock": "stall_after=2;stall_ms=400"})
    assert paused.error is None and paused.sse()[-1] == "[DONE]"
    assert max(gaps([t for t, _ in paused.pieces])) >= 0.4


@pytest.mark.parametrize(
    ("path", "body", "parse"),
    [
        ("/v1/chat/completions", chat(stream=True), lambda r: r.sse()),
        ("/v1/messages", anthropic(stream=True), lambda r: r.sse()),
        ("/api/chat", chat(), lambda r: r.body.decode().splitlines()),
    ],
    ids=["openai", "anthropic", "ollama"],
)
def test_malformed_event(mocks: MockProcess, path: str, body: dict[str, Any], parse: Any) -> None:
    whole: list[str] = parse(call(mocks.port(OPENAI), path, body))
    bad: list[str] = parse(call(mocks.port(OPENAI), path, body, {"x-mock": "malformed_after=1"}))
    assert len(bad) == len(whole) + 1
    for i, event in enumerate(bad):
        if i == 1:
            with pytest.raises(ValueError):
                json.loads(event)
        elif event != "[DONE]":
            json.loads(event)


@pytest.mark.parametrize(
    ("path", "body", "last"),
    [
        ("/v1/chat/completions", chat(stream=True), lambda r: r.sse()[-1] == "[DONE]"),
        ("/v1/messages", anthropic(stream=True), lambda r: r.sse_names()[-1] == "message_stop"),
        ("/api/chat", chat(), lambda r: r.ndjson()[-1]["done"] is True),
    ],
    ids=["openai", "anthropic", "ollama"],
)
def test_missing_done(mocks: MockProcess, path: str, body: dict[str, Any], last: Any) -> None:
    assert last(call(mocks.port(OPENAI), path, body))
    reply = call(mocks.port(OPENAI), path, body, {"x-mock": "no_done=1"})
    assert reply.status == 200 and reply.error is None and not last(reply)


def test_context_length_exceeded_in_each_providers_words(mocks: MockProcess) -> None:
    openai = call(mocks.port(OPENAI), body=chat(), headers={"x-mock": "context_exceeded=1"})
    assert openai.status == 400
    error = openai.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    assert error["message"].startswith("This model's maximum context length is")
    claude = call(mocks.port(ANTHROPIC), "/v1/messages", anthropic(), {"x-mock": "context_exceeded=1"})
    assert claude.status == 400
    assert claude.json()["error"]["type"] == "invalid_request_error"
    assert claude.json()["error"]["message"].startswith("prompt is too long")
    ollama = call(mocks.port(OLLAMA), "/api/chat", chat(), {"x-mock": "context_exceeded=1"})
    assert ollama.status == 400 and "context length" in ollama.json()["error"]


def test_byte_chunks_and_a_byte_cut(mocks: MockProcess) -> None:
    reply = call(
        mocks.port(OPENAI), body=chat(stream=True), headers={"x-mock": "chunk_bytes=40;chunk_delay_ms=5;cut=100"}
    )
    assert reply.status == 200 and len(reply.body) == 100 < int(reply.headers["content-length"])


def test_a_typo_answers_400_loudly(mocks: MockProcess) -> None:
    reply = call(mocks.port(OPENAI), body=chat(), headers={"x-mock": "stal_after=2"})
    assert reply.status == 400 and "unknown key 'stal_after'" in reply.headers["x-mock-error"]


# ---- global faults and records through the admin API ----------------------------------------------------------
def test_global_fault_by_glob_and_the_header_wins(mocks: MockProcess) -> None:
    admin = mocks.admin
    assert admin.fault("provider.openai.*", "status=500;retry_after=1") == [
        Fault("provider.openai.*", "status=500;retry_after=1")
    ]
    assert call(mocks.port(OPENAI), body=chat()).status == 500
    assert call(mocks.port(ANTHROPIC), body=chat()).status == 200
    assert call(mocks.port(OPENAI), body=chat(), headers={"x-mock": "status=200"}).headers.get("retry-after") == "1"
    assert call(mocks.port(OPENAI), body=chat(), headers={"x-mock": "status=200;retry_after=off"}).status == 200
    unfaulted = call(mocks.port(OPENAI), body=chat(), headers={"x-mock": "global=off"})
    assert unfaulted.status == 200 and "retry-after" not in unfaulted.headers
    admin.fault("provider.anthropic.*", "reset=1")
    assert [f.scope for f in admin.faults()] == ["provider.openai.*", "provider.anthropic.*"]
    assert admin.clear_faults("provider.openai.*") == [Fault("provider.anthropic.*", "reset=1")]
    assert call(mocks.port(OPENAI), body=chat()).status == 200
    with pytest.raises(ConnectionResetError):
        call(mocks.port(ANTHROPIC), body=chat())
    assert admin.clear_faults() == []
    assert call(mocks.port(ANTHROPIC), body=chat()).status == 200


def test_bad_fault_is_refused(mocks: MockProcess) -> None:
    with pytest.raises(MockAdminError, match="400 x-mock: unknown key 'stauts'"):
        mocks.admin.fault("*", "stauts=500")
    status = call(mocks.admin_port, "/faults", {"scope": "*"})
    assert status.status == 400
    assert call(mocks.admin_port, "/nothing").status == 404
    assert mocks.admin.faults() == []


def test_recorded_requests(mocks: MockProcess) -> None:
    admin = mocks.admin
    big = chat(user="x" * 5000)
    call(mocks.port(OPENAI), body=big, headers={"x-test": "one"})
    call(mocks.port(ANTHROPIC), "/v1/messages", anthropic())
    call(mocks.port(OLLAMA), "/api/chat", chat())
    assert admin.counts() == {OPENAI: 1, ANTHROPIC: 1, OLLAMA: 1, STRICT: 0, KEYED: 0}
    (first,) = admin.requests("provider.openai.*")
    assert (first.label, first.method, first.path, first.headers["x-test"], first.json()) == (
        OPENAI,
        "POST",
        "/v1/chat/completions",
        "one",
        big,
    )
    cut = admin.requests(OPENAI, max_body=10)[0]
    assert cut.body == json.dumps(big).encode()[:10]
    later = admin.requests(since=first.seq)
    assert [r.label for r in later] == [ANTHROPIC, OLLAMA]
    assert [r.label for r in admin.wait_for("provider.*", 3, timeout=1)] == [OPENAI, ANTHROPIC, OLLAMA]
    assert admin.clear_requests() == 3 and admin.count() == 0
    with pytest.raises(TimeoutError, match="only 0"):
        admin.wait_for(OPENAI, 1, timeout=0.2)


def test_a_fault_on_a_share_of_the_requests(mocks: MockProcess) -> None:
    assert mocks.admin.fault(OPENAI, "status=500", percent=25) == [Fault(OPENAI, "status=500", 25)]
    statuses = [call(mocks.port(OPENAI), body=chat()).status for _ in range(8)]
    assert statuses == [200, 200, 200, 500, 200, 200, 200, 500]
    with pytest.raises(MockAdminError, match="percent must be an integer within 1..100"):
        mocks.admin.fault(OPENAI, "status=500", percent=0)


def test_each_record_says_how_it_was_answered(mocks: MockProcess) -> None:
    port = mocks.port(OPENAI)
    call(port, body=chat(), headers={"x-mock": "status=503"})
    with pytest.raises(ConnectionResetError):
        call(port, body=chat(), headers={"x-mock": "reset=1"})
    call(port, body=chat(stream=True), headers={"x-mock": "cut_after=1"})
    call(port, body=chat(stream=True), headers={"x-mock": "stall_after=0"}, timeout=0.3)
    call(port, body=chat(stream=True), headers={"x-mock": "chunk_bytes=10;cut=30"})
    call(port, body=chat(), headers={"x-mock": "stauts=1"})
    call(port, body=chat(stream=True), headers={"x-mock": "ttft_ms=1"})
    assert [r.outcome for r in mocks.admin.requests(OPENAI)] == [
        "503",
        "reset",
        "200 cut_after",
        "200 stalled",
        "200 cut",
        "400 x-mock-error",
        "200",
    ]


def test_in_process_mocks_serve_the_same_admin_api() -> None:
    port, admin_port = free_ports(2)
    with MockProviders({OPENAI: port}, admin_port=admin_port) as up:
        admin = MockAdmin(up.admin_url)
        admin.fault("*", "status=429")
        assert up.faults() == [Fault("*", "status=429")]
        assert call(port, body=chat()).status == 429
        up.reset()
        assert admin.faults() == [] and call(port, body=chat()).status == 200
        assert admin.count(OPENAI) == up.count(OPENAI) == 2


# ---- wrong requests -------------------------------------------------------------------------------------------
def test_auth_is_required_only_where_asked(mocks: MockProcess) -> None:
    assert call(mocks.port(OPENAI), body=chat()).status == 200  # Envoy strips the client's key
    missing = call(mocks.port(STRICT), body=chat())
    assert missing.status == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert call(mocks.port(STRICT), body=chat(), headers={"authorization": "Bearer sk-any"}).status == 200
    claude = call(mocks.port(STRICT), "/v1/messages", anthropic(), {"authorization": "Bearer sk-any"})
    assert claude.status == 401
    assert claude.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "x-api-key header is required"},
    }
    headers = {"x-api-key": "sk-any", "anthropic-version": "2023-06-01"}
    assert call(mocks.port(STRICT), "/v1/messages", anthropic(), headers).status == 200
    assert call(mocks.port(STRICT), "/api/chat", {"model": "llama3"}).status == 200  # Ollama has no auth
    per_request = call(mocks.port(OPENAI), body=chat(), headers={"x-mock": "auth=required"})
    assert per_request.status == 401


def test_auth_with_a_key(mocks: MockProcess) -> None:
    wrong = call(mocks.port(KEYED), body=chat(), headers={"authorization": "Bearer sk-wrong-key"})
    assert wrong.status == 401 and wrong.json()["error"]["message"].startswith("Incorrect API key provided: sk-")
    assert call(mocks.port(KEYED), body=chat(), headers={"authorization": "Bearer sk-right"}).status == 200
    bad_anthropic = call(mocks.port(KEYED), "/v1/messages", anthropic(), {"x-api-key": "sk-wrong"})
    assert bad_anthropic.json()["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}
    mocks.admin.clear_faults()  # settings survive it
    assert call(mocks.port(KEYED), body=chat()).status == 401


OPENAI_AUTH = {"authorization": "Bearer sk-any"}
ANTHROPIC_AUTH = {"x-api-key": "sk-any", "anthropic-version": "2023-06-01"}


@pytest.mark.parametrize(
    ("path", "body", "headers", "message"),
    [
        ("/v1/messages", chat(), ANTHROPIC_AUTH, "max_tokens: Field required"),
        ("/v1/messages", chat(max_tokens=5, stream_options={}), ANTHROPIC_AUTH, "stream_options: Extra inputs"),
        (
            "/v1/messages",
            anthropic(messages=[{"role": "system", "content": "be brief"}]),
            ANTHROPIC_AUTH,
            'messages: Unexpected role "system"',
        ),
        ("/v1/messages", anthropic(), {"x-api-key": "sk-any"}, "anthropic-version: header is required"),
        (
            "/v1/chat/completions",
            anthropic(system="be brief"),
            OPENAI_AUTH,
            "Unrecognized request argument supplied: system",
        ),
        ("/v1/chat/completions", {"model": "gpt-4o"}, OPENAI_AUTH, "Missing required parameter: 'messages'."),
        ("/v1/chat/completions", b"not json", OPENAI_AUTH, "We could not parse the JSON body"),
        ("/api/chat", {"messages": []}, {}, "model is required"),
    ],
    ids=[
        "openai-body-on-messages",
        "openai-option-on-messages",
        "system-message-on-messages",
        "no-anthropic-version",
        "anthropic-body-on-chat",
        "no-messages",
        "not-json",
        "ollama-no-model",
    ],
)
def test_wrong_schema_gets_the_providers_400(
    mocks: MockProcess, path: str, body: dict[str, Any] | bytes, headers: dict[str, str], message: str
) -> None:
    reply = call(mocks.port(STRICT), path, body, headers)
    assert reply.status == 400, reply.body
    answer = reply.json()
    if path == "/v1/messages":
        assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["message"].startswith(message)
    elif path == "/api/chat":
        assert answer == {"error": message}
    else:
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"].startswith(message)
    assert call(mocks.port(OPENAI), path, body, headers).status == 200  # lenient where not asked


# ---- the grammar on its own -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("ttft_ms=500;event_delay_ms=20", Behaviour(ttft_ms=500, event_delay_ms=20)),
        ("cut_after=3;stall_after=off", Behaviour(cut_after=3)),
        ("stall_after=0;stall_ms=100", Behaviour(stall_after=0, stall_ms=100)),
        ("status=429;retry_after=5", Behaviour(status=429, retry_after="5")),
        ("reset=1;no_done=yes;context_exceeded=on", Behaviour(reset=True, no_done=True, context_exceeded=True)),
        ("malformed_after=2", Behaviour(malformed_after=2)),
        ("auth_key=sk-a%3Bb;schema=strict", Behaviour(auth=True, auth_key="sk-a;b", schema_strict=True)),
        ("prompt_tokens=1;prompt_tokens=off", Behaviour()),
        ("global=off", Behaviour()),
    ],
    ids=["ttft", "cut-stall-off", "stall-for", "retry-after", "flags", "malformed", "auth-schema", "off", "global"],
)
def test_grammar(header: str, expected: Behaviour) -> None:
    assert parse_mock_header(header, OPENAI) == expected


@pytest.mark.parametrize(
    "header", ["ttft_ms=-1", "reset=maybe", "retry_after=soon", "auth=please", "schema=loose", "global=no", "auth_key="]
)
def test_grammar_rejects(header: str) -> None:
    with pytest.raises(MockHeaderError):
        parse_mock_header(header, OPENAI)


def test_every_key_is_documented() -> None:
    doc = mock_header.__doc__ or ""
    for key in KEYS:
        assert f"    {key}=" in doc, key
