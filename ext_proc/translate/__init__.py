"""Schema translators for cross-provider failover, named by schema pair: ``<client>_to_<provider>``.

A chain that crosses schemas (an OpenAI model failing over to an Anthropic one, or the reverse) has an upstream
ext_proc on its aggregate cluster (:mod:`ext_proc.processor`, job ``translate``); for each attempt that goes to a
provider of the other schema it uses one of these modules:

- ``request(body, model=..., max_tokens=...)``: the client's request as the provider's request;
- ``response(body)``: the provider's JSON answer (a completion or an error) as the client's;
- ``stream(include_usage=...)``: the provider's SSE stream, event by event, as the client's (fed chunks cut
  anywhere; ``include_usage``: an OpenAI client's stream asked for its usage chunk);
- ``PATH``: the provider's endpoint path.

Every function is pure: JSON bytes in, JSON bytes out. :class:`TranslationError` means the client's request cannot
be expressed for the provider (not JSON, not a chat request); the attempt then fails with a 400 in the client's shape.
"""

from __future__ import annotations

from typing import Final, Literal, Protocol

from ext_proc.translate import anthropic_to_openai, openai_to_anthropic
from ext_proc.translate.common import TranslationError

__all__ = [
    "PATHS",
    "Schema",
    "StreamTranslator",
    "TranslationError",
    "Translator",
    "anthropic_to_openai",
    "openai_to_anthropic",
    "translator",
]

Schema = Literal["openai", "anthropic"]

PATHS: Final[dict[str, str]] = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
"""Each schema's chat endpoint: the path every attempt to a provider of that schema is sent to."""


class StreamTranslator(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Translator(Protocol):
    PATH: str

    def request(self, body: bytes, *, model: str, max_tokens: int) -> bytes: ...

    def response(self, body: bytes) -> bytes: ...

    def stream(self, *, include_usage: bool) -> StreamTranslator: ...


def translator(client: str, provider: str) -> Translator | None:
    """The module translating a ``client``-schema request for a ``provider``-schema attempt; None for the same
    schema (no translation) and for a pair this service does not know."""
    if client == "openai" and provider == "anthropic":
        return openai_to_anthropic
    if client == "anthropic" and provider == "openai":
        return anthropic_to_openai
    return None
