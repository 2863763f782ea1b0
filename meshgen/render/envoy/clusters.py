"""Clusters: one per provider and region, an aggregate per model chain, the data-plane service (HTTP and gRPC)."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.envoy.access_log import ALS_CLUSTER
from meshgen.render.envoy.filters.ext_authz import SERVICE_CLUSTER
from meshgen.render.envoy.filters.ext_proc import hold_filters, translate_filters
from meshgen.render.envoy.filters.tracing import OTLP_CLUSTER
from meshgen.render.envoy.routes import chain_cluster, hedged_stream_chains, stream_chain_cluster
from meshgen.render.envoy.target import Address, Placement
from meshgen.render.envoy.types import API, HTTP_OPTIONS, duration, stat_name
from meshgen.render.extproc_config import translated_chains

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _http_options(*, tls: bool = False, http2: bool = False) -> dict[str, Any]:
    # With TLS, SNI and the certificate check follow each endpoint's own name (auto_host_rewrite sets it as Host).
    sni = {"upstream_http_protocol_options": {"auto_sni": True, "auto_san_validation": True}} if tls else {}
    explicit: dict[str, Any] = {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS,
            **sni,
            "explicit_http_config": explicit,
        }
    }


def _load_assignment(
    name: str, endpoints: list[tuple[Address, int, dict[str, Any]]], *, region: str | None = None
) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {
                **({"locality": {"region": region}} if region else {}),
                "lb_endpoints": [
                    {"endpoint": {"address": a.socket(), "hostname": a.host}, "load_balancing_weight": weight}
                    | ({"metadata": {"filter_metadata": {"meshgen": meta}}} if meta else {})
                    for a, weight, meta in endpoints
                ],
            }
        ],
    }


def _discovery(addresses: list[Address]) -> dict[str, Any]:
    if all(a.is_ip for a in addresses):
        return {"type": "STATIC"}
    return {"type": "STRICT_DNS", "dns_lookup_family": "V4_PREFERRED"}


def _tls() -> dict[str, Any]:
    return {
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{API}.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": CA_BUNDLE}}},
            },
        }
    }


def _resilience(c: ir.ProviderCluster) -> dict[str, Any]:
    o, b = c.outlier, c.breakers
    return {
        # No panic routing: an ejected provider stays out, and traffic moves to the next priority in the chain
        # (or gets a clear 503) instead of being sprayed back onto the failing endpoints.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "outlier_detection": {
            "consecutive_5xx": o.consecutive_5xx,
            "enforcing_consecutive_5xx": 100,
            "interval": duration(o.interval_ms),
            "base_ejection_time": duration(o.ejection_ms),
            "max_ejection_percent": o.max_ejection_percent,
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": b.max_connections,
                    "max_pending_requests": b.max_pending,
                    "max_requests": b.max_requests,
                    "max_retries": b.max_retries,
                }
            ]
        },
    }


def affinity_headers(gw: ir.Gateway) -> dict[str, tuple[str, ...]]:
    """Cluster → the headers its models hash on. Affinity (same session → same endpoint) needs ring hash on every
    cluster such a model can land on, and the hash carried through a chaos hop."""
    header = {m.name: m.affinity_header for m in gw.models if m.affinity_header}
    found: dict[str, set[str]] = {}
    for region in gw.regions:
        for model, chain in region.chains:
            if model in header:
                for cluster in chain:
                    found.setdefault(cluster, set()).add(header[model])
    return {cluster: tuple(sorted(headers)) for cluster, headers in found.items()}


def direct_name(c: ir.ProviderCluster) -> str:
    return f"{c.name}.direct"


def provider_clusters(place: Placement, c: ir.ProviderCluster, *, ring_hash: bool) -> list[dict[str, Any]]:
    """The router-facing `provider.<p>.<region>`; with faults it goes through a chaos hop to `.direct`."""
    endpoints = [(place.endpoint(e), e.weight, {"provider": c.provider, "endpoint": e.name}) for e in c.endpoints]
    tls = any(place.tls(e) for e in c.endpoints)  # one scheme per cluster: the policy checks refuse a mix
    real = {
        "connect_timeout": duration(c.connect_timeout_ms),
        **_discovery([a for a, _, _ in endpoints]),
        "lb_policy": "RING_HASH" if ring_hash else "LEAST_REQUEST",
        "typed_extension_protocol_options": _http_options(tls=tls),
        **(_tls() if tls else {}),
    }
    if not c.faults:
        return [
            {
                "name": c.name,
                "alt_stat_name": stat_name(c.name),
                **real,
                **_resilience(c),
                "load_assignment": _load_assignment(c.name, endpoints, region=c.region),
            }
        ]
    hop = place.chaos_hop(c)
    return [
        {
            "name": c.name,
            "alt_stat_name": stat_name(c.name),
            "connect_timeout": duration(c.connect_timeout_ms),
            "type": "STATIC",
            "lb_policy": "ROUND_ROBIN",
            "typed_extension_protocol_options": _http_options(),
            **_resilience(c),
            "load_assignment": _load_assignment(c.name, [(hop, 1, {"provider": c.provider, "chaos_hop": c.name})]),
        },
        {
            "name": direct_name(c),
            "alt_stat_name": stat_name(direct_name(c)),
            **real,
            **_resilience(c),
            "load_assignment": _load_assignment(direct_name(c), endpoints, region=c.region),
        },
    ]


def _upstream_filters(filters: list[dict[str, Any]]) -> dict[str, Any]:
    options = {"@type": HTTP_OPTIONS, "explicit_http_config": {"http_protocol_options": {}}, "http_filters": filters}
    return {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options}}


def _aggregate(
    name: str, chain: tuple[str, ...], max_retries: int, filters: list[dict[str, Any]] | None
) -> dict[str, Any]:
    return {
        "name": name,
        "alt_stat_name": stat_name(name),
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {"@type": f"{API}.extensions.clusters.aggregate.v3.ClusterConfig", "clusters": list(chain)},
        },
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": max_retries}]},
        **(_upstream_filters(filters) if filters else {}),
    }


def chain_clusters(gw: ir.Gateway, region: ir.Region) -> list[dict[str, Any]]:
    """`model.<m>.chain`: an aggregate whose priorities are the failover order (ENVOY-FACTS §1); one that crosses
    schemas translates each attempt in its upstream ext_proc. A chain a hedged route sends streams to has a twin,
    `model.<m>.chain.stream`, whose upstream ext_proc holds each attempt's headers until its first token."""
    clusters = []
    translating = translated_chains(gw)
    twins = hedged_stream_chains(gw)
    fail_open = gw.service.failure_mode == "open"
    for model, chain in region.chains:
        # Hedges and retries are counted on the route's target, this aggregate (default 3): give it what its
        # providers allow between them, so none is silently dropped.
        max_retries = sum(gw.cluster(c).breakers.max_retries for c in chain)

        translates = model in translating
        clusters.append(
            _aggregate(
                chain_cluster(model),
                chain,
                max_retries,
                translate_filters(model, fail_open=fail_open) if translates else None,
            )
        )
        if model in twins:
            hold_ms = gw.model(model).timeout_ms
            filters = (
                translate_filters(model, fail_open=fail_open, hold_ms=hold_ms)
                if translates
                else hold_filters(model, hold_ms=hold_ms)
            )
            clusters.append(_aggregate(stream_chain_cluster(model), chain, max_retries, filters))
    return clusters


def _service_cluster(name: str, address: Address, *, http2: bool) -> dict[str, Any]:
    return {
        "name": name,
        "alt_stat_name": stat_name(name),
        "connect_timeout": "1s",
        **_discovery([address]),
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": _http_options(http2=http2),
        "circuit_breakers": {
            "thresholds": [
                {"priority": "DEFAULT", "max_connections": 4096, "max_pending_requests": 4096, "max_requests": 4096}
            ]
        },
        "load_assignment": _load_assignment(name, [(address, 1, {})]),
    }


def service_clusters(place: Placement) -> list[dict[str, Any]]:
    """The data-plane service: admission over HTTP/1.1, and its gRPC port over HTTP/2 (access log, ext_proc)."""
    return [
        _service_cluster(SERVICE_CLUSTER, place.service(), http2=False),
        _service_cluster(ALS_CLUSTER, place.service_grpc(), http2=True),
    ]


def all_clusters(gw: ir.Gateway, place: Placement, region: ir.Region) -> list[dict[str, Any]]:
    hashed = affinity_headers(gw)
    providers = [cl for c in gw.clusters for cl in provider_clusters(place, c, ring_hash=c.name in hashed)]
    return [*service_clusters(place), *otlp_clusters(gw), *providers, *chain_clusters(gw, region)]


def otlp_clusters(gw: ir.Gateway) -> list[dict[str, Any]]:
    """The OTLP/gRPC collector Envoy's tracer sends spans to, when the policy turns tracing on."""
    t = gw.tracing
    return [] if t is None else [_service_cluster(OTLP_CLUSTER, Address(t.otlp_host, t.otlp_port), http2=True)]
