"""Hedging streams on time to first token: the upstream ext_proc of a hedged chain holds each attempt's response
headers until the attempt's first token.

Envoy hedges when an attempt's per-try timeout passes before its response *headers* (ENVOY-FACTS §1), and a
streaming provider sends its headers at once and its first token late. Held here, the headers reach Envoy's router
only with the first token, so a slow first token is hedged like slow headers: the router sends the next attempt
(the next priority of the chain) and the first attempt whose headers come through wins; Envoy resets the other.
Measured with Envoy 1.40: a primary whose first event comes after 1 s, hedged after 300 ms, was served by the
second provider at ~320 ms; a fast primary reached the client intact, one round trip later.

The filter sends the body without waiting for the headers' reply (``send_body_without_waiting_for_header_response``),
so :func:`hold_first_token` sees the first chunks while the headers' reply waits. A provider sends an event before
its first token (OpenAI's role-only delta, Anthropic's ``message_start``), so the gate waits for an event that
carries text (:class:`FirstToken`), not for the first chunk. A JSON answer, an error status, a body-less answer or
the end of the body release the headers at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import duration_pb2

from ext_proc.sse import event_data, event_end

__all__ = ["FirstToken", "hold_first_token"]

_SSE: Final = "text/event-stream"


class FirstToken:
    """Whether a response stream has carried its first token yet, fed its body chunks as they come (an event may
    be split anywhere). Schema-blind: an OpenAI chunk with delta content or tool calls, an Anthropic
    ``content_block_delta``."""

    __slots__ = ("_buffer", "seen")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.seen = False

    def feed(self, chunk: bytes) -> bool:
        if self.seen:
            return True
        buffer = self._buffer
        start = max(0, len(buffer) - 3)
        buffer += chunk
        pos = 0
        while True:
            end, size = event_end(buffer, max(pos, start))
            if end < 0:
                break
            if _has_token(bytes(buffer[pos:end])):
                self.seen = True
                self._buffer = bytearray()
                return True
            pos = end + size
        del buffer[:pos]
        return False


def _has_token(event: bytes) -> bool:
    data = event_data(event)
    try:
        payload = json.loads(data) if data else None
    except ValueError:
        return False
    if not isinstance(payload, dict):
        return False
    if payload.get("type") == "content_block_delta":
        return True
    choices = payload.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
    return False


def _releases(headers: Any) -> bool:
    """Response headers that need no hold: an error status, no body, or not a stream."""
    if headers.end_of_stream:
        return True
    status = content_type = ""
    for h in headers.headers.headers:
        value = h.raw_value.decode("latin-1") if h.raw_value else str(h.value)
        if h.key == ":status":
            status = value
        elif h.key == "content-type":
            content_type = value
    return status != "200" or not content_type.startswith(_SSE)


async def hold_first_token(
    messages: AsyncIterator[Any],
    process: Callable[[AsyncIterator[Any]], AsyncIterator[Any]],
    *,
    hold_ms: int,
    close_after: Callable[[], bool],
) -> AsyncIterator[Any]:
    """``process`` (one attempt's processing: a reply per message) with its response replies held back from the
    response headers' reply until the first token, then all sent in order. While it holds, Envoy's message
    timeout is raised to ``hold_ms`` (the filter's ``max_message_timeout``). ``close_after()`` true at the release: end
    the stream then (Envoy passes the rest of the answer by without a message: measured)."""
    gate = FirstToken()
    holding = False
    released = False

    async def watched() -> AsyncIterator[Any]:
        nonlocal holding, released
        async for message in messages:
            kind = message.WhichOneof("request")
            if kind == "response_headers" and not released:
                if _releases(message.response_headers):
                    released = True
                else:
                    holding = True
            elif kind == "response_body" and holding and not released:
                body = message.response_body
                if gate.feed(body.body) or body.end_of_stream:
                    released = True
            yield message

    held: list[Any] = []
    async for reply in process(watched()):
        if not holding or released:
            if held:
                for earlier in held:
                    yield earlier
                held.clear()
            yield reply
            if released and close_after():
                return
            continue
        if reply.WhichOneof("response") == "response_headers":
            held.append(reply)
            timeout = duration_pb2.Duration(seconds=hold_ms // 1000, nanos=hold_ms % 1000 * 1_000_000)
            yield pb.ProcessingResponse(override_message_timeout=timeout)
        elif reply.WhichOneof("response") == "response_body":
            held.append(reply)
        else:
            yield reply
