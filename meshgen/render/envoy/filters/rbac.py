"""Which tenant may call which model, enforced again by Envoy on what the service admitted.

The service refuses first with a clear OpenAI-style 403; this is defence in depth against a service bug. With
`failure_mode: open` a request the service never saw carries no tenant header and is let through, as promised.
"""

from __future__ import annotations

import re
from typing import Any

from meshgen.ir import model as ir
from meshgen.render.envoy.types import API, META_NS, TENANT_HEADER, filter_


def _model_in(models: tuple[str, ...]) -> dict[str, Any]:
    # One anchored alternation per tenant instead of a rule per model: 1,000 tenants stay a readable size.
    regex = "^(" + "|".join(re.escape(m) for m in models) + ")$"
    matcher = {
        "filter": META_NS,
        "path": [{"key": "model"}],
        "value": {"string_match": {"safe_regex": {"regex": regex}}},
    }
    return {"sourced_metadata": {"metadata_matcher": matcher, "metadata_source": "DYNAMIC"}}


def rbac_filter(gw: ir.Gateway) -> dict[str, Any]:
    policies: dict[str, Any] = {
        f"tenant.{t.name}": {
            "permissions": [_model_in(t.models)],
            "principals": [{"header": {"name": TENANT_HEADER, "string_match": {"exact": t.name}}}],
        }
        for t in gw.tenants
    }
    if gw.service.failure_mode == "open":
        policies["unadmitted"] = {
            "permissions": [{"any": True}],
            "principals": [{"not_id": {"header": {"name": TENANT_HEADER, "present_match": True}}}],
        }
    return filter_(
        "envoy.filters.http.rbac",
        f"{API}.extensions.filters.http.rbac.v3.RBAC",
        {"rules": {"action": "ALLOW", "policies": policies}},
    )
