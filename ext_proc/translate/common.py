"""What both translators share: JSON in and out, and an SSE reader fed chunks cut anywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Final

from ext_proc.sse import event_data, event_end

__all__ = [
    "text_of",
    "DONE",
    "SseReader",
    "TranslationError",
    "dumps",
    "index_of",
    "json_object",
    "obj",
    "parse_data",
    "sse_event",
]


class TranslationError(ValueError):
    """The request cannot be expressed in the provider's schema (not JSON, not an object, no messages)."""


def json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise TranslationError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise TranslationError(f"{what} is not a JSON object")
    return value


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sse_event(data: Any, name: str | None = None) -> bytes:
    """One SSE event: ``event: <name>`` (Anthropic names its events) and one ``data:`` line."""
    head = f"event: {name}\n".encode() if name else b""
    payload = data if isinstance(data, bytes) else dumps(data)
    return head + b"data: " + payload + b"\n\n"


DONE: Final = b"[DONE]"


class SseReader:
    """Whole events out of chunks cut anywhere (inside a UTF-8 character, between the two newlines of a
    terminator): yields each event's joined ``data:`` payload (None for an event without data)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> Iterator[bytes | None]:
        buffer = self._buffer
        start = len(buffer)
        buffer += chunk
        pos = 0
        while True:
            end, size = event_end(buffer, max(pos, start - 3))
            if end < 0:
                break
            yield event_data(bytes(buffer[pos:end]))
            pos = end + size
        del buffer[:pos]

    def finish(self) -> Iterator[bytes | None]:
        """An event left without its terminator at the end of the stream."""
        rest, self._buffer = bytes(self._buffer), bytearray()
        if rest.strip():
            yield event_data(rest)


def parse_data(data: bytes | None) -> dict[str, Any] | None:
    """An event's data as a JSON object, or None (no data, ``[DONE]``, not JSON, not an object)."""
    if data is None or data == DONE:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one: lenient reading of fields that may be missing."""
    return value if isinstance(value, dict) else {}


def index_of(item: dict[str, Any]) -> int:
    """An event's or tool call's ``index`` (0 when missing or not a whole number)."""
    value = item.get("index")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def text_of(content: Any) -> str:
    """A message's content as plain text: a string, or the text parts of a list (both schemas' shape)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""
