"""The ``x-mock`` request header: how a test steers the lab's mock providers (``providers.py``) per request.

The header is a ``;``-separated list of ``key=value`` items, each optionally scoped with ``@<label or glob>``:

    status=<100..599>     answer this status (an error status answers an OpenAI/Anthropic-style error JSON)
    delay_ms=<int>        wait this long before answering (the request is recorded on arrival)
    body=<text>           answer exactly this body (content-type JSON if it parses as JSON, else text/plain)
    header.<name>=<text>  add this response header (e.g. ``header.retry-after=1``)
    drop=1                close the connection without answering (an upstream reset for Envoy)
    chunk_bytes=<int>     write the body in pieces of this many bytes (an SSE event split at odd boundaries)
    chunk_delay_ms=<int>  pause this long between those pieces, so each reaches Envoy on its own
    cut=<int>             close the connection after this many body bytes (the full length still announced)
    words=<int>           a reply of this many words (an SSE stream of as many content chunks)

Values are percent-decoded, so ``%3B`` ``%40`` ``%3D`` ``%25`` write ``;`` ``@`` ``=`` ``%``.
Precedence, last wins per key: ``up.set()`` overrides (in call order), then unscoped items, then scoped items.
An unknown key or bad value answers 400 with ``x-mock-error`` so a typo fails the test loudly.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from urllib.parse import unquote

__all__ = ["MOCK_HEADER", "Behaviour", "MockHeaderError", "parse_mock_header"]

MOCK_HEADER = "x-mock"


@dataclass(frozen=True)
class Behaviour:
    """How the mock answers one request; built from ``up.set()`` overrides and the ``x-mock`` header."""

    status: int = 200
    delay_ms: int = 0
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    chunk_bytes: int = 0
    chunk_delay_ms: int = 0
    cut: int | None = None
    words: int | None = None


class MockHeaderError(ValueError):
    """The ``x-mock`` header does not follow the grammar."""


@dataclass(frozen=True)
class _Item:
    key: str
    value: str
    scope: str | None


def _parse_items(value: str) -> list[_Item]:
    items: list[_Item] = []
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
        items.append(_Item(key.strip().lower(), unquote(val.strip()), scope))
    return items


def apply_item(b: Behaviour, key: str, value: str) -> Behaviour:
    try:
        if key == "status":
            status = int(value)
            if not 100 <= status <= 599:
                raise MockHeaderError(f"x-mock: status {status} is not within 100..599")
            return replace(b, status=status)
        if key == "delay_ms":
            delay = int(value)
            if delay < 0:
                raise MockHeaderError(f"x-mock: delay_ms must be >= 0, got {delay}")
            return replace(b, delay_ms=delay)
        if key in {"chunk_bytes", "chunk_delay_ms", "cut", "words"}:
            number = int(value)
            if number < 0 or (key in {"chunk_bytes", "words"} and number == 0):
                raise MockHeaderError(f"x-mock: {key} must be {'> 0' if key != 'cut' else '>= 0'}, got {number}")
            if key == "chunk_bytes":
                return replace(b, chunk_bytes=number)
            if key == "chunk_delay_ms":
                return replace(b, chunk_delay_ms=number)
            if key == "cut":
                return replace(b, cut=number)
            return replace(b, words=number)
    except ValueError as e:
        if isinstance(e, MockHeaderError):
            raise
        raise MockHeaderError(f"x-mock: {key}={value!r} is not an integer") from None
    if key == "body":
        return replace(b, body=value.encode())
    if key.startswith("header.") and len(key) > len("header."):
        return replace(b, headers=(*b.headers, (key[len("header.") :], value)))
    if key == "drop":
        return replace(b, drop=value.lower() in {"1", "true", "yes"})
    raise MockHeaderError(
        f"x-mock: unknown key {key!r} "
        "(status, delay_ms, body, header.<name>, drop, chunk_bytes, chunk_delay_ms, cut, words)"
    )


def parse_mock_header(value: str, label: str, base: Behaviour | None = None) -> Behaviour:
    """The behaviour that the ``x-mock`` header ``value`` asks of the upstream ``label``.

    Items scoped with ``@pattern`` apply only where ``fnmatch(label, pattern)``; they win over unscoped items.
    """
    items = _parse_items(value)
    b = base or Behaviour()
    for it in items:
        if it.scope is None:
            b = apply_item(b, it.key, it.value)
    for it in items:
        if it.scope is not None and fnmatch.fnmatchcase(label, it.scope):
            b = apply_item(b, it.key, it.value)
    return b
