"""One attempt of a translating chain: what the upstream ext_proc changes, request and response.

Envoy runs the upstream ext_proc of `model.<m>.chain` once per attempt (retry or hedge), each on its own gRPC
stream. The attempt's provider comes from the chosen endpoint's metadata, which Envoy hands over in the request
headers message as the attribute ``xds.upstream_host_metadata`` in protobuf text format
(``filter_metadata { key: "meshgen" value { fields { key: "provider" value { string_value: "openai" } } } }``).

Header mutations made on one attempt's stream persist into the next attempt (ENVOY-FACTS §2), so every attempt
sets every provider-specific header absolutely: ``:path``, the provider's auth (``authorization: Bearer`` for an
OpenAI-schema provider, ``x-api-key`` + ``anthropic-version`` for Anthropic, the other's removed), and
``content-length`` of the body it sends. ``accept-encoding`` is removed so answers come back readable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ext_proc.config import ServiceConfig
from ext_proc.translate import PATHS, StreamTranslator, Translator, translator
from ext_proc.translate.common import TranslationError, dumps

__all__ = ["ANTHROPIC_VERSION", "Plan", "Planner", "provider_of"]

ANTHROPIC_VERSION: Final = "2023-06-01"
_PROVIDER: Final = re.compile(r'key:\s*"provider"\s*value\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"')


def provider_of(host_metadata: str) -> str | None:
    """The ``meshgen.provider`` of an endpoint, from Envoy's text-format ``xds.upstream_host_metadata``."""
    found = _PROVIDER.search(host_metadata)
    return found.group(1) if found else None


@dataclass(frozen=True)
class Plan:
    """What one attempt sends: to ``provider`` in schema ``api``, as model ``model``."""

    provider: str
    api: str
    client: str
    model: str
    max_tokens: int
    key: str
    translator: Translator | None

    def headers(self) -> tuple[dict[str, str], tuple[str, ...]]:
        """(headers to set, headers to remove): absolute, whatever an earlier attempt left behind."""
        set_: dict[str, str] = {":path": PATHS[self.api]}
        remove = ["accept-encoding"]
        if self.api == "anthropic":
            set_["anthropic-version"] = ANTHROPIC_VERSION
            remove.append("authorization")
            if self.key:
                set_["x-api-key"] = self.key
            else:
                remove.append("x-api-key")
        else:
            remove += ["x-api-key", "anthropic-version"]
            if self.key:
                set_["authorization"] = f"Bearer {self.key}"
            else:
                remove.append("authorization")
        return set_, tuple(remove)

    def request(self, body: bytes) -> bytes:
        """The body for this attempt: translated for a provider of the other schema, else with the target's model
        name; raises :class:`TranslationError` when the client's body cannot be read."""
        if self.translator is not None:
            return self.translator.request(body, model=self.model, max_tokens=self.max_tokens)
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            raise TranslationError("the request is not JSON") from None
        if not isinstance(request, dict):
            raise TranslationError("the request is not a JSON object")
        if request.get("model") == self.model:
            return body
        return dumps(request | {"model": self.model})

    def include_usage(self, body: bytes) -> bool:
        """Whether the client's (OpenAI) stream asked for its usage chunk."""
        try:
            options = json.loads(body).get("stream_options")
        except (ValueError, RecursionError, AttributeError):
            return False
        return isinstance(options, dict) and options.get("include_usage") is True

    def stream(self, client_body: bytes) -> StreamTranslator | None:
        if self.translator is None:
            return None
        return self.translator.stream(include_usage=self.include_usage(client_body))

    def error(self, status: int, message: str) -> bytes:
        """A gateway error in the client's schema."""
        if self.client == "anthropic":
            return dumps({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
        code = "invalid_request_error" if status < 500 else "server_error"
        return dumps({"error": {"message": message, "type": code, "code": "translation_failed"}})


class Planner:
    """Plans attempts from the service config and this process's environment (the provider keys)."""

    def __init__(self, config: ServiceConfig, environ: Mapping[str, str]) -> None:
        self._config = config
        self._keys = {name: environ.get(p.key_env, "") for name, p in config.providers.items()}

    def plan(self, chain: str, attributes: Any) -> Plan | None:
        """The plan for an attempt of `chain` to the endpoint described by ``attributes`` (the request headers
        message's attribute Structs); None when the chain or the provider is unknown."""
        targets = self._config.translated_chains.get(chain)
        if targets is None:
            return None
        provider = None
        for struct in attributes.values():
            field = struct.fields.get("xds.upstream_host_metadata")
            if field is not None:
                provider = provider_of(field.string_value)
        if provider is None or provider not in targets:
            return None
        models = self._config.models
        client = self._config.providers[models[chain].provider].api
        api = self._config.providers[provider].api
        target = models[targets[provider]]
        return Plan(
            provider=provider,
            api=api,
            client=client,
            model=target.upstream_name,
            max_tokens=target.max_tokens_default,
            key=self._keys.get(provider, ""),
            translator=translator(client, api),
        )
