"""Per-tenant requests per minute, counted by Envoy itself on the tenant header the service answered with."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.envoy.types import API, TENANT_HEADER, filter_


def _always() -> dict[str, Any]:
    return {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


def local_ratelimit_filter(gw: ir.Gateway) -> dict[str, Any] | None:
    limited = [t for t in gw.tenants if t.limits.rpm]
    if not limited:
        return None
    return filter_(
        "envoy.filters.http.local_ratelimit",
        f"{API}.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        {
            "stat_prefix": "tenant_rpm",
            "filter_enabled": _always(),
            "filter_enforced": _always(),
            "rate_limits": [
                {"actions": [{"request_headers": {"header_name": TENANT_HEADER, "descriptor_key": "tenant"}}]}
            ],
            "descriptors": [
                {
                    "entries": [{"key": "tenant", "value": t.name}],
                    "token_bucket": {
                        "max_tokens": t.limits.rpm,
                        "tokens_per_fill": t.limits.rpm,
                        "fill_interval": "60s",
                    },
                }
                for t in limited
            ],
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    )
