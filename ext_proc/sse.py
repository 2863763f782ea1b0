"""Token usage out of an SSE response as it streams by: OpenAI chat-completion chunks and Anthropic messages.

Fed the body chunks exactly as Envoy hands them over (an event may be split anywhere, even inside a UTF-8
character or between the two newlines that end it). :meth:`SseCounter.feed` returns the bytes the client should
get for that chunk: the chunk itself, unless the OpenAI usage event must be hidden (the client did not ask for
``stream_options.include_usage``). Nothing is ever held back except the bytes of an unfinished event *after* the
answer's last content (the ``finish_reason`` chunk): only there can the usage event be, so content is never
delayed.

Only the events that can change the count are parsed as they pass: the first, and those whose data shows a
``usage`` object, a ``finish_reason`` string (OpenAI) or a ``message_*`` type (Anthropic). The others — almost every
event of a stream is a plain content delta — are kept raw and parsed only if the stream ends without usage and its
text must be counted; a run of them up to the next event that counts is taken in one piece, with one regex search
(``json.loads`` per event was the counter's main cost). JSON escapes every quote inside a string, so no text can
look like a marker.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from ext_proc.accesslog import CACHED_INPUT_KEYS
from ext_proc.tokens import count_text

__all__ = ["SseCounter", "event_data", "event_end"]

_EVENT_ENDS: Final = (b"\n\n", b"\r\n\r\n", b"\r\r")
_MARKERS: Final = {
    "openai": re.compile(rb'"usage"\s*:\s*\{|"finish_reason"\s*:\s*"'),
    "anthropic": re.compile(rb'"usage"|"type"\s*:\s*"message_'),
}
"""What an event that must be parsed as it passes shows (module docstring)."""


def event_end(buffer: bytes | bytearray, start: int) -> tuple[int, int]:
    """(index of the first event terminator at or after ``start``, its length), or (-1, 0)."""
    at = buffer.find(b"\n\n", start)
    # Streams almost never carry a CR: only when one comes before the LF pair can another terminator be first.
    # (Searching every terminator to the buffer's end for each event made a chunk of n events O(n²).)
    if buffer.find(b"\r", start, at if at >= 0 else len(buffer)) < 0:
        return (at, 2) if at >= 0 else (-1, 0)
    best, size = -1, 0
    for end in _EVENT_ENDS:
        found = buffer.find(end, start)
        if found >= 0 and (best < 0 or found < best):
            best, size = found, len(end)
    return best, size


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one event, or None when it has none."""
    parts = [
        line[5:].removeprefix(b" ")
        for line in event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(parts) if parts else None


def _openai_texts(chunk: dict[str, Any]) -> list[str]:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    deltas = [choice.get("delta") for choice in choices if isinstance(choice, dict)]
    return [d["content"] for d in deltas if isinstance(d, dict) and isinstance(d.get("content"), str)]


def _anthropic_texts(event: dict[str, Any]) -> list[str]:
    delta = event.get("delta") if event.get("type") == "content_block_delta" else None
    return [delta["text"]] if isinstance(delta, dict) and isinstance(delta.get("text"), str) else []


def _anthropic_input(usage: dict[str, Any]) -> int | None:
    """Anthropic's input: ``input_tokens`` plus the cached prompt tokens it counts apart (prompt caching)."""
    found = _count(usage.get("input_tokens"))
    if found is None:
        return None
    return found + sum(_count(usage.get(key)) or 0 for key in CACHED_INPUT_KEYS)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class SseCounter:
    """One response stream's usage. ``schema`` is ``openai`` or ``anthropic``; ``hide_usage`` removes the OpenAI
    usage event from what the client sees."""

    __slots__ = (
        "_buffer",
        "_emitted",
        "_in_tail",
        "_texts",
        "_marker",
        "events",
        "hide_usage",
        "input_tokens",
        "model",
        "output_tokens",
        "schema",
    )

    def __init__(self, schema: str, *, hide_usage: bool = False) -> None:
        self.schema = schema
        self._marker = _MARKERS.get(schema, _MARKERS["openai"])
        self.hide_usage = hide_usage and schema == "openai"
        self._buffer = bytearray()
        """Bytes of the event not yet complete."""
        self._emitted = 0
        """How many bytes at the start of ``_buffer`` the client already has (passed through before the event
        ended)."""
        self._in_tail = False
        """The OpenAI answer's content ended (finish_reason seen): hold unfinished events until they are whole."""
        self._texts: list[str | bytes] = []
        """The streamed text in order: parsed, or the raw bytes of events not parsed yet (one, or a run)."""
        self.events = 0
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.model: str | None = None

    @property
    def has_usage(self) -> bool:
        return self.input_tokens is not None and self.output_tokens is not None

    def estimated_output_tokens(self) -> int:
        """The streamed text counted with the tokenizer: for a stream whose usage never came."""
        return count_text("".join(self._text_of(part) for part in self._texts))

    def _text_of(self, part: str | bytes) -> str:
        if isinstance(part, str):
            return part
        texts: list[str] = []
        for event in part.split(b"\n\n"):  # a run holds no CR; a single event comes without its terminator
            data = event_data(event)
            try:
                payload = json.loads(data) if data is not None else None
            except ValueError:
                continue
            if isinstance(payload, dict):
                texts += _openai_texts(payload) if self.schema == "openai" else _anthropic_texts(payload)
        return "".join(texts)

    def feed(self, chunk: bytes) -> bytes:
        """Take one body chunk; return what the client gets for it (``chunk`` itself when nothing is hidden)."""
        buffer = self._buffer
        start = len(buffer)
        buffer += chunk
        out: list[bytes] = []
        changed = start > self._emitted  # bytes held from earlier chunks go out with this one
        pos = 0
        while True:
            if self.events and not self._in_tail:
                pos = self._skim(buffer, pos, out)
            end, size = event_end(buffer, max(pos, start - 3))
            if end < 0:
                break
            event = bytes(buffer[pos : end + size])
            hide = self._event(event[: end - pos])
            emitted, self._emitted = self._emitted, 0
            if hide:
                changed = True
                if emitted:  # a usage event already partly passed on: cannot happen after the tail starts
                    out.append(event[emitted:])
            else:
                out.append(event[emitted:])
            pos = end + size
        del buffer[:pos]
        if buffer:
            if self.hide_usage and self._in_tail:
                changed = changed or len(buffer) > self._emitted
            elif len(buffer) > self._emitted:
                out.append(bytes(buffer[self._emitted :]))
                self._emitted = len(buffer)
        if not changed:
            return chunk
        return b"".join(out)

    def _skim(self, buffer: bytearray, pos: int, out: list[bytes]) -> int:
        """Take the whole events from `pos` up to the next one that must be parsed as one raw run, passed on as they
        came; return where the rest starts."""
        found = self._marker.search(buffer, pos)
        cut = buffer.rfind(b"\n\n", pos, len(buffer) if found is None else found.start())
        if cut < 0 or buffer.find(b"\r", pos, cut) >= 0:
            return pos
        run = bytes(buffer[pos : cut + 2])
        self.events += run.count(b"\n\n")
        self._texts.append(run)
        emitted, self._emitted = self._emitted, 0
        out.append(run[emitted:])
        return cut + 2

    def finish(self) -> bytes:
        """At the end of the body: read an event left without its terminator; return the held bytes the client
        should still get (empty unless an unfinished event was held)."""
        rest = bytes(self._buffer)
        emitted, self._emitted = self._emitted, 0
        self._buffer.clear()
        held = rest[emitted:]  # bytes not passed on yet: only ever held in the OpenAI tail
        if rest.strip() and self._event(rest) and not emitted:
            return b""
        return held

    def _event(self, event: bytes) -> bool:
        """Read one whole event (without its terminator); True when the client must not see it."""
        data = event_data(event)
        if data is None or data == b"[DONE]":
            return False
        if self.events and self._marker.search(data) is None:
            self.events += 1
            self._texts.append(event)
            return False
        try:
            payload = json.loads(data)
        except ValueError:
            return False
        if not isinstance(payload, dict):
            return False
        self.events += 1
        if self.schema == "anthropic":
            self._anthropic(payload)
            return False
        return self._openai(payload)

    def _openai(self, chunk: dict[str, Any]) -> bool:
        if self.model is None and isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        choices = chunk.get("choices")
        self._texts += _openai_texts(chunk)
        finished = (c for c in choices if isinstance(c, dict)) if isinstance(choices, list) else ()
        if any(c.get("finish_reason") is not None for c in finished):
            self._in_tail = True
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
            if prompt is not None and completion is not None:
                self.input_tokens, self.output_tokens = prompt, completion
                return self.hide_usage and not choices
        return False

    def _anthropic(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "content_block_delta":
            self._texts += _anthropic_texts(event)
        elif kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    self.model = message["model"]
                usage = message.get("usage")
                if isinstance(usage, dict):
                    self.input_tokens = _anthropic_input(usage)
                    output = _count(usage.get("output_tokens"))
                    if output is not None:
                        self.output_tokens = output
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                # Cumulative: the last one is the answer's total.
                output = _count(usage.get("output_tokens"))
                if output is not None:
                    self.output_tokens = output
                # Cumulative too where present (a stream translated from OpenAI learns its input count only here).
                found = _anthropic_input(usage)
                if found is not None and (self.input_tokens is None or found > self.input_tokens):
                    self.input_tokens = found
