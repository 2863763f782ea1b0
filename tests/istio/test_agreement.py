"""The lab policy's Envoy and Istio renderings agree, seen from the IR: per region, each model route's provider
clusters and weights, its mirror, its retries, each provider cluster's outlier settings, and which models each
tenant may use. Both sides are parsed from the rendered documents into the same small summary."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from meshgen.compile import compile_gateway
from meshgen.ir import model as ir
from meshgen.render.envoy import Target, render_envoy
from meshgen.render.istio import istio_resources
from meshgen.render.istio.virtualservice import cluster_host

ROOT = Path(__file__).resolve().parents[2]
Summary = dict[str, Any]
_DENOMINATOR = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


def _ms(duration: str) -> int:
    assert duration.endswith("s"), duration
    return round(float(duration[:-1]) * 1000)


@pytest.fixture(scope="module")
def gw() -> ir.Gateway:
    return compile_gateway(ROOT / "policies" / "lab.yaml", source="policies/lab.yaml")


def envoy_summary(gw: ir.Gateway, region: str) -> Summary:
    doc = next(d for d in render_envoy(gw, Target.COMPOSE) if d.path == f"compose/envoy/{region}.yaml")
    static = doc.data["static_resources"]
    clusters = {c["name"]: c for c in static["clusters"]}

    def primary(chain: str) -> str:
        return str(clusters[chain]["cluster_type"]["typed_config"]["clusters"][0])

    hcm = static["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    routes: Summary = {}
    for route in vhost["routes"]:
        name = route["name"]
        if name == "model.unknown" or name.endswith((".stream", ".routed")):
            continue
        action = route["route"]
        if "weighted_clusters" in action:
            total = sum(c["weight"] for c in action["weighted_clusters"]["clusters"])
            split = sorted(
                (primary(c["name"]), c["weight"] * 100 / total) for c in action["weighted_clusters"]["clusters"]
            )
        else:
            split = [(primary(action["cluster"]), 100.0)]
        retry = action.get("retry_policy", vhost.get("retry_policy"))
        mirror = None
        if action.get("request_mirror_policies"):
            m = action["request_mirror_policies"][0]
            fraction = m["runtime_fraction"]["default_value"]
            mirror = (primary(m["cluster"]), fraction["numerator"] * 100 / _DENOMINATOR[fraction["denominator"]])
        routes[name] = {
            "split": split,
            "mirror": mirror,
            "retries": (retry["num_retries"], _ms(retry["per_try_timeout"])),
        }
    used = {c for summary in routes.values() for c, _ in summary["split"]}
    outliers = {
        name: (
            o["consecutive_5xx"],
            _ms(o["interval"]),
            _ms(o["base_ejection_time"]),
            o["max_ejection_percent"],
        )
        for name in sorted(used)
        for o in [clusters[name]["outlier_detection"]]
    }
    rbac = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.rbac")
    permissions = {}
    for policy_name, policy in rbac["typed_config"]["rules"]["policies"].items():
        regex = policy["permissions"][0]["sourced_metadata"]["metadata_matcher"]["value"]["string_match"]["safe_regex"]
        permissions[policy_name.removeprefix("tenant.")] = set(
            re.fullmatch(r"\^\((.*)\)\$", regex["regex"]).group(1).replace("\\-", "-").split("|")  # type: ignore[union-attr]
        )
    return {"routes": routes, "outliers": outliers, "permissions": permissions}


def istio_summary(gw: ir.Gateway, region: str) -> Summary:
    resources = [r for reg, r in istio_resources(gw) if reg == region]
    by_host = {cluster_host(gw, c.name): c.name for c in gw.clusters}
    vs = next(r for r in resources if r["kind"] == "VirtualService" and r["metadata"]["name"] == "llm-routes")
    routes: Summary = {}
    for route in vs["spec"]["http"]:
        if route["name"] == "model.unknown":
            continue
        split = sorted((by_host[d["destination"]["host"]], float(d.get("weight", 100))) for d in route["route"])
        mirror = (by_host[route["mirror"]["host"]], route["mirrorPercentage"]["value"]) if "mirror" in route else None
        retries = (route["retries"]["attempts"], _ms(route["retries"]["perTryTimeout"]))
        routes[route["name"]] = {"split": split, "mirror": mirror, "retries": retries}
    outliers = {}
    for dr in (r for r in resources if r["kind"] == "DestinationRule"):
        o = dr["spec"]["trafficPolicy"]["outlierDetection"]
        name = by_host[dr["spec"]["host"]]
        outliers[name] = (
            o["consecutive5xxErrors"],
            _ms(o["interval"]),
            _ms(o["baseEjectionTime"]),
            o["maxEjectionPercent"],
        )
    used = {c for summary in routes.values() for c, _ in summary["split"]}
    ap = next(r for r in resources if r["kind"] == "AuthorizationPolicy")
    own = {t.name: t.models for t in gw.tenants}
    permissions = {}
    for rule in ap["spec"]["rules"]:
        conditions = {c["key"]: c["values"] for c in rule["when"]}
        (tenant,) = conditions["request.headers[x-meshgen-tenant]"]
        # Istio's RBAC sees the route header, which names the downgrade target on a downgraded request: those are
        # allowed on top of the tenant's models (Envoy's RBAC sees the body's original model instead).
        extra = gw.downgrade_targets - set(own[tenant])
        permissions[tenant] = set(conditions["request.headers[x-meshgen-route]"]) - extra
    return {"routes": routes, "outliers": {c: outliers[c] for c in sorted(used)}, "permissions": permissions}


@pytest.mark.parametrize("region", ["us-east", "us-west", "europe"])
def test_envoy_and_istio_agree_on_the_lab_policy(gw: ir.Gateway, region: str) -> None:
    envoy, istio = envoy_summary(gw, region), istio_summary(gw, region)
    assert envoy["routes"].keys() == istio["routes"].keys()
    for name in envoy["routes"]:
        assert envoy["routes"][name] == istio["routes"][name], name
    assert envoy["outliers"] == istio["outliers"]
    assert envoy["permissions"] == istio["permissions"]


def test_the_summary_sees_every_feature(gw: ir.Gateway) -> None:
    routes = envoy_summary(gw, "us-east")["routes"]
    assert routes["model.gpt-4o.canary"]["split"] == [
        ("provider.openai.us-east", 10.0),
        ("provider.openai.us-east", 90.0),
    ]
    assert routes["model.gpt-4o.canary"]["mirror"] == ("provider.ollama.us-east", 100.0)
    assert "model.gpt-4o.beta" in routes
