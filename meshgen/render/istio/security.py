"""PeerAuthentication STRICT, RequestAuthentication for JWT regions, AuthorizationPolicy (tenant → models).

The AuthorizationPolicy reads `x-meshgen-tenant` and `x-meshgen-route`, which the data-plane service's admission
answer sets: it only holds because the EnvoyFilter puts ext_authz before `envoy.filters.http.rbac`
(envoyfilter.py; tests/istio check the rendered order)."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.istio.common import ROUTE_HEADER, TENANT_HEADER, gateway_selector, meta


def peer_authentication(region: ir.Region) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": meta("default", region.name),
        "spec": {"mtls": {"mode": "STRICT"}},
    }


def request_authentication(region: ir.Region) -> dict[str, Any] | None:
    if region.jwt is None:
        return None
    rule: dict[str, Any] = {"issuer": region.jwt.issuer, "audiences": list(region.jwt.audiences)}
    if region.jwt.jwks_uri:
        rule["jwksUri"] = region.jwt.jwks_uri
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": meta("jwt", region.name),
        "spec": {"selector": {"matchLabels": gateway_selector(region.name)}, "jwtRules": [rule]},
    }


def tenant_models(gw: ir.Gateway, region: ir.Region) -> dict[str, Any]:
    """ALLOW: a tenant's requests only to its models (and the models they are downgraded to)."""
    rules = [
        {
            "when": [
                {"key": f"request.headers[{TENANT_HEADER}]", "values": [t.name]},
                {"key": f"request.headers[{ROUTE_HEADER}]", "values": sorted({*t.models, *gw.downgrade_targets})},
            ]
        }
        for t in gw.tenants
    ]
    return {"selector": {"matchLabels": gateway_selector(region.name)}, "action": "ALLOW", "rules": rules}


def authorization_policy(gw: ir.Gateway, region: ir.Region) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta("tenant-models", region.name),
        "spec": tenant_models(gw, region),
    }
