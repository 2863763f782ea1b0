"""The service over real HTTP: a subprocess on a free port, spoken to as Envoy's ext_authz does."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ext_proc.conftest import MAX_BODY_BYTES
from tests.ext_proc.kit import (
    KEY_A,
    KEY_A2,
    KEY_B,
    TIMEOUT,
    ServiceProcess,
    authz_request,
    config_dict,
    read_response,
    write_config,
)

CHAT = "/authz/v1/chat/completions"
JSON_CT = {"content-type": "application/json"}


def error(message: str, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


MISSING_KEY = error(
    "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or in the 'x-api-key' header.",
    "authentication_error",
    "missing_api_key",
)
INVALID_KEY = error("Incorrect API key provided.", "authentication_error", "invalid_api_key")
INVALID_JSON = error("The request body must be a JSON object.", "invalid_request_error", "invalid_json")
INVALID_CONTENT_TYPE = error("Content-Type must be application/json", "invalid_request_error", "invalid_content_type")
FORM = {"content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
MISSING_MODEL = error(
    "The request body must name a model: a string field 'model'.", "invalid_request_error", "missing_model"
)


@pytest.fixture
def conn(service: ServiceProcess) -> Iterator[http.client.HTTPConnection]:
    c = http.client.HTTPConnection(service.host, service.port, timeout=TIMEOUT)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def raw(service: ServiceProcess) -> Iterator[socket.socket]:
    s = socket.create_connection((service.host, service.port), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield s
    finally:
        s.close()


def post(
    conn: http.client.HTTPConnection,
    body: bytes | dict[str, Any],
    headers: dict[str, str] | None = None,
    path: str = CHAT,
) -> tuple[int, dict[str, str], bytes]:
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request("POST", path, body=payload, headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_refusal(result: tuple[int, dict[str, str], bytes], status: int, expected: dict[str, Any]) -> None:
    got_status, headers, body = result
    assert got_status == status, body
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body))
    assert "x-meshgen-tenant" not in headers
    assert json.loads(body) == expected


@pytest.mark.parametrize(
    ("headers", "body", "status", "expected"),
    [
        ({}, {"model": "gpt-4o"}, 401, MISSING_KEY),
        ({"authorization": "Bearer "}, {"model": "gpt-4o"}, 401, MISSING_KEY),
        ({"authorization": "Basic dXNlcjpwYXNz"}, {"model": "gpt-4o"}, 401, MISSING_KEY),
        (bearer("sk-wrong"), {"model": "gpt-4o"}, 401, INVALID_KEY),
        ({"x-api-key": "sk-wrong"}, {"model": "gpt-4o"}, 401, INVALID_KEY),
        # an unauthenticated caller learns nothing about models or even the body
        (bearer("sk-wrong"), {"model": "no-such-model"}, 401, INVALID_KEY),
        ({"x-api-key": "sk-wrong"}, b"{not json", 401, INVALID_KEY),
        (bearer(KEY_A), b"{not json", 400, INVALID_JSON),
        ({**bearer(KEY_A), **FORM}, {"model": "gpt-4o"}, 400, INVALID_CONTENT_TYPE),
        ({**bearer(KEY_A), **FORM}, b"model=gpt-4o", 400, INVALID_CONTENT_TYPE),
        (
            {"x-api-key": KEY_B, "content-type": "text/plain; charset=utf-8"},
            {"model": "nope"},
            400,
            INVALID_CONTENT_TYPE,
        ),
        ({"x-api-key": "sk-wrong", **FORM}, b"model=gpt-4o", 401, INVALID_KEY),
        ({**FORM}, b"model=gpt-4o", 401, MISSING_KEY),
        (bearer(KEY_A), b"", 400, INVALID_JSON),
        (bearer(KEY_A), b"\xff\xfe\x00garbage", 400, INVALID_JSON),
        (bearer(KEY_A), b'["model", "gpt-4o"]', 400, INVALID_JSON),
        (bearer(KEY_A), b"[" * 4000, 400, INVALID_JSON),
        (bearer(KEY_A), {"messages": []}, 400, MISSING_MODEL),
        (bearer(KEY_A), {"model": 4}, 400, MISSING_MODEL),
        (bearer(KEY_A), {"model": None}, 400, MISSING_MODEL),
        (
            bearer(KEY_A),
            {"model": "gpt-5"},
            404,
            error("The model 'gpt-5' does not exist", "invalid_request_error", "model_not_found"),
        ),
        (
            {"x-api-key": KEY_B},
            {"model": "gpt-4o"},
            403,
            error(
                "This API key is not allowed to use the model 'gpt-4o'",
                "permission_error",
                "model_not_allowed",
            ),
        ),
        (
            bearer(KEY_A),
            {"model": "llama3"},
            403,
            error(
                "This API key is not allowed to use the model 'llama3'",
                "permission_error",
                "model_not_allowed",
            ),
        ),
    ],
    ids=[
        "no-key",
        "empty-bearer",
        "basic-auth-is-no-key",
        "bad-key-bearer",
        "bad-key-x-api-key",
        "bad-key-hides-model",
        "bad-key-hides-bad-json",
        "bad-json",
        "form-content-type",
        "form-content-type-form-body",
        "text-content-type-hides-model",
        "bad-key-before-content-type",
        "no-key-before-content-type",
        "empty-body",
        "not-utf8",
        "json-array",
        "deeply-nested",
        "no-model",
        "model-not-string",
        "model-null",
        "unknown-model",
        "not-allowed-x-api-key",
        "not-allowed-bearer",
    ],
)
def test_refusals(
    conn: http.client.HTTPConnection,
    headers: dict[str, str],
    body: bytes | dict[str, Any],
    status: int,
    expected: dict[str, Any],
) -> None:
    assert_refusal(post(conn, body, headers), status, expected)


@pytest.mark.parametrize(
    ("headers", "model", "tenant"),
    [
        (bearer(KEY_A), "gpt-4o", "team-a"),
        ({"authorization": f"bearer   {KEY_A2}  "}, "gpt-4o-mini", "team-a"),
        ({"x-api-key": KEY_B}, "llama3", "team-b"),
        ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": KEY_B}, "llama3", "team-b"),
        ({"authorization": f"Bearer {KEY_A}", "x-api-key": KEY_B}, "gpt-4o", "team-a"),
    ],
    ids=["bearer", "second-key-lowercase-scheme", "x-api-key", "basic-then-x-api-key", "bearer-wins"],
)
def test_allowed(conn: http.client.HTTPConnection, headers: dict[str, str], model: str, tenant: str) -> None:
    status, got, body = post(conn, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, headers)
    assert (status, body) == (200, b"")
    assert got["x-meshgen-tenant"] == tenant
    assert got["content-length"] == "0"


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "APPLICATION/json ;charset=UTF-8",
    ],
    ids=["absent", "empty", "plain", "mixed-case", "charset", "upper-spaced"],
)
def test_json_content_types_allowed(raw: socket.socket, content_type: str | None) -> None:
    body = b'{"model":"gpt-4o"}'
    ct = "" if content_type is None else f"content-type: {content_type}\r\n"
    head = f"POST /authz/v1/chat/completions HTTP/1.1\r\nhost: x\r\n{ct}x-api-key: {KEY_A}\r\n"
    raw.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
    with raw.makefile("rb") as stream:
        resp = read_response(stream)
    assert (resp.status, resp.headers.get("x-meshgen-tenant"), resp.body) == (200, "team-a", b"")


def test_any_path_and_method_under_authz(conn: http.client.HTTPConnection) -> None:
    status, headers, _ = post(conn, {"model": "gpt-4o"}, bearer(KEY_A), path="/authz/v1/messages?beta=true")
    assert (status, headers["x-meshgen-tenant"]) == (200, "team-a")
    conn.request("PUT", "/authz", body=b'{"model":"llama3"}', headers={"x-api-key": KEY_B})
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("x-meshgen-tenant"), resp.read()) == (200, "team-b", b"")


def test_healthz(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert (resp.status, resp.read(), resp.getheader("content-type")) == (200, b"ok", "text/plain")
    conn.request("HEAD", "/healthz")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"")
    result = post(conn, b"", path="/healthz")
    assert_refusal(result, 405, error("Method not allowed.", "invalid_request_error", "method_not_allowed"))


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions", "/authzx/v1/chat", "/healthz/x"])
def test_unknown_path_is_404(conn: http.client.HTTPConnection, path: str) -> None:
    result = post(conn, {"model": "gpt-4o"}, bearer(KEY_A), path=path)
    assert_refusal(result, 404, error("Unknown path.", "invalid_request_error", "not_found"))


def test_keep_alive(conn: http.client.HTTPConnection) -> None:
    cases = [
        (bearer(KEY_A), {"model": "gpt-4o"}, 200),
        ({}, {"model": "gpt-4o"}, 401),
        ({"x-api-key": KEY_B}, {"model": "llama3"}, 200),
        (bearer(KEY_A), {"model": "nope"}, 404),
        (bearer(KEY_A), {"model": "gpt-4o-mini"}, 200),
    ]
    first_sock = None
    for headers, body, status in cases:
        got, response_headers, _ = post(conn, body, headers)
        assert got == status
        assert "connection" not in response_headers
        first_sock = first_sock or conn.sock
        assert conn.sock is first_sock  # http.client reopens a closed connection: it must not have had to


def test_connection_close_is_honoured(raw: socket.socket) -> None:
    raw.sendall(authz_request(b'{"model":"gpt-4o"}', key=KEY_A, extra="connection: close\r\n"))
    with raw.makefile("rb") as stream:
        resp = read_response(stream)
        assert (resp.status, resp.headers["connection"], resp.headers["x-meshgen-tenant"]) == (
            200,
            "close",
            "team-a",
        )
        assert stream.read() == b""  # the server closed


def test_pipelined_requests_answered_in_order(raw: socket.socket) -> None:
    requests = [
        authz_request(b'{"model":"gpt-4o"}', key=KEY_A),
        authz_request(b'{"model":"gpt-4o"}'),
        authz_request(b'{"model":"llama3"}', key=KEY_B, bearer=False),
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
        authz_request(b'{"model":"gpt-4o"}', key=KEY_B),
        authz_request(b'{"model":"gpt-4o-mini"}', key=KEY_A2, extra="connection: close\r\n"),
        authz_request(b'{"model":"gpt-4o"}', key=KEY_A),  # after connection: close: never answered
    ]
    raw.sendall(b"".join(requests))
    with raw.makefile("rb") as stream:
        got = [read_response(stream) for _ in range(6)]
        assert stream.read() == b""
    assert [(r.status, r.headers.get("x-meshgen-tenant")) for r in got] == [
        (200, "team-a"),
        (401, None),
        (200, "team-b"),
        (200, None),
        (403, None),
        (200, "team-a"),
    ]
    assert got[1].json() == MISSING_KEY
    assert got[3].body == b"ok"


def test_request_split_across_tcp_writes(raw: socket.socket) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 1000}]}).encode()
    data = authz_request(body, key=KEY_A)
    cuts = [0, 7, 40, len(data) - len(body) - 1, len(data) - len(body) + 5, len(data) - 300, len(data)]
    for start, end in zip(cuts, cuts[1:], strict=False):
        raw.sendall(data[start:end])
        time.sleep(0.02)
    with raw.makefile("rb") as stream:
        resp = read_response(stream)
    assert (resp.status, resp.headers["x-meshgen-tenant"], resp.body) == (200, "team-a", b"")


def test_chunked_body(raw: socket.socket) -> None:
    head = (
        "POST /authz/v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        f"x-api-key: {KEY_B}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    raw.sendall(head.encode() + b'5\r\n{"mod\r\n')
    time.sleep(0.02)
    raw.sendall(b'e\r\nel": "llama3"}\r\n0\r\n\r\n')
    with raw.makefile("rb") as stream:
        resp = read_response(stream)
    assert (resp.status, resp.headers["x-meshgen-tenant"]) == (200, "team-b")


def test_body_too_large_closes(raw: socket.socket) -> None:
    body = json.dumps({"model": "gpt-4o", "pad": "x" * MAX_BODY_BYTES}).encode()
    raw.sendall(authz_request(body, key=KEY_A))
    with raw.makefile("rb") as stream:
        resp = read_response(stream)
        assert stream.read() == b""
    assert (resp.status, resp.headers["connection"]) == (413, "close")
    assert resp.json() == error("The request body is too large.", "invalid_request_error", "request_too_large")


@pytest.mark.parametrize(
    ("flag", "limit"),
    [((), 1024), (("--max-body-bytes", "2048"), 2048)],
    ids=["from-config", "flag-overrides-config"],
)
def test_body_limit_from_config(tmp_path: Path, flag: tuple[str, ...], limit: int) -> None:
    doc = config_dict()
    doc["max_request_bytes"] = 1024
    with ServiceProcess(write_config(tmp_path, doc), flag) as service:

        def send(size: int) -> int:
            prefix = b'{"model":"gpt-4o","pad":"'
            body = prefix + b"x" * (size - len(prefix) - 2) + b'"}'
            assert len(body) == size
            with socket.create_connection((service.host, service.port), timeout=TIMEOUT) as s:
                s.sendall(authz_request(body, key=KEY_A))
                with s.makefile("rb") as stream:
                    return read_response(stream).status

        assert [send(limit), send(limit + 1)] == [200, 413]


@pytest.mark.parametrize(
    "data",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"POST /authz/x HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        # a good request first: it is answered, then the garbage closes the connection
        authz_request(b'{"model":"gpt-4o"}', key=KEY_A) + b"\x00\x01\x02\r\n\r\n",
    ],
    ids=["garbage", "bad-content-length", "upgrade", "good-then-garbage"],
)
def test_malformed_http_gets_400_and_close(raw: socket.socket, data: bytes) -> None:
    raw.sendall(data)
    with raw.makefile("rb") as stream:
        responses = []
        while stream.peek(1):  # until the server closes
            responses.append(read_response(stream))
    last = responses[-1]
    assert (last.status, last.headers["connection"]) == (400, "close")
    assert last.json() == error("Malformed HTTP request.", "invalid_request_error", "malformed_request")
    assert [r.status for r in responses[:-1]] == ([200] if data.startswith(b"POST /authz/v1") else [])


def test_many_concurrent_connections(service: ServiceProcess) -> None:
    socks = [socket.create_connection((service.host, service.port), timeout=TIMEOUT) for _ in range(64)]
    try:
        for s in socks:
            s.sendall(authz_request(b'{"model":"llama3"}', key=KEY_B))
        for s in socks:
            with s.makefile("rb") as stream:
                assert read_response(stream).headers["x-meshgen-tenant"] == "team-b"
    finally:
        for s in socks:
            s.close()


def test_refusals_logged_as_json_without_secrets(service: ServiceProcess, conn: http.client.HTTPConnection) -> None:
    start = len(service.lines)
    secret_prompt = "TOP-SECRET-PROMPT-4711"
    body = {"model": "llama3", "messages": [{"role": "user", "content": secret_prompt}]}
    assert post(conn, body, bearer(KEY_B))[0] == 200  # success: no log line
    assert post(conn, body, bearer(KEY_A))[0] == 403
    assert post(conn, b"{" + secret_prompt.encode(), {"x-api-key": KEY_A})[0] == 400
    assert post(conn, body, {"x-api-key": "sk-" + secret_prompt})[0] == 401
    service.wait_for_line(lambda line: '"invalid_api_key"' in line, start)
    logs = service.refusal_logs(start)
    refused = {"event": "request", "decision": "refused", "trace_id": None}
    assert logs == [
        refused | {"reason": "model_not_allowed", "status": 403, "tenant": "team-a", "model": "llama3"},
        refused | {"reason": "invalid_json", "status": 400, "tenant": "team-a", "model": None},
        refused | {"reason": "invalid_api_key", "status": 401, "tenant": None, "model": None},
    ]
    text = "\n".join(service.lines)
    for secret in (secret_prompt, KEY_A, KEY_B):
        assert secret not in text
