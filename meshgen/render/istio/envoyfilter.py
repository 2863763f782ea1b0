"""EnvoyFilters: what Istio has no API for. Into the ingress gateway's HTTP chain, before Istio's RBAC filter (the
AuthorizationPolicy), in this order: json_to_metadata (the body's model), a header mutation (that model as
`x-meshgen-route`), ext_authz (the data-plane service's admission: its answer sets the tenant header, and the route
on a downgrade, that RBAC reads), then ext_proc (streams) before the router; the gRPC access log on the connection
manager; the upstream ext_proc on translating chains' clusters; hedging on the hedged models' routes."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.extproc_config import translated_chains
from meshgen.render.istio.common import (
    ROUTE_HEADER,
    SERVICE_GRPC_PORT,
    SERVICE_HTTP_PORT,
    SERVICE_NAME,
    TENANT_HEADER,
    gateway_selector,
    meta,
    namespace,
    seconds,
)
from meshgen.render.istio.virtualservice import cluster_host

API = "type.googleapis.com/envoy.extensions"
HCM = "envoy.filters.network.http_connection_manager"
RBAC = "envoy.filters.http.rbac"
ROUTER = "envoy.filters.http.router"


def _service_cluster(region: ir.Region, port: int) -> str:
    return f"outbound|{port}||{SERVICE_NAME}.{namespace(region.name)}.svc.cluster.local"


def _grpc(region: ir.Region) -> dict[str, Any]:
    return {"envoy_grpc": {"cluster_name": _service_cluster(region, SERVICE_GRPC_PORT)}}


def _http_filter(anchor: str, name: str, typed_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "applyTo": "HTTP_FILTER",
        "match": {
            "context": "GATEWAY",
            "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": anchor}}}},
        },
        "patch": {"operation": "INSERT_BEFORE", "value": {"name": name, "typed_config": typed_config}},
    }


def _json_to_metadata() -> dict[str, Any]:
    rule = {
        "selectors": [{"key": "model"}],
        "on_present": {"metadata_namespace": "meshgen.req", "key": "model"},
    }
    return {
        "@type": f"{API}.filters.http.json_to_metadata.v3.JsonToMetadata",
        "request_rules": {"rules": [rule], "allow_empty_content_type": True},
    }


def _route_header() -> dict[str, Any]:
    """Istio routes on headers only: the body's model becomes `x-meshgen-route` (a client's own is overwritten, its
    tenant header dropped); the service's answer overwrites the route on a downgrade."""
    return {
        "@type": f"{API}.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {
            "request_mutations": [
                {"remove": TENANT_HEADER},
                {
                    "append": {
                        "header": {"key": ROUTE_HEADER, "value": "%DYNAMIC_METADATA(meshgen.req:model)%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                },
            ]
        },
    }


def _ext_authz(gw: ir.Gateway, region: ir.Region) -> dict[str, Any]:
    return {
        "@type": f"{API}.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": gw.service.failure_mode == "open",
        "clear_route_cache": True,
        "with_request_body": {"max_request_bytes": gw.service.max_request_bytes, "allow_partial_message": False},
        "http_service": {
            "server_uri": {
                "uri": f"http://{SERVICE_NAME}:{SERVICE_HTTP_PORT}",
                "cluster": _service_cluster(region, SERVICE_HTTP_PORT),
                "timeout": seconds(gw.service.timeout_ms),
            },
            "authorization_response": {
                "allowed_upstream_headers": {
                    "patterns": [{"prefix": "x-meshgen-"}],
                }
            },
        },
    }


def _ext_proc(region: ir.Region) -> dict[str, Any]:
    return {
        "@type": f"{API}.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": _grpc(region),
        "failure_mode_allow": True,
        "processing_mode": {
            "request_header_mode": "SKIP",
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
        },
    }


def _access_log(region: ir.Region) -> dict[str, Any]:
    return {
        "applyTo": "NETWORK_FILTER",
        "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {"name": HCM}}}},
        "patch": {
            "operation": "MERGE",
            "value": {
                "typed_config": {
                    "@type": f"{API}.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "access_log": [
                        {
                            "name": "envoy.access_loggers.http_grpc",
                            "typed_config": {
                                "@type": f"{API}.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                                "common_config": {
                                    "log_name": "meshgen",
                                    "transport_api_version": "V3",
                                    "grpc_service": _grpc(region),
                                },
                            },
                        }
                    ],
                }
            },
        },
    }


def _upstream_ext_proc(gw: ir.Gateway, region: ir.Region) -> list[dict[str, Any]]:
    """Translating chains: an upstream ext_proc on each provider cluster they reach, per attempt."""
    chains = dict(region.chains)
    hosts = sorted({cluster_host(gw, c) for model in translated_chains(gw) if model in chains for c in chains[model]})
    return [
        {
            "applyTo": "CLUSTER",
            "match": {"context": "GATEWAY", "cluster": {"service": host}},
            "patch": {
                "operation": "MERGE",
                "value": {
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": f"{API}.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http_protocol_options": {}},
                            "http_filters": [
                                {"name": "envoy.filters.http.ext_proc", "typed_config": _ext_proc(region)},
                                {
                                    "name": "envoy.filters.http.upstream_codec",
                                    "typed_config": {"@type": f"{API}.filters.http.upstream_codec.v3.UpstreamCodec"},
                                },
                            ],
                        }
                    }
                },
            },
        }
        for host in hosts
    ]


def _hedging(gw: ir.Gateway) -> list[dict[str, Any]]:
    """Hedging has no Istio API: the hedged models' routes (named as in the VirtualService) get a hedge policy."""
    return [
        {
            "applyTo": "HTTP_ROUTE",
            "match": {"context": "GATEWAY", "routeConfiguration": {"vhost": {"route": {"name": name}}}},
            "patch": {"operation": "MERGE", "value": {"route": {"hedge_policy": {"hedge_on_per_try_timeout": True}}}},
        }
        for m in gw.models
        if m.hedge
        for name in ((f"model.{m.name}.canary",) if m.canary else (f"model.{m.name}",))
    ]


def envoy_filter(gw: ir.Gateway, region: ir.Region) -> dict[str, Any]:
    patches = [
        _http_filter(RBAC, "envoy.filters.http.json_to_metadata", _json_to_metadata()),
        _http_filter(RBAC, "envoy.filters.http.header_mutation", _route_header()),
        _http_filter(RBAC, "envoy.filters.http.ext_authz", _ext_authz(gw, region)),
        _http_filter(ROUTER, "envoy.filters.http.ext_proc", _ext_proc(region)),
        _access_log(region),
        *_upstream_ext_proc(gw, region),
        *_hedging(gw),
    ]
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": meta("meshgen", region.name),
        "spec": {"workloadSelector": {"labels": gateway_selector(region.name)}, "configPatches": patches},
    }


def filter_order(envoy_filter_doc: dict[str, Any], istio_chain: tuple[str, ...] = (RBAC, ROUTER)) -> list[str]:
    """The gateway's HTTP filter chain after the patches, applied in order as istiod does."""
    chain = list(istio_chain)
    for patch in envoy_filter_doc["spec"]["configPatches"]:
        if patch["applyTo"] != "HTTP_FILTER" or patch["patch"]["operation"] != "INSERT_BEFORE":
            continue
        anchor = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
        chain.insert(chain.index(anchor), patch["patch"]["value"]["name"])
    return chain
