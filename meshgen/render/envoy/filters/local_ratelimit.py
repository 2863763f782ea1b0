"""A per-replica backstop on each tenant's requests per minute, keyed on the tenant the service admitted.

The data-plane service enforces `rpm` exactly, across replicas, in its ledger (and queues non-critical requests
against it). This bucket only catches a service that admits far too much: it allows twice the limit, refilled
over a minute, so it never refuses what the ledger admitted (its refill is not aligned to the clock minute)."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.envoy.types import API, TENANT_HEADER, filter_


def _always() -> dict[str, Any]:
    return {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}


BACKSTOP = 2


def local_ratelimit_filter(gw: ir.Gateway) -> dict[str, Any] | None:
    limited = [(t.name, t.limits.rpm) for t in gw.tenants if t.limits.rpm]
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
                    "entries": [{"key": "tenant", "value": name}],
                    "token_bucket": {
                        "max_tokens": BACKSTOP * rpm,
                        "tokens_per_fill": BACKSTOP * rpm,
                        "fill_interval": "60s",
                    },
                }
                for name, rpm in limited
            ],
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    )
