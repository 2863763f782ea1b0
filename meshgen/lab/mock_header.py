"""The ``x-mock`` grammar: how a test steers the lab's mock providers (``providers/``), per request or globally.

The same grammar is read from the ``x-mock`` request header (one request), from the admin API's
``POST /faults {"scope": GLOB, "mock": ..., "percent": 1..100}`` (the requests to a matching label, all or that
share of them, until ``DELETE /faults``) and from
``MockProviders.fault()`` / ``.set()`` in process. It is a ``;``-separated list of ``key=value`` items, each
optionally scoped with ``@<label or glob>``:

Answers
    status=<100..599>       answer this status (an error status answers the provider's own error JSON)
    body=<text>             answer exactly this body (content-type JSON if it parses as JSON, else text/plain)
    header.<name>=<text>    add this response header
    words=<int>             a reply of this many words (a stream of as many content chunks); usage is unchanged
    prompt_tokens=<int>     the usage's prompt tokens (default 7; Anthropic's ``input_tokens``, Ollama's
                            ``prompt_eval_count``)
    completion_tokens=<int> the usage's completion tokens (default 3; ``output_tokens``, ``eval_count``)

Faults
    delay_ms=<int>          wait this long before answering at all (the request is recorded on arrival)
    ttft_ms=<int>           slow first token: a stream's headers at once, its first event this much later
                            (a JSON answer waits this long, headers included, as a real provider's does)
    event_delay_ms=<int>    pause this long between a stream's events
    retry_after=<seconds>   add ``retry-after: <seconds>`` (``status=429`` alone is a 429 without it)
    reset=1                 reset the connection (TCP RST) instead of answering
    drop=1                  close the connection (FIN) without answering
    cut_after=<n>           a stream: send the headers and ``n`` events, then reset the connection
    stall_after=<n>         a stream: send the headers and ``n`` events, then nothing, keeping the connection
                            open until the client leaves (or for ``stall_ms``, then go on)
    stall_ms=<int>          how long ``stall_after`` stalls
    malformed_after=<n>     a stream: after ``n`` events, one event that is not valid JSON, then the rest
    no_done=1               a stream without its last event (OpenAI ``data: [DONE]``, Anthropic ``message_stop``,
                            Ollama's ``"done": true`` line), ended cleanly
    context_exceeded=1      the provider's context-length error (OpenAI 400 ``context_length_exceeded``,
                            Anthropic 400 ``invalid_request_error`` "prompt is too long", Ollama 400 ``error``)
    chunk_bytes=<int>       write the body in pieces of this many bytes (an SSE event split at odd boundaries)
    chunk_delay_ms=<int>    pause this long between those pieces, so each reaches Envoy on its own
    cut=<int>               close the connection after this many body bytes (the full length still announced)

Checks (off by default: Envoy strips the client's key, and only cross-schema chains set a provider's own)
    auth=required|off       require the provider's credential: OpenAI ``authorization: Bearer <key>`` (401
                            ``invalid_api_key``), Anthropic ``x-api-key`` (401 ``authentication_error``)
    auth_key=<key>          require exactly this key (implies ``auth=required``)
    schema=strict|off       validate the body against the endpoint's schema and answer the provider's real
                            400 (an OpenAI body on ``/v1/messages`` gets Anthropic's ``invalid_request_error``)
    global=off              (header only) ignore the global faults for this request

Every key but ``body`` and ``header.*`` takes ``off`` to switch it back to its default (flags take ``0`` too), so a
header can undo a global fault key by key. Values are percent-decoded, so ``%3B`` ``%40`` ``%3D`` ``%25`` write
``;`` ``@`` ``=`` ``%``.

Precedence, last wins per key: the process's settings (``--require-auth``, ``--strict-schema``), then global
faults (in the order they were set), then the header's unscoped items, then its scoped items.
An unknown key or bad value answers 400 with ``x-mock-error`` (and ``POST /faults`` answers 400), so a typo
fails the test loudly.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote

__all__ = [
    "KEYS",
    "MOCK_HEADER",
    "Behaviour",
    "MockHeaderError",
    "apply_item",
    "format_items",
    "ignores_global",
    "parse_items",
    "parse_mock_header",
]

MOCK_HEADER = "x-mock"


@dataclass(frozen=True)
class Behaviour:
    """How the mock answers one request; built from settings, global faults and the ``x-mock`` header."""

    status: int = 200
    delay_ms: int = 0
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    chunk_bytes: int = 0
    chunk_delay_ms: int = 0
    cut: int | None = None
    words: int | None = None
    prompt_tokens: int = 7
    completion_tokens: int = 3
    ttft_ms: int = 0
    event_delay_ms: int = 0
    retry_after: str | None = None
    reset: bool = False
    cut_after: int | None = None
    stall_after: int | None = None
    stall_ms: int | None = None
    malformed_after: int | None = None
    no_done: bool = False
    context_exceeded: bool = False
    auth: bool = False
    auth_key: str | None = None
    schema_strict: bool = False

    @property
    def timed_stream(self) -> bool:
        """Whether a stream must be written event by event (chunked) for its faults to show."""
        return bool(self.ttft_ms or self.event_delay_ms) or any(
            n is not None for n in (self.cut_after, self.stall_after)
        )


_DEFAULT = Behaviour()


class MockHeaderError(ValueError):
    """The ``x-mock`` grammar is not followed."""


@dataclass(frozen=True)
class Item:
    key: str
    value: str
    scope: str | None


_FLAGS = {"drop": "drop", "reset": "reset", "no_done": "no_done", "context_exceeded": "context_exceeded"}
# numbers: (field, smallest value, whether 0/off means None rather than 0)
_NUMBERS: dict[str, tuple[str, int, bool]] = {
    "delay_ms": ("delay_ms", 0, False),
    "chunk_bytes": ("chunk_bytes", 0, False),
    "chunk_delay_ms": ("chunk_delay_ms", 0, False),
    "ttft_ms": ("ttft_ms", 0, False),
    "event_delay_ms": ("event_delay_ms", 0, False),
    "cut": ("cut", 0, True),
    "cut_after": ("cut_after", 0, True),
    "stall_after": ("stall_after", 0, True),
    "stall_ms": ("stall_ms", 0, True),
    "malformed_after": ("malformed_after", 0, True),
    "words": ("words", 1, True),
    "prompt_tokens": ("prompt_tokens", 0, False),
    "completion_tokens": ("completion_tokens", 0, False),
}
_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}
KEYS = (
    "status",
    "body",
    "header.<name>",
    *_NUMBERS,
    *_FLAGS,
    "retry_after",
    "auth",
    "auth_key",
    "schema",
    "global",
)


def parse_items(value: str) -> list[Item]:
    """The items of ``value``, in order; raises ``MockHeaderError`` when one is not ``key=value[@scope]``."""
    items: list[Item] = []
    for raw in value.split(";"):
        raw = raw.strip()
        if not raw:
            continue
        scope: str | None = None
        if "@" in raw:
            raw, scope = raw.rsplit("@", 1)
            scope = unquote(scope.strip())
            if not scope:
                raise MockHeaderError(f"x-mock: empty scope after '@' in {raw!r}")
        if "=" not in raw:
            raise MockHeaderError(f"x-mock: item {raw!r} is not key=value")
        key, val = raw.split("=", 1)
        items.append(Item(key.strip().lower(), unquote(val.strip()), scope))
    return items


def format_items(items: Iterable[tuple[str, str]]) -> str:
    """``key=value`` pairs back into the grammar, values percent-encoded where they must be."""
    return ";".join(f"{k}={quote(v, safe=' ,.:/*+-_')}" for k, v in items)


def _flag(key: str, value: str) -> bool:
    low = value.lower()
    if low in _ON:
        return True
    if low in _OFF:
        return False
    raise MockHeaderError(f"x-mock: {key} must be 1 or off, got {value!r}")


def apply_item(b: Behaviour, key: str, value: str) -> Behaviour:
    """``b`` with one ``key=value`` applied; raises ``MockHeaderError`` on an unknown key or a bad value."""
    if key == "status":
        if value.lower() == "off":
            return replace(b, status=200)
        try:
            status = int(value)
        except ValueError:
            raise MockHeaderError(f"x-mock: status={value!r} is not an integer") from None
        if not 100 <= status <= 599:
            raise MockHeaderError(f"x-mock: status {status} is not within 100..599")
        return replace(b, status=status)
    if key in _NUMBERS:
        name, low, off_is_none = _NUMBERS[key]
        if value.lower() == "off":
            off: dict[str, Any] = {name: None if off_is_none else getattr(_DEFAULT, name)}
            return replace(b, **off)
        try:
            number = int(value)
        except ValueError:
            raise MockHeaderError(f"x-mock: {key}={value!r} is not an integer") from None
        if number < low:
            raise MockHeaderError(f"x-mock: {key} must be >= {low}, got {number}")
        if key == "chunk_bytes" and number == 0:
            raise MockHeaderError("x-mock: chunk_bytes must be > 0, got 0")
        changes: dict[str, Any] = {name: number}
        return replace(b, **changes)
    if key in _FLAGS:
        flag: dict[str, Any] = {_FLAGS[key]: _flag(key, value)}
        return replace(b, **flag)
    if key == "body":
        return replace(b, body=value.encode())
    if key.startswith("header.") and len(key) > len("header."):
        return replace(b, headers=(*b.headers, (key[len("header.") :], value)))
    if key == "retry_after":
        if value.lower() == "off":
            return replace(b, retry_after=None)
        if not value.isdigit():
            raise MockHeaderError(f"x-mock: retry_after must be whole seconds, got {value!r}")
        return replace(b, retry_after=value)
    if key == "auth":
        if value.lower() not in {"required", "off"}:
            raise MockHeaderError(f"x-mock: auth must be required or off, got {value!r}")
        return replace(b, auth=value.lower() == "required", auth_key=None if value.lower() == "off" else b.auth_key)
    if key == "auth_key":
        if not value:
            raise MockHeaderError("x-mock: auth_key must not be empty")
        return replace(b, auth=True, auth_key=value)
    if key == "schema":
        if value.lower() not in {"strict", "off"}:
            raise MockHeaderError(f"x-mock: schema must be strict or off, got {value!r}")
        return replace(b, schema_strict=value.lower() == "strict")
    if key == "global":
        if value.lower() not in {"on", "off"}:
            raise MockHeaderError(f"x-mock: global must be on or off, got {value!r}")
        return b
    raise MockHeaderError(f"x-mock: unknown key {key!r} ({', '.join(KEYS)})")


def _applies(item: Item, label: str) -> bool:
    return item.scope is None or fnmatch.fnmatchcase(label, item.scope)


def ignores_global(value: str, label: str) -> bool:
    """Whether the header ``value`` says ``global=off`` for ``label`` (then only the settings apply under it)."""
    return any(it.key == "global" and it.value.lower() == "off" for it in parse_items(value) if _applies(it, label))


def parse_mock_header(value: str, label: str, base: Behaviour | None = None) -> Behaviour:
    """The behaviour that the ``x-mock`` header ``value`` asks of the upstream ``label``, on top of ``base``.

    Items scoped with ``@pattern`` apply only where ``fnmatch(label, pattern)``; they win over unscoped items.
    """
    items = parse_items(value)
    b = base or Behaviour()
    for it in items:
        if it.scope is None:
            b = apply_item(b, it.key, it.value)
    for it in items:
        if it.scope is not None and fnmatch.fnmatchcase(label, it.scope):
            b = apply_item(b, it.key, it.value)
    return b
