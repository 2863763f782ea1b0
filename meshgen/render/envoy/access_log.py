"""The usage access log: Envoy's gRPC access-log service (ALS) to the data-plane service.

Every admitted request's log entry goes, batched, to `envoy.service.accesslog.v3.AccessLogService` on the service's
gRPC port, carrying its dynamic metadata (`HTTPAccessLogEntry.common_properties.metadata`):

| namespace                      | keys                                                                         |
|--------------------------------|------------------------------------------------------------------------------|
| `envoy.filters.http.ext_authz` | `x-meshgen-reservation`, `x-meshgen-tenant` (the service's admission answer) |
| `meshgen.req`                  | `model`, `stream`, `max_tokens` (request body)                               |
| `meshgen.resp`                 | `prompt_tokens`, `completion_tokens` or `input_tokens`, `output_tokens`,     |
|                                | `model` (JSON response body)                                                 |

The service settles the reservation with the usage. Batching (flushed every 0.5 s or at 16 KiB) costs Envoy ~7 µs per
request instead of a gRPC stream per request (~0.5 ms, PERF-FACTS.md). Only entries with a reservation are sent:
nothing else can be settled.
"""

from __future__ import annotations

from typing import Any

from meshgen.render.envoy.filters.tracing import TRACE_HEADER
from meshgen.render.envoy.types import API, AUTHZ_META_NS, RESERVATION_HEADER, SERVED_BY_HEADER

ALS_CLUSTER = "meshgen.service.grpc"
LOG_NAME = "meshgen.usage"
FLUSH_INTERVAL = "0.5s"
BUFFER_BYTES = 16384


def _has_reservation() -> dict[str, Any]:
    return {
        "metadata_filter": {
            "matcher": {
                "filter": AUTHZ_META_NS,
                "path": [{"key": RESERVATION_HEADER}],
                "value": {"present_match": True},
            },
            "match_if_key_not_found": False,
        }
    }


def usage_access_log(*, traced: bool = False) -> dict[str, Any]:
    """With tracing, each entry also carries the request's `traceparent` (the gateway's span): the service's span
    for the request is its child."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": _has_reservation(),
        "typed_config": {
            "@type": f"{API}.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": ALS_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_flush_interval": FLUSH_INTERVAL,
                "buffer_size_bytes": BUFFER_BYTES,
            },
            # Which provider answered (the route sets it from the endpoint's metadata): hedges won are counted;
            # with a provider's 429/503, how long it asks to be left alone (non-critical requests wait it out).
            "additional_response_headers_to_log": [SERVED_BY_HEADER, "retry-after"],
            **({"additional_request_headers_to_log": [TRACE_HEADER]} if traced else {}),
        },
    }
