"""IR resolution and Envoy rendering details that a golden diff would show but not explain."""

from __future__ import annotations

from typing import Any

from meshgen.ir.build import build_gateway
from meshgen.policy import load_policy_text
from meshgen.render.envoy import Target, render_envoy

POLICY = """
apiVersion: meshgen/v1
name: t
regions: {us-east: {}}
provider_defaults:
  timeout: 20s
  outlier: {consecutive_5xx: 5, ejection: 1m, max_ejection_percent: 100}
providers:
  openai:
    schema: openai
    endpoints: [{url: "https://a.example.com", region: us-east}, {url: "https://b.example.com", region: us-east}]
    outlier: {consecutive_5xx: 2}
  ollama: {schema: openai, endpoints: [{url: "http://ollama:11434", region: us-east}]}
models:
  gpt-4o: {provider: openai, failover: [llama3], retry: {attempts: 2}}
  llama3: {provider: ollama, affinity: {header: x-session-id}, hedge: {after: 2s}}
tenants:
  team: {keys: ["sha256:%s"], models: [gpt-4o]}
chaos:
  ollama-slow: {target: {provider: ollama}, delay: 5s}
""" % ("a" * 64)


def _bootstrap() -> dict[str, Any]:
    gw = build_gateway(load_policy_text(POLICY, "t.yaml"), source="t.yaml")
    (doc,) = render_envoy(gw, Target.COMPOSE)
    return doc.data


def _cluster(boot: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in boot["static_resources"]["clusters"] if c["name"] == name)


def test_provider_override_changes_only_the_fields_it_names() -> None:
    gw = build_gateway(load_policy_text(POLICY, "t.yaml"), source="t.yaml")
    outlier = gw.cluster("provider.openai.us-east").outlier
    assert (outlier.consecutive_5xx, outlier.ejection_ms, outlier.max_ejection_percent) == (2, 60_000, 100)


def test_timeouts_per_attempt_and_for_the_whole_request() -> None:
    gw = build_gateway(load_policy_text(POLICY, "t.yaml"), source="t.yaml")
    gpt, llama = gw.model("gpt-4o"), gw.model("llama3")
    assert (gpt.per_try_timeout_ms, gpt.timeout_ms) == (20_000, 60_000)  # three attempts in turn
    assert (llama.per_try_timeout_ms, llama.timeout_ms) == (2_000, 20_000)  # hedges run side by side


def test_tls_names_each_endpoint_not_the_first() -> None:
    cluster = _cluster(_bootstrap(), "provider.openai.us-east")
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["upstream_http_protocol_options"] == {"auto_sni": True, "auto_san_validation": True}
    assert "sni" not in cluster["transport_socket"]["typed_config"]
    hosts = [e["endpoint"]["hostname"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert hosts == ["a.example.com", "b.example.com"]


def test_affinity_hash_survives_the_chaos_hop() -> None:
    boot = _bootstrap()
    hop = next(x for x in boot["static_resources"]["listeners"] if x["name"] == "chaos.provider.ollama.us-east")
    route = hop["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-session-id"}}]
    assert _cluster(boot, "provider.ollama.us-east.direct")["lb_policy"] == "RING_HASH"
