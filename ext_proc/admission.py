"""Admission: API key → tenant, then the request's model against the tenant's allowed models.

Pure logic over bytes: no I/O, no clock, no HTTP. Everything that can be is computed once, when the
config is loaded. The order of the checks is part of the contract: a caller without a valid key learns
nothing about which models exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from ext_proc.config import ServiceConfig
from ext_proc.errors import (
    InvalidApiKey,
    InvalidJson,
    MissingApiKey,
    MissingModel,
    ModelNotAllowed,
    ModelNotFound,
)

__all__ = ["Admission", "Admitted", "api_key_from_headers"]


@dataclass(frozen=True, slots=True)
class Admitted:
    tenant: str
    model: str


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


class Admission:
    """Decides one request. Raises a whitelisted :class:`ext_proc.errors.ApiError` to refuse it."""

    __slots__ = ("_allowed", "_models", "_tenant_by_hash")

    def __init__(self, config: ServiceConfig):
        self._tenant_by_hash: dict[str, tuple[str, str]] = {
            key_hash: (name, key_hash) for name, tenant in config.tenants.items() for key_hash in tenant.key_hashes
        }
        self._models: frozenset[str] = frozenset(config.models)
        self._allowed: dict[str, frozenset[str]] = {
            name: frozenset(tenant.models) for name, tenant in config.tenants.items()
        }

    def authenticate(self, key: bytes | None) -> str:
        """The tenant owning ``key``."""
        if key is None:
            raise MissingApiKey()
        digest = hashlib.sha256(key).hexdigest()
        # The dict is keyed by sha256(key), not by the key: its lookup time depends on the digest of what the
        # caller sent, and a caller cannot steer a digest towards a stored one (preimage resistance), so that
        # timing tells nothing about any real key. The constant-time compare_digest then confirms the match
        # and keeps the check constant-time should the lookup ever be replaced by something else.
        entry = self._tenant_by_hash.get(digest)
        if entry is None or not hmac.compare_digest(digest, entry[1]):
            raise InvalidApiKey()
        return entry[0]

    def admit(self, key: bytes | None, body: bytes) -> Admitted:
        tenant = self.authenticate(key)
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
        return Admitted(tenant, model)
