"""Routes: the model named in the body (or re-routed by the service) → that model's failover chain."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from meshgen.ir import model as ir
from meshgen.render.envoy.filters import ext_proc, stream_lua
from meshgen.render.envoy.types import (
    CLIENT_KEY_HEADERS,
    META_NS,
    MIRROR_HEADER,
    RESERVATION_HEADER,
    ROUTE_HEADER,
    SERVED_BY_HEADER,
    TENANT_HEADER,
    duration,
    openai_error,
    percent,
)

RETRY_ON = "5xx,reset,connect-failure,retriable-status-codes"
UNKNOWN_MODEL_BODY = openai_error(
    "The model does not exist or this gateway does not serve it.", "invalid_request_error", "model_not_found"
)


_STREAM_TWIN = ".stream"


def chain_cluster(model: str) -> str:
    return f"model.{model}.chain"


def stream_chain_cluster(model: str) -> str:
    """The chain's twin for the streams of hedged routes: its upstream ext_proc holds each attempt's headers until
    its first token, so Envoy hedges on time to first token (ext_proc/hold.py)."""
    return chain_cluster(model) + _STREAM_TWIN


def hedged_stream_chains(gw: ir.Gateway) -> set[str]:
    """The models whose chain has a stream twin: every chain a hedged model's route may send to."""
    return {
        name
        for m in gw.models
        if m.hedge
        for name in (m.name, *((m.canary.model,) if m.canary and m.canary.weight > 0 else ()))
    }


def _body_model_is(model: str) -> dict[str, Any]:
    return {"filter": META_NS, "path": [{"key": "model"}], "value": {"string_match": {"exact": model}}}


def retry_policy(model: ir.Model, chain_length: int) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "retry_on": RETRY_ON,
        "retriable_status_codes": [429],
        "num_retries": max(model.retries, 1 if model.hedge else 0),
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 3,
        "per_try_timeout": duration(model.per_try_timeout_ms),
        # A provider's 429 says when to come back; Envoy waits that long (capped) instead of its own back-off.
        "rate_limited_retry_back_off": {
            "reset_headers": [{"name": "retry-after", "format": "SECONDS"}],
            "max_interval": "10s",
        },
    }
    if chain_length > 1:
        # Each retry or hedge goes to the next priority: the next region, then the next failover model.
        policy["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3"
                ".PreviousPrioritiesConfig",
                "update_frequency": 1,
            },
        }
    return policy


def route_action(model: ir.Model, chains: dict[str, tuple[str, ...]], *, canary: bool) -> dict[str, Any]:
    # Providers (and their TLS certificates) expect their own name as Host, not the gateway's.
    action: dict[str, Any] = {"timeout": duration(model.timeout_ms), "auto_host_rewrite": True}
    if canary and model.canary and 0 < model.canary.weight < 100:
        beta = round(model.canary.weight * 100)
        action["weighted_clusters"] = {
            "clusters": [
                {"name": chain_cluster(model.name), "weight": 10_000 - beta},
                {"name": chain_cluster(model.canary.model), "weight": beta},
            ]
        }
    elif canary and model.canary and model.canary.weight >= 100:
        action["cluster"] = chain_cluster(model.canary.model)
    else:
        action["cluster"] = chain_cluster(model.name)
    action["retry_policy"] = retry_policy(model, len(chains[model.name]))
    if model.hedge:
        action["hedge_policy"] = {"hedge_on_per_try_timeout": True}
    if model.mirror:
        action["request_mirror_policies"] = [
            {
                "cluster": chain_cluster(model.mirror.model),
                "runtime_fraction": {
                    "default_value": percent(model.mirror.percent),
                    "runtime_key": f"meshgen.mirror.{model.name}",
                },
                "disable_shadow_host_suffix_append": True,
                "request_headers_mutations": [
                    {
                        "append": {
                            "header": {"key": MIRROR_HEADER, "value": "1"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    }
                ],
            }
        ]
    if model.affinity_header:
        action["hash_policy"] = [{"header": {"header_name": model.affinity_header}}]
    return action


def _route(name: str, match: dict[str, Any], action: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "match": {"prefix": "/", **match}, "route": action}


_IS_STREAM = {"filter": META_NS, "path": [{"key": "stream"}], "value": {"bool_match": True}}


def _with_stream(route: dict[str, Any], schema: ext_proc.Schema, *, rewrite: bool = False) -> list[dict[str, Any]]:
    """`route` preceded by its streaming twin (body `stream: true`): the same action with ext_proc counting the SSE
    usage (and rewriting the body on a re-route, which then also needs the plain route's rewrite)."""
    match = route["match"]
    action = route["route"]
    if "hedge_policy" in action:
        action = _to_stream_chains(action)
    stream = {
        "name": f"{route['name']}.stream",
        "match": match | {"dynamic_metadata": [*match.get("dynamic_metadata", ()), _IS_STREAM]},
        "route": action,
        "typed_per_filter_config": ext_proc.on(schema, count=True, rewrite=rewrite)
        | ({} if rewrite else stream_lua.on(schema)),
    }
    if rewrite:
        route = route | {"typed_per_filter_config": ext_proc.on(schema, count=False, rewrite=True)}
    return [stream, route]


def _to_stream_chains(action: dict[str, Any]) -> dict[str, Any]:
    """A hedged route's action with each chain replaced by its stream twin (:func:`stream_chain_cluster`)."""
    if "weighted_clusters" in action:
        clusters = [c | {"name": c["name"] + _STREAM_TWIN} for c in action["weighted_clusters"]["clusters"]]
        return action | {"weighted_clusters": {"clusters": clusters}}
    return action | {"cluster": action["cluster"] + _STREAM_TWIN}


def build_routes(gw: ir.Gateway, region: ir.Region) -> list[dict[str, Any]]:
    chains = dict(region.chains)
    # The service's re-route answer (a budget downgrade) outranks the body, so these come first.
    # The body names the original model: ext_proc rewrites it to the target's (ext_proc.py).
    routes = [
        route
        for m in gw.models
        if m.name in gw.downgrade_targets
        for route in _with_stream(
            _route(
                f"model.{m.name}.routed",
                {"headers": [{"name": ROUTE_HEADER, "string_match": {"exact": m.name}}]},
                route_action(m, chains, canary=False),
            ),
            m.schema_,
            rewrite=True,
        )
    ]
    for m in gw.models:
        if m.canary and m.canary.header_name:
            header = {"name": m.canary.header_name, "string_match": {"exact": m.canary.header_value}}
            beta = gw.model(m.canary.model)
            routes += _with_stream(
                _route(
                    f"model.{m.name}.beta",
                    {"headers": [header], "dynamic_metadata": [_body_model_is(m.name)]},
                    route_action(beta, chains, canary=False),
                ),
                beta.schema_,
            )
        routes += _with_stream(
            _route(
                f"model.{m.name}.canary" if m.canary else f"model.{m.name}",
                {"dynamic_metadata": [_body_model_is(m.name)]},
                route_action(m, chains, canary=True),
            ),
            m.schema_,
        )
    routes.append(
        {
            "name": "model.unknown",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": UNKNOWN_MODEL_BODY}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        }
    )
    return routes


def _hoist_common_retry_policy(routes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The most common route retry policy moves to the virtual host and routes that share it drop theirs (a
    route's own policy replaces the host's whole). Same behaviour, and a large policy's output shrinks by a sixth."""
    policies = {json.dumps(r["route"]["retry_policy"]): r["route"]["retry_policy"] for r in routes if "route" in r}
    counts = Counter(json.dumps(r["route"]["retry_policy"]) for r in routes if "route" in r)
    if not counts or counts.most_common(1)[0][1] < 2:
        return routes, {}
    shared = policies[counts.most_common(1)[0][0]]

    def slim(route: dict[str, Any]) -> dict[str, Any]:
        action = route.get("route")
        if action is None or action["retry_policy"] != shared:
            return route
        return route | {"route": {k: v for k, v in action.items() if k != "retry_policy"}}

    return [slim(r) for r in routes], {"retry_policy": shared}


def route_config(gw: ir.Gateway, region: ir.Region) -> dict[str, Any]:
    routes, shared = _hoist_common_retry_policy(build_routes(gw, region))
    return {
        "name": f"gateway.{region.name}",
        "virtual_hosts": [
            {
                "name": "llm",
                "domains": ["*"],
                "include_request_attempt_count": True,
                # The client's key and our internal answers stop at the gateway; providers get their own auth.
                # The client's address stays with us too.
                "request_headers_to_remove": [
                    *CLIENT_KEY_HEADERS,
                    TENANT_HEADER,
                    ROUTE_HEADER,
                    RESERVATION_HEADER,
                    "x-forwarded-for",
                    "x-envoy-external-address",
                ],
                **shared,
                # Which provider answered, from the chosen endpoint's metadata (a chaos hop's carries it too);
                # none on a local reply.
                "response_headers_to_add": [
                    {
                        "header": {"key": SERVED_BY_HEADER, "value": "%UPSTREAM_METADATA(meshgen:provider)%"},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
                # ext_proc opens a stream only where a route turns it on (streams, re-routes); Lua runs only on
                # counted streams.
                "typed_per_filter_config": ext_proc.off() | stream_lua.off(),
                "routes": routes,
            }
        ],
    }
