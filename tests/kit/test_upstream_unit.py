"""The mock upstream and the small helpers on their own (no Envoy)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable

import pytest

from tests.support import (
    Behaviour,
    MockHeaderError,
    MockUpstream,
    free_ports,
    parse_mock_header,
    require_binary,
)

A = "provider.openai.us-east.ep0"
B = "provider.anthropic.us-east.ep0"


@pytest.mark.parametrize(
    ("header", "label", "expected"),
    [
        ("", A, Behaviour()),
        ("status=503", A, Behaviour(status=503)),
        (f"status=503@{A};delay_ms=50", A, Behaviour(status=503, delay_ms=50)),
        (f"status=503@{A};delay_ms=50", B, Behaviour(delay_ms=50)),
        (f"status=502@{A};status=500", A, Behaviour(status=502)),
        ("status=503@provider.openai.*", A, Behaviour(status=503)),
        ("body=a%3Bb%40c", A, Behaviour(body=b"a;b@c")),
        ("header.retry-after=2; drop=1", A, Behaviour(headers=(("retry-after", "2"),), drop=True)),
    ],
    ids=[
        "empty",
        "status",
        "scoped-hit",
        "scoped-miss",
        "scoped-beats-unscoped",
        "glob",
        "escaped",
        "header-drop",
    ],
)
def test_parse_mock_header(header: str, label: str, expected: Behaviour) -> None:
    assert parse_mock_header(header, label) == expected


@pytest.mark.parametrize("header", ["stauts=503", "status=abc", "status=999", "delay_ms=-1", "status"])
def test_parse_mock_header_rejects(header: str) -> None:
    with pytest.raises(MockHeaderError):
        parse_mock_header(header, A)


def _request(
    conn: http.client.HTTPConnection,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn.request("POST" if body is not None else "GET", path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_keep_alive_chunked_healthz_and_records() -> None:
    with MockUpstream(dict(zip([A, B], free_ports(2), strict=True))) as up:
        conn = http.client.HTTPConnection("127.0.0.1", up.port(A), timeout=5)
        try:
            assert _request(conn, "/healthz")[0] == 200
            status, headers, body = _request(conn, "/v1/chat/completions", b'{"model": "m1"}')
            assert (status, headers["x-served-by"], json.loads(body)["model"]) == (200, A, "m1")
            assert int(headers["content-length"]) == len(body)
            # same connection again, chunked body this time
            conn.putrequest("POST", "/v1/chat/completions")
            conn.putheader("transfer-encoding", "chunked")
            conn.putheader("x-rep", "1")
            conn.putheader("x-rep", "2")
            conn.endheaders()
            conn.send(b'7\r\n{"model\r\n8\r\n": "m2"}\r\n0\r\n\r\n')
            resp = conn.getresponse()
            assert json.loads(resp.read())["model"] == "m2"
        finally:
            conn.close()
        assert up.count() == 2  # /healthz is not recorded
        last = up.requests(A)[-1]
        assert last.body == b'{"model": "m2"}'
        assert last.headers["x-rep"] == "1, 2"
        assert up.requests(B) == []


def test_anthropic_path_and_streaming_shapes() -> None:
    with MockUpstream({B: free_ports(1)[0]}) as up:
        conn = http.client.HTTPConnection("127.0.0.1", up.port(B), timeout=5)
        try:
            _, _, body = _request(conn, "/v1/messages", b'{"model": "claude"}')
            assert json.loads(body)["usage"] == {"input_tokens": 7, "output_tokens": 3}
            _, _, body = _request(conn, "/v1/messages", b"{}", {"x-mock": "status=529"})
            assert json.loads(body)["error"]["type"] == "overloaded_error"
            stream = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
            _, headers, body = _request(conn, "/v1/chat/completions", stream)
            assert headers["content-type"] == "text/event-stream"
            events = body.decode().strip().split("\n\n")
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2].removeprefix("data: "))["usage"]["total_tokens"] == 10
        finally:
            conn.close()


def test_bad_mock_header_answers_400_loudly() -> None:
    with MockUpstream({A: free_ports(1)[0]}) as up:
        conn = http.client.HTTPConnection("127.0.0.1", up.port(A), timeout=5)
        try:
            status, headers, _ = _request(conn, "/v1/chat/completions", b"{}", {"x-mock": "stauts=503"})
        finally:
            conn.close()
    assert status == 400
    assert "unknown key 'stauts'" in headers["x-mock-error"]


def test_wait_for_times_out_with_counts() -> None:
    with MockUpstream({A: free_ports(1)[0]}) as up:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="only 0"):
            up.wait_for(A, 1, timeout=0.2)
        assert time.monotonic() - t0 < 2


def test_stop_closes_idle_keep_alive_connections() -> None:
    with MockUpstream({A: free_ports(1)[0]}) as up:
        sock = socket.create_connection(("127.0.0.1", up.port(A)), timeout=5)
    with sock:
        assert sock.recv(1) == b""  # server closed it on stop


def test_port_in_use_is_reported() -> None:
    (port,) = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(RuntimeError, match="could not listen"):
            MockUpstream({A: port}).start()


def test_free_ports_are_distinct() -> None:
    ports = free_ports(50)
    assert len(set(ports)) == 50


def test_require_binary_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool"):
        require_binary("no-such-tool-xyz")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool"):
        require_binary("no-such-tool-xyz")


def test_update_golden_option_defaults_off(update_golden: bool) -> None:
    assert update_golden is False


def test_mock_upstream_fixture(mock_upstream: Callable[..., MockUpstream]) -> None:
    assert callable(mock_upstream)
    up = mock_upstream(A, B)
    assert isinstance(up, MockUpstream)
    assert set(up.labels) == {A, B}
