"""A client's view of the gateway: POST a chat request, read status, headers and body."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def post(
    port: int,
    body: Mapping[str, Any] | bytes,
    headers: Mapping[str, str] | None = None,
    *,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 15.0,
) -> Reply:
    """POST /v1/chat/completions on 127.0.0.1:`port` (on `conn` to keep the connection alive across calls)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=payload,
            headers={"content-type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        if own:
            conn.close()


@dataclass(frozen=True)
class TimedReply(Reply):
    first_byte_s: float
    """Seconds from sending the request to the first byte of the body."""


def post_timed(port: int, body: Mapping[str, Any], headers: Mapping[str, str], *, timeout: float = 30.0) -> TimedReply:
    """POST /v1/chat/completions and time the first body byte (a stream's first token)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        start = time.monotonic()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body).encode(),
            headers={"content-type": "application/json", **headers},
        )
        response = conn.getresponse()
        first = response.read(1)
        first_byte_s = time.monotonic() - start
        answer = first + response.read()
        return TimedReply(response.status, {k.lower(): v for k, v in response.getheaders()}, answer, first_byte_s)
    finally:
        conn.close()
