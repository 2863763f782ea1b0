"""Lift fields of JSON bodies into dynamic metadata (no Python).

Request: `model`, `stream` and `max_tokens` into `meshgen.req`, for the route match, RBAC and the access log.
Response: the provider's usage (OpenAI `prompt_tokens`/`completion_tokens`, Anthropic `input_tokens`/`output_tokens`)
and the served `model` into `meshgen.resp`, which the gRPC access log carries to the data-plane service to settle
the request's reservation. Streamed (SSE) responses are not JSON and are counted elsewhere.
"""

from __future__ import annotations

from typing import Any

from meshgen.render.envoy.types import API, META_NS, RESP_META_NS, filter_

_REQUEST_FIELDS = ((("model",), "STRING"), (("stream",), "PROTOBUF_VALUE"), (("max_tokens",), "NUMBER"))
RESPONSE_FIELDS = (
    (("usage", "prompt_tokens"), "NUMBER"),
    (("usage", "completion_tokens"), "NUMBER"),
    (("usage", "input_tokens"), "NUMBER"),
    (("usage", "output_tokens"), "NUMBER"),
    # Anthropic's prompt caching: cached input is counted apart from input_tokens (OpenAI's prompt_tokens has it).
    (("usage", "cache_creation_input_tokens"), "NUMBER"),
    (("usage", "cache_read_input_tokens"), "NUMBER"),
    (("model",), "STRING"),
)
"""JSON path in the response body → metadata type; the key in `meshgen.resp` is the path's last part."""

# Exactly the bodies the data-plane service reads as JSON: no content-type, or application/json in any case and
# with parameters (charset=utf-8).
_JSON_BODIES = {
    "allow_empty_content_type": True,
    "allow_content_types_regex": {"regex": r"(?i)application/json\s*(;.*)?"},
}


def _rules(namespace: str, fields: tuple[tuple[tuple[str, ...], str], ...]) -> dict[str, Any]:
    rules = [
        {
            "selectors": [{"key": part} for part in path],
            "on_present": {"metadata_namespace": namespace, "key": path[-1], "type": kind},
        }
        for path, kind in fields
    ]
    return {"rules": rules, **_JSON_BODIES}


def json_to_metadata_filter() -> dict[str, Any]:
    return filter_(
        "envoy.filters.http.json_to_metadata",
        f"{API}.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        {
            "request_rules": _rules(META_NS, _REQUEST_FIELDS),
            "response_rules": _rules(RESP_META_NS, RESPONSE_FIELDS),
        },
    )
