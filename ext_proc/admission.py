"""Admission: API key → tenant, then the request's model against the tenant's allowed models.

Pure logic over bytes: no I/O, no clock, no HTTP. Everything that can be is computed once, when the
config is loaded. The order of the checks is part of the contract (key, content-type, JSON, model): a caller
without a valid key learns nothing about which models exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Final

from ext_proc.config import ServiceConfig
from ext_proc.errors import (
    InvalidApiKey,
    InvalidContentType,
    InvalidJson,
    MissingApiKey,
    MissingModel,
    ModelNotAllowed,
    ModelNotFound,
)

__all__ = ["DIGEST_PREFIX_HEX", "Admission", "Admitted", "api_key_from_headers", "digest_index", "is_json_content_type"]

# Configured key digests are bucketed by this many leading hex characters of sha256(key).
DIGEST_PREFIX_HEX: Final = 8


@dataclass(frozen=True, slots=True)
class Admitted:
    tenant: str
    model: str
    request: dict[str, Any]
    """The parsed body: the ledger estimates the request's tokens from it."""


def api_key_from_headers(authorization: bytes | None, x_api_key: bytes | None) -> bytes | None:
    """The API key from ``Authorization: Bearer <key>`` or else ``x-api-key: <key>``; ``None`` if neither."""
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            token = token.strip()
            if token:
                return token
    if x_api_key is not None:
        key = x_api_key.strip()
        if key:
            return key
    return None


def digest_index(config: ServiceConfig, width: int = DIGEST_PREFIX_HEX) -> dict[str, tuple[tuple[str, str], ...]]:
    """The configured key digests as ``digest[:width]`` → ``((digest, tenant), ...)``."""
    index: dict[str, list[tuple[str, str]]] = {}
    for name, tenant in config.tenants.items():
        for key_hash in tenant.key_hashes:
            index.setdefault(key_hash[:width], []).append((key_hash, name))
    return {prefix: tuple(bucket) for prefix, bucket in index.items()}


def is_json_content_type(content_type: bytes | None) -> bool:
    """Whether Envoy's json_to_metadata reads the body: no content-type, or ``application/json[; params]``."""
    if content_type is None or not content_type.strip():  # Envoy treats an empty value as no content-type
        return True
    media_type = content_type.partition(b";")[0].strip().lower()
    return media_type == b"application/json"


class Admission:
    """Decides one request. Raises a whitelisted :class:`ext_proc.errors.ApiError` to refuse it."""

    __slots__ = ("_allowed", "_by_prefix", "_models", "_prefix_width")

    def __init__(self, config: ServiceConfig, *, prefix_width: int = DIGEST_PREFIX_HEX):
        self._prefix_width = prefix_width
        self._by_prefix = digest_index(config, prefix_width)
        self._models: frozenset[str] = frozenset(config.models)
        self._allowed: dict[str, frozenset[str]] = {
            name: frozenset(tenant.models) for name, tenant in config.tenants.items()
        }

    def authenticate(self, key: bytes | None) -> str:
        """The tenant owning ``key``."""
        if key is None:
            raise MissingApiKey()
        digest = hashlib.sha256(key).hexdigest()
        # Only the public prefix of sha256(key) picks the bucket; full digests are compared in constant time.
        tenant: str | None = None
        for candidate, owner in self._by_prefix.get(digest[: self._prefix_width], ()):
            if hmac.compare_digest(digest, candidate):
                tenant = owner  # no break: every candidate in the bucket is compared
        if tenant is None:
            raise InvalidApiKey()
        return tenant

    def admit(self, key: bytes | None, body: bytes, content_type: bytes | None = None) -> Admitted:
        """Key, then content-type (``None``: the header was absent), then the body's JSON and model."""
        tenant = self.authenticate(key)
        if not is_json_content_type(content_type):
            raise InvalidContentType(tenant=tenant)
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InvalidJson(tenant=tenant) from None
        if not isinstance(request, dict):
            raise InvalidJson(tenant=tenant)
        model = request.get("model")
        if not isinstance(model, str):
            raise MissingModel(tenant=tenant)
        if model not in self._models:
            raise ModelNotFound(model, tenant=tenant)
        if model not in self._allowed[tenant]:
            raise ModelNotAllowed(model, tenant=tenant)
        return Admitted(tenant, model, request)
