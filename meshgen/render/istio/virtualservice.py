"""VirtualServices: the region's model routes (canary weights, `X-Model-Version` match, mirror, retries, per-try
timeouts) on the ingress Gateway, and one fault hop per faulted provider, bound to the mesh.

Istio turns retries and timeouts off on a route that carries a fault (istio/istio#13705), so faults never sit on
the route the retries live on: they go on the provider's own hop. `check_fault_hops` enforces it on the output.
"""

from __future__ import annotations

from typing import Any

from meshgen.errors import PolicyError, Problem
from meshgen.ir import model as ir
from meshgen.render.istio.common import ROUTE_HEADER, host_of, k8s_name, meta, seconds

RETRY_ON = "5xx,reset,connect-failure,retriable-status-codes"


def cluster_host(gw: ir.Gateway, cluster: str) -> str:
    """The endpoint's own host; a cluster of several hosts gets one name (its ServiceEntry lists the endpoints)."""
    c = gw.cluster(cluster)
    if len({ep.host for ep in c.endpoints}) > 1:
        return f"{k8s_name(c.name)}.meshgen.internal"
    return host_of(c.endpoints[0], c.region)


def _destination(gw: ir.Gateway, region: ir.Region, model: str) -> dict[str, Any]:
    cluster = dict(region.chains)[model][0]
    c = gw.cluster(cluster)
    return {"host": cluster_host(gw, cluster), "port": {"number": c.endpoints[0].port}}


def _route(gw: ir.Gateway, region: ir.Region, name: str, model: ir.Model, match: dict[str, Any]) -> dict[str, Any]:
    route: dict[str, Any] = {"name": name, "match": [match]}
    canary = model.canary if name.endswith(".canary") else None
    if canary and 0 < canary.weight < 100:
        beta = round(canary.weight)
        route["route"] = [
            {"destination": _destination(gw, region, model.name), "weight": 100 - beta},
            {"destination": _destination(gw, region, canary.model), "weight": beta},
        ]
    else:
        target = canary.model if canary and canary.weight >= 100 else model.name
        route["route"] = [{"destination": _destination(gw, region, target)}]
    route["timeout"] = seconds(model.timeout_ms)
    route["retries"] = {
        "attempts": max(model.retries, 1 if model.hedge else 0),
        "perTryTimeout": seconds(model.per_try_timeout_ms),
        "retryOn": RETRY_ON,
    }
    if model.mirror:
        route["mirror"] = _destination(gw, region, model.mirror.model)
        route["mirrorPercentage"] = {"value": model.mirror.percent}
    return route


def _model_match(model: str, **headers: dict[str, str]) -> dict[str, Any]:
    return {"headers": {ROUTE_HEADER: {"exact": model}, **headers}}


def model_routes(gw: ir.Gateway, region: ir.Region) -> dict[str, Any]:
    """The data-plane service's admission answer names the model (`x-meshgen-route`): the ingress routes on it."""
    http = []
    for m in gw.models:
        if m.canary and m.canary.header_name:
            beta = gw.model(m.canary.model)
            match = _model_match(m.name, **{m.canary.header_name.lower(): {"exact": m.canary.header_value}})
            http.append(_route(gw, region, f"model.{m.name}.beta", beta, match))
        name = f"model.{m.name}.canary" if m.canary else f"model.{m.name}"
        http.append(_route(gw, region, name, m, _model_match(m.name)))
    http.append({"name": "model.unknown", "directResponse": {"status": 404}})
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": meta("llm-routes", region.name),
        "spec": {"hosts": ["*"], "gateways": ["llm-gateway"], "http": http},
    }


def _fault(f: ir.Fault) -> dict[str, Any]:
    fault: dict[str, Any] = {}
    # Compiled in at 0 %, like the Envoy chaos hop; raise the percentage to switch it on.
    if f.delay_ms is not None:
        fault["delay"] = {"fixedDelay": seconds(f.delay_ms), "percentage": {"value": 0}}
    if f.abort_status is not None:
        fault["abort"] = {"httpStatus": f.abort_status, "percentage": {"value": 0}}
    return fault


def fault_hops(gw: ir.Gateway, region: ir.Region) -> list[dict[str, Any]]:
    """One VirtualService per faulted provider used in this region: the hop to the provider, without retries."""
    used = {c for _, chain in region.chains for c in chain}
    hops = []
    for c in gw.clusters:
        if not c.faults or c.name not in used:
            continue
        host = cluster_host(gw, c.name)
        http = [
            {"name": f"chaos.{f.name}", "fault": _fault(f), "route": [{"destination": {"host": host}}]}
            for f in c.faults
        ]
        hops.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": meta(f"chaos-{k8s_name(c.name)}", region.name),
                "spec": {"hosts": [host], "gateways": ["mesh"], "http": http},
            }
        )
    return hops


def check_fault_hops(services: list[dict[str, Any]], *, source: str) -> None:
    """A route with a fault must not be the one retries live on: Istio would silently drop the retries (MG313)."""
    for vs in services:
        for route in vs["spec"].get("http", []):
            if "fault" in route and route.get("retries", {}).get("attempts", 0):
                message = (
                    f"route '{route.get('name')}' has both a fault and retries: Istio turns retries and timeouts "
                    "off on a route with a fault (istio/istio#13705)"
                )
                hint = "aim the chaos fault at the provider (chaos.*.target.provider), whose hop carries no retries"
                where = f"istio VirtualService {vs['metadata']['name']}"
                raise PolicyError([Problem(source, 1, where, message, hint, "MG313")])
