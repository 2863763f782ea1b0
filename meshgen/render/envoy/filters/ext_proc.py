"""ext_proc (gRPC) into the data-plane service, only on the routes whose body must be streamed or rewritten.

A gRPC stream into Python costs ~0.3 ms of CPU per request (../shared/PERF-FACTS.md), so no other route opens one:
the virtual host turns the filter off (`ExtProcPerRoute.disabled`) and only these routes turn it on, each with its
own processing mode and the job named in the stream's initial metadata (ext_proc/processor.py):

| route                    | job            | request      | response body | failure mode                          |
|--------------------------|----------------|--------------|---------------|---------------------------------------|
| `model.<m>.stream`       | count          | nothing: Lua | STREAMED      | open: a broken counter never breaks a |
|                          |                | asks for     |               | stream; the reservation then settles  |
|                          |                | usage        |               | as estimated                          |
| `model.<m>.routed`       | rewrite        | headers, body| none          | closed: a downgrade must not reach    |
|                          |                | (BUFFERED)   |               | the cheaper provider as the dear model|
| `model.<m>.routed.stream`| rewrite, count | headers, body| STREAMED      | closed                                |

A stream that is only counted opens its gRPC stream at its first response chunk, which carries in its
`metadata_context` what the request messages would have said (ext_authz's answer; the Lua filter's
`meshgen.stream`, filters/stream_lua.py): one message fewer per chunk of the request, and no round trip into
Python before the provider is called.

Why not `observability_mode` for the counted streams (Envoy would never wait for Python, and the Lua filter could hide
the usage event): Envoy resets each observed gRPC stream as soon as the HTTP stream ends, so a service even slightly
behind loses the stream's last chunks, the usage event among them — measured: at 2,500 streams/s, 7,781 of 12,586
streams went uncounted, and `deferred_close_timeout: 30s` changed nothing. Answered, each chunk waits one round trip
into Python (~0.5 ms at idle), and nothing is lost.

Why `ExtProcPerRoute` and not `HttpFilter.disabled` + a route's `FilterConfig`: Envoy picks the HCM-disabled filters
to run when it builds the filter chain, from the route matched on the request headers alone — before
json_to_metadata has read `stream` from the body and before ext_authz's answer re-selects the route (not measured
here; read from Envoy's filter manager). The ext_proc filter reads its own per-route config when it runs, on the
route as re-selected; tests/behaviour/test_streaming.py shows streams opened only on these routes.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from meshgen.render.envoy.access_log import ALS_CLUSTER
from meshgen.render.envoy.types import API, AUTHZ_META_NS, duration, filter_

NAME = "envoy.filters.http.ext_proc"
PER_ROUTE = f"{API}.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
MESSAGE_TIMEOUT = "0.3s"
JOBS_KEY = "x-meshgen-jobs"
SCHEMA_KEY = "x-meshgen-schema"
CHAIN_KEY = "x-meshgen-chain"
HOLD_KEY = "x-meshgen-hold-ms"
TRANSLATE_NAME = "meshgen.translate"
HOLD_NAME = "meshgen.hold"
EXT_PROC = f"{API}.extensions.filters.http.ext_proc.v3.ExternalProcessor"
TRANSLATE_TIMEOUT = "1s"
"""One message's bound: a whole request or JSON answer is translated at once (large prompts take longer)."""

Schema = Literal["openai", "anthropic"]
STREAM_NAMESPACE = "meshgen.stream"
"""The Lua filter's (filters/stream_lua.py)."""


def _mode(*, request: bool, response_body: bool) -> dict[str, Any]:
    return {
        # The route header; a body reply may only mutate headers (content-length) when they were sent.
        "request_header_mode": "SEND" if request else "SKIP",
        "request_body_mode": "BUFFERED" if request else "NONE",
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED" if response_body else "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }


def ext_proc_filter() -> dict[str, Any]:
    """The filter, placed after RBAC; it does nothing where the route does not turn it on."""
    return filter_(
        NAME,
        f"{API}.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        {
            "grpc_service": {"envoy_grpc": {"cluster_name": ALS_CLUSTER}},
            "failure_mode_allow": True,
            "message_timeout": MESSAGE_TIMEOUT,
            "processing_mode": _mode(request=True, response_body=True),
        },
    )


def off() -> dict[str, Any]:
    """The virtual host's default: no stream."""
    return {NAME: {"@type": PER_ROUTE, "disabled": True}}


def on(schema: Schema, *, count: bool, rewrite: bool) -> dict[str, Any]:
    """A route's `typed_per_filter_config` turning the filter on for its job."""
    jobs = ",".join(j for j, wanted in (("rewrite", rewrite), ("count", count)) if wanted)
    overrides: dict[str, Any] = {
        "processing_mode": _mode(request=rewrite, response_body=count),
        "grpc_initial_metadata": [{"key": JOBS_KEY, "value": jobs}, {"key": SCHEMA_KEY, "value": schema}],
        "failure_mode_allow": not rewrite,
    }
    if not rewrite:
        overrides["metadata_options"] = {"forwarding_namespaces": {"untyped": [AUTHZ_META_NS, STREAM_NAMESPACE]}}
    return {NAME: {"@type": PER_ROUTE, "overrides": overrides}}


def translate_filters(model: str, *, fail_open: bool, hold_ms: int | None = None) -> list[dict[str, Any]]:
    """The upstream filter chain of a translating `model.<m>.chain`: ext_proc (per attempt: path, auth, body and
    content-length for the attempt's provider; the answer back in the client's schema), then the codec.

    `fail_open` is the service's failure mode: with the service down, open sends each attempt on untranslated (an
    attempt to a provider of the client's schema still succeeds), closed fails it.

    `hold_ms` (the stream twin of a hedged chain, routes.stream_chain_cluster): the filter also holds each
    attempt's response headers until its first token, for at most that long (ext_proc/hold.py)."""
    config: dict[str, Any] = {
        "grpc_service": {
            "envoy_grpc": {"cluster_name": ALS_CLUSTER},
            "initial_metadata": [
                {"key": JOBS_KEY, "value": "translate" if hold_ms is None else "translate,hold"},
                {"key": CHAIN_KEY, "value": model},
                *([] if hold_ms is None else [{"key": HOLD_KEY, "value": str(hold_ms)}]),
            ],
        },
        "failure_mode_allow": fail_open,
        "message_timeout": TRANSLATE_TIMEOUT,
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "request_attributes": ["xds.upstream_host_metadata"],
        # An attempt in the client's own schema answers its headers with response modes SKIP/NONE.
        "allow_mode_override": True,
        "mutation_rules": {"allow_all_routing": True},
    }
    return [filter_(TRANSLATE_NAME, EXT_PROC, config | _holding(hold_ms)), _UPSTREAM_CODEC]


def hold_filters(model: str, *, hold_ms: int) -> list[dict[str, Any]]:
    """The upstream filter chain of the stream twin of a hedged chain that does not translate: ext_proc holding
    each attempt's response headers until its first token (then it leaves the stream), then the codec. Fails
    open: with the service down a stream is still served, hedged on its headers only."""
    config = {
        "grpc_service": {
            "envoy_grpc": {"cluster_name": ALS_CLUSTER},
            "initial_metadata": [
                {"key": JOBS_KEY, "value": "hold"},
                {"key": CHAIN_KEY, "value": model},
                {"key": HOLD_KEY, "value": str(hold_ms)},
            ],
        },
        "failure_mode_allow": True,
        "message_timeout": MESSAGE_TIMEOUT,
        "processing_mode": {
            "request_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
    }
    return [filter_(HOLD_NAME, EXT_PROC, config | _holding(hold_ms)), _UPSTREAM_CODEC]


def _holding(hold_ms: int | None) -> dict[str, Any]:
    """What holding needs: the body sent on while the headers' reply waits (else Envoy waits for the reply
    first: a deadlock, measured), and room for the service to extend its message timeout over the hold."""
    if hold_ms is None:
        return {}
    return {"send_body_without_waiting_for_header_response": True, "max_message_timeout": duration(hold_ms)}


_UPSTREAM_CODEC: Final = filter_(
    "envoy.filters.http.upstream_codec", f"{API}.extensions.filters.http.upstream_codec.v3.UpstreamCodec", {}
)
