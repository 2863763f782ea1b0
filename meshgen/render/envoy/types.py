"""Envoy type URLs and small value helpers shared by the Envoy renderer."""

from __future__ import annotations

import json
from typing import Any

API = "type.googleapis.com/envoy"
HCM = f"{API}.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = f"{API}.extensions.filters.http.router.v3.Router"
HTTP_OPTIONS = f"{API}.extensions.upstreams.http.v3.HttpProtocolOptions"

META_NS = "meshgen.req"
"""Dynamic metadata namespace json_to_metadata fills from the request body."""
RESP_META_NS = "meshgen.resp"
"""Dynamic metadata namespace json_to_metadata fills from a JSON response body (usage, served model)."""
AUTHZ_META_NS = "envoy.filters.http.ext_authz"
"""Where ext_authz's `dynamic_metadata_from_headers` puts the service's answers, keyed by header name."""
ROUTE_HEADER = "x-meshgen-route"
"""The model the data-plane service re-routes a request to (budget downgrade)."""
TENANT_HEADER = "x-meshgen-tenant"
"""The tenant the data-plane service admitted the request for."""
RESERVATION_HEADER = "x-meshgen-reservation"
"""The reservation the data-plane service made at admission; the usage in the access log settles it."""
DOWNGRADED_HEADER = "x-meshgen-downgraded-from"
"""The model the client asked for, on a response the service downgraded (to the client)."""
QUEUED_HEADER = "x-meshgen-queued-ms"
"""How long the service held a non-critical request before admitting it (to Envoy's metadata only)."""
PROMPT_TOKENS_HEADER = "x-meshgen-prompt-tokens"
"""A stream's prompt tokens as the service estimated them at admission (to Envoy's metadata only)."""
SERVED_BY_HEADER = "x-meshgen-served-by"
MIRROR_HEADER = "x-meshgen-mirror"
"""Marks the shadow leg so it is never billed."""
CLIENT_KEY_HEADERS = ("authorization", "x-api-key")


def stat_name(name: str) -> str:
    """`provider.openai.us-east` → `provider_openai_us-east`: Envoy's tag extraction cuts a stat name at its first
    dot, which would label every provider cluster "provider" in Prometheus. (Envoy 1.40's
    `allow_default_tag_overrides` could keep the dots, but xds-protos does not know that field yet.)"""
    return name.replace(".", "_")


def duration(ms: int) -> str:
    """Milliseconds → protobuf JSON Duration ('1.5s')."""
    seconds, rest = divmod(ms, 1000)
    return f"{seconds}s" if rest == 0 else f"{seconds}.{rest:03d}s".rstrip("0")


def percent(value: float) -> dict[str, Any]:
    """A FractionalPercent exact to 1/10,000 of a percent."""
    return {"numerator": round(value * 10_000), "denominator": "MILLION"}


def openai_error(message: str, error_type: str, code: str) -> str:
    return json.dumps({"error": {"message": message, "type": error_type, "code": code}}, separators=(",", ":"))


def filter_(name: str, type_url: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": type_url, **config}}
