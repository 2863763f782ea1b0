"""Listeners: the region's gateway, and one chaos hop per provider cluster that has faults.

Gateway filter order (each position has a reason):

| # | filter                  | why here                                                                        |
|---|-------------------------|---------------------------------------------------------------------------------|
| 0 | early header mutation   | strips client `x-meshgen-*`/`x-envoy-*` before any filter, route or log sees it |
| 1 | json_to_metadata        | model/stream/max_tokens from the body; holds headers until parsed, so all later |
|   |                         | filters and the route match see the model (~35 µs, no Python)                   |
| 2 | ext_authz (HTTP/1.1)    | key → tenant, model access; answers the tenant and re-route headers that the    |
|   |                         | rate limit, RBAC and route use; the only blocking Python call                   |
| 3 | local_ratelimit         | per-replica RPM backstop (2× the limit the ledger enforces), needs (2)          |
| 4 | rbac                    | tenant × model, needs (1) and (2); defence in depth behind the service          |
| 5 | lua                     | only on counted streaming routes (filters/stream_lua.py): asks OpenAI for the   |
|   |                         | stream's usage and tells ext_proc what it needs, with no call into Python       |
| 6 | ext_proc (gRPC)         | only on streaming and re-routed routes (filters/ext_proc.py): counts SSE usage, |
|   |                         | rewrites the body's model; off everywhere else, so no stream is opened          |
| 7 | router                  | routes on the model, retries, hedges, mirrors                                   |

On the way back json_to_metadata lifts a JSON response's usage and served model into `meshgen.resp`; the gRPC access
log (access_log.py) takes them, with the reservation ext_authz answered, to the data-plane service.
"""

from __future__ import annotations

from typing import Any

from ext_proc.errors import LEDGER_UNAVAILABLE_AUTHZ_STATUS
from meshgen.ir import model as ir
from meshgen.render.envoy.access_log import usage_access_log
from meshgen.render.envoy.clusters import affinity_headers, direct_name
from meshgen.render.envoy.filters.ext_authz import ext_authz_filter
from meshgen.render.envoy.filters.ext_proc import ext_proc_filter
from meshgen.render.envoy.filters.fault import fault_filter
from meshgen.render.envoy.filters.json_to_metadata import json_to_metadata_filter
from meshgen.render.envoy.filters.local_ratelimit import local_ratelimit_filter
from meshgen.render.envoy.filters.rbac import rbac_filter
from meshgen.render.envoy.filters.stream_lua import stream_lua_filter
from meshgen.render.envoy.filters.tracing import hcm_tracing
from meshgen.render.envoy.routes import route_config
from meshgen.render.envoy.target import Placement
from meshgen.render.envoy.types import (
    API,
    AUTHZ_META_NS,
    HCM,
    META_NS,
    ROUTER,
    TENANT_HEADER,
    filter_,
    openai_error,
    stat_name,
)

_STRIP_INTERNAL = {
    "name": "envoy.http.early_header_mutation.header_mutation",
    "typed_config": {
        "@type": f"{API}.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
        # x-meshgen-* are our internal answers; x-envoy-* would let a client set its own timeouts and retries.
        "mutations": [
            {"remove_on_match": {"key_matcher": {"prefix": "x-meshgen-"}}},
            {"remove_on_match": {"key_matcher": {"prefix": "x-envoy-"}}},
        ],
    },
}

# What the operator sees per request: no bodies, no keys, no prompts.
_ACCESS_LOG_FIELDS = {
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "cluster": "%UPSTREAM_CLUSTER%",
    "duration_ms": "%DURATION%",
    "flags": "%RESPONSE_FLAGS%",
    "method": "%REQ(:METHOD)%",
    "model": f"%DYNAMIC_METADATA({META_NS}:model)%",
    "path": "%REQ(:PATH)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "route": "%ROUTE_NAME%",
    "status": "%RESPONSE_CODE%",
    "tenant": f"%DYNAMIC_METADATA({AUTHZ_META_NS}:{TENANT_HEADER})%",
    "upstream": "%UPSTREAM_HOST%",
}


def _status(code: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": code, "runtime_key": "-"}}}}


def _flag(flag: str) -> dict[str, Any]:
    return {"response_flag_filter": {"flags": [flag]}}


def _answer(match: dict[str, Any], status: int, message: str, kind: str, code: str) -> dict[str, Any]:
    return {
        "filter": match,
        "status_code": status,
        "body": {"inline_string": openai_error(message, kind, code)},
        "body_format_override": {
            "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        },
    }


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own refusals answer in the same OpenAI error shape as the service's. First match wins."""
    admission_down = {"and_filter": {"filters": [_flag("UAEX"), _status(503)]}}
    return {
        "mappers": [
            # The service unreachable with failure_mode: closed (ext_authz's status_on_error).
            _answer(
                admission_down, 503, "Admission is unavailable; retry shortly.", "server_error", "admission_unavailable"
            ),
            # The ledger's store down with `ledger_down: refuse`: the service answers 424, since ext_authz takes any
            # 5xx as the service failing (and failure_mode: open would then let the request through uncounted);
            # the client gets 503 with the service's own body (code ledger_unavailable).
            {
                "filter": {"and_filter": {"filters": [_flag("UAEX"), _status(LEDGER_UNAVAILABLE_AUTHZ_STATUS)]}},
                "status_code": 503,
            },
            # The service's own refusals already carry its OpenAI body: kept as they are, so the 403 and 429
            # below only ever rewrite Envoy's RBAC denials and local rate limits.
            {"filter": _flag("UAEX")},
            _answer(_status(403), 403, "The tenant may not use this model.", "permission_error", "model_not_allowed"),
            _answer(
                _status(429),
                429,
                "Request rate limit reached for this tenant.",
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            _answer(
                _flag("UH"),
                503,
                "No healthy provider can serve this model right now.",
                "server_error",
                "no_healthy_upstream",
            ),
            _answer(_flag("UT"), 504, "The provider did not answer in time.", "server_error", "upstream_timeout"),
        ]
    }


def _hcm_filter(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {"@type": HCM, **config},
            }
        ]
    }


def gateway_listener(gw: ir.Gateway, place: Placement, region: ir.Region) -> dict[str, Any]:
    limiter = local_ratelimit_filter(gw)
    http_filters = [
        json_to_metadata_filter(),
        ext_authz_filter(gw),
        *([limiter] if limiter else []),
        rbac_filter(gw),
        stream_lua_filter(),
        ext_proc_filter(),
        # No x-envoy-* debugging headers from us to providers or back to clients.
        filter_("envoy.filters.http.router", ROUTER, {"suppress_envoy_headers": True}),
    ]
    hcm = {
        "stat_prefix": stat_name(f"gateway.{region.name}"),
        "codec_type": "AUTO",
        # The gateway is the edge: it sets x-forwarded-for from the peer rather than trusting the client's.
        "use_remote_address": True,
        # The request id goes back to the client so a complaint can be matched to the gateway's and service's logs.
        "always_set_request_id_in_response": True,
        "early_header_mutation_extensions": [_STRIP_INTERNAL],
        # An underscore twin (x_meshgen_tenant) could be normalised into an internal header further on.
        "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
        "normalize_path": True,
        "merge_slashes": True,
        "route_config": route_config(gw, region),
        "http_filters": http_filters,
        "local_reply_config": _local_reply_config(),
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": f"{API}.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {"json_format": _ACCESS_LOG_FIELDS},
                },
            },
            # Usage of JSON responses → the data-plane service, batched (access_log.py).
            usage_access_log(traced=gw.tracing is not None),
        ],
        **(hcm_tracing(gw.tracing, region) if gw.tracing else {}),
    }
    return {
        "name": f"gateway.{region.name}",
        "address": place.listener().socket(),
        "filter_chains": [_hcm_filter(hcm)],
    }


def chaos_hop_listener(place: Placement, c: ir.ProviderCluster, hash_on: tuple[str, ...]) -> dict[str, Any]:
    """Faults here look like a failing provider to the gateway's router, so retries, failover and hedging react
    (a route-level fault is a local reply that is never retried; ENVOY-FACTS §7)."""
    hcm = {
        "stat_prefix": stat_name(f"chaos.{c.name}"),
        "route_config": {
            "name": f"chaos.{c.name}",
            "virtual_hosts": [
                {
                    "name": "provider",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": _hop_route(c, hash_on)}],
                }
            ],
        },
        "http_filters": [
            *(fault_filter(f) for f in c.faults),
            filter_("envoy.filters.http.router", ROUTER, {}),
        ],
    }
    return {
        "name": f"chaos.{c.name}",
        "address": place.chaos_hop(c).socket(),
        "filter_chains": [_hcm_filter(hcm)],
    }


def _hop_route(c: ir.ProviderCluster, hash_on: tuple[str, ...]) -> dict[str, Any]:
    # The gateway's timeouts govern; the hop only passes on, keeping the provider's Host and any session hash.
    route: dict[str, Any] = {"cluster": direct_name(c), "timeout": "0s", "auto_host_rewrite": True}
    if hash_on:
        route["hash_policy"] = [{"header": {"header_name": h}} for h in hash_on]
    return route


def all_listeners(gw: ir.Gateway, place: Placement, region: ir.Region) -> list[dict[str, Any]]:
    hashed = affinity_headers(gw)
    hops = [chaos_hop_listener(place, c, hashed.get(c.name, ())) for c in gw.clusters if c.faults]
    return [gateway_listener(gw, place, region), *hops]
