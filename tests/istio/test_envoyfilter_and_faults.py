"""The rendered filter order (admission before Istio's RBAC) and the fault hop apart from the retries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshgen.compile import compile_gateway
from meshgen.errors import PolicyError
from meshgen.render.istio import istio_resources
from meshgen.render.istio.envoyfilter import filter_order
from meshgen.render.istio.virtualservice import check_fault_hops

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def resources() -> list[tuple[str, dict[str, Any]]]:
    return istio_resources(compile_gateway(ROOT / "policies" / "lab.yaml", source="policies/lab.yaml"))


def _of(resources: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [r for _, r in resources if r["kind"] == kind]


def test_ext_authz_answers_before_the_authorization_policy(resources: list[tuple[str, dict[str, Any]]]) -> None:
    """RBAC (the AuthorizationPolicy) reads the tenant and route headers the service's ext_authz answer sets."""
    for ef in _of(resources, "EnvoyFilter"):
        order = filter_order(ef)
        assert order == [
            "envoy.filters.http.json_to_metadata",
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.rbac",
            "envoy.filters.http.ext_proc",
            "envoy.filters.http.router",
        ]


def test_authorization_policy_reads_headers_the_service_answers(resources: list[tuple[str, dict[str, Any]]]) -> None:
    ef = _of(resources, "EnvoyFilter")[0]
    authz = next(p for p in ef["spec"]["configPatches"] if p["patch"]["value"].get("name", "").endswith("ext_authz"))
    allowed = authz["patch"]["value"]["typed_config"]["http_service"]["authorization_response"]
    assert allowed["allowed_upstream_headers"]["patterns"] == [{"prefix": "x-meshgen-"}]
    for ap in _of(resources, "AuthorizationPolicy"):
        keys = {c["key"] for rule in ap["spec"]["rules"] for c in rule["when"]}
        assert keys == {"request.headers[x-meshgen-tenant]", "request.headers[x-meshgen-route]"}


def test_envoyfilter_carries_access_log_upstream_ext_proc_and_hedging(
    resources: list[tuple[str, dict[str, Any]]],
) -> None:
    for ef in _of(resources, "EnvoyFilter"):
        applied = [p["applyTo"] for p in ef["spec"]["configPatches"]]
        assert "NETWORK_FILTER" in applied  # the gRPC access log on the connection manager
        assert "CLUSTER" in applied  # upstream ext_proc on the translating chain's clusters (gpt-4o → claude)
        hedges = [p for p in ef["spec"]["configPatches"] if p["applyTo"] == "HTTP_ROUTE"]
        assert [h["match"]["routeConfiguration"]["vhost"]["route"]["name"] for h in hedges] == ["model.gpt-4o.canary"]


def test_faults_sit_on_the_provider_hop_never_with_retries(resources: list[tuple[str, dict[str, Any]]]) -> None:
    services = _of(resources, "VirtualService")
    hops = [vs for vs in services if vs["metadata"]["name"].startswith("chaos-")]
    assert hops, "the lab's openai faults render a hop"
    for vs in services:
        for route in vs["spec"]["http"]:
            assert not ("fault" in route and "retries" in route), route["name"]
    assert all("retries" not in r for vs in hops for r in vs["spec"]["http"])
    assert all("fault" not in r for vs in services if vs not in hops for r in vs["spec"]["http"])


def test_fault_and_retries_on_one_route_is_an_error() -> None:
    route = {"name": "model.gpt-4o", "fault": {"abort": {"httpStatus": 500}}, "retries": {"attempts": 2}}
    vs = {"metadata": {"name": "llm-routes"}, "spec": {"http": [route]}}
    with pytest.raises(PolicyError) as caught:
        check_fault_hops([vs], source="policies/lab.yaml")
    assert str(caught.value) == (
        "policies/lab.yaml:1: istio VirtualService llm-routes: route 'model.gpt-4o' has both a fault and retries: "
        "Istio turns retries and timeouts off on a route with a fault (istio/istio#13705) "
        "(aim the chaos fault at the provider (chaos.*.target.provider), whose hop carries no retries) [MG313]"
    )
