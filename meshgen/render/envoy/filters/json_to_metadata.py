"""Lift `model`, `stream` and `max_tokens` from the JSON request body into dynamic metadata (no Python)."""

from __future__ import annotations

from typing import Any

from meshgen.render.envoy.types import API, META_NS, filter_

_FIELDS = (("model", "STRING"), ("stream", "PROTOBUF_VALUE"), ("max_tokens", "NUMBER"))


def json_to_metadata_filter() -> dict[str, Any]:
    rules = [
        {"selectors": [{"key": key}], "on_present": {"metadata_namespace": META_NS, "key": key, "type": kind}}
        for key, kind in _FIELDS
    ]
    return filter_(
        "envoy.filters.http.json_to_metadata",
        f"{API}.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        # Read exactly the bodies the data-plane service reads as JSON: no content-type, or application/json in any
        # case and with parameters (charset=utf-8).
        {
            "request_rules": {
                "rules": rules,
                "allow_empty_content_type": True,
                "allow_content_types_regex": {"regex": r"(?i)application/json\s*(;.*)?"},
            }
        },
    )
