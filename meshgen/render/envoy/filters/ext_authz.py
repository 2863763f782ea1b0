"""Admission: ext_authz over HTTP/1.1 to the data-plane service, with the request body.

HTTP/1.1 rather than gRPC because a gRPC stream into Python costs ~0.5 ms of CPU per request
(../shared/PERF-FACTS.md); this call is the only blocking Python call on the request path.
"""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.envoy.types import (
    API,
    CLIENT_KEY_HEADERS,
    DOWNGRADED_HEADER,
    PROMPT_TOKENS_HEADER,
    QUEUED_HEADER,
    RESERVATION_HEADER,
    ROUTE_HEADER,
    TENANT_HEADER,
    duration,
    filter_,
)

SERVICE_CLUSTER = "meshgen.service"
PATH_PREFIX = "/authz"


def _exact(*names: str) -> list[dict[str, str]]:
    return [{"exact": n} for n in names]


def ext_authz_filter(gw: ir.Gateway) -> dict[str, Any]:
    service = gw.service
    priority_headers = sorted({t.non_critical.header for t in gw.tenants if t.non_critical})
    return filter_(
        "envoy.filters.http.ext_authz",
        f"{API}.extensions.filters.http.ext_authz.v3.ExtAuthz",
        {
            "http_service": {
                "server_uri": {
                    "uri": "http://meshgen-service",
                    "cluster": SERVICE_CLUSTER,
                    "timeout": duration(service.timeout_ms),
                },
                "path_prefix": PATH_PREFIX,
                "authorization_response": {
                    # The reservation too, so ext_proc (streams) reads it; the router strips all three (routes.py).
                    "allowed_upstream_headers": {"patterns": _exact(TENANT_HEADER, ROUTE_HEADER, RESERVATION_HEADER)},
                    # The tenant and the reservation outlive the headers (neither reaches a provider) as metadata
                    # (namespace envoy.filters.http.ext_authz), for the access logs; the gRPC one settles the
                    # reservation with the response's usage.
                    # A downgrade and a wait in the queue too: the service's per-request log line says so.
                    # A stream's prompt estimate: ext_proc settles a stream cut before its usage with it.
                    "dynamic_metadata_from_headers": {
                        "patterns": _exact(
                            TENANT_HEADER, RESERVATION_HEADER, DOWNGRADED_HEADER, QUEUED_HEADER, PROMPT_TOKENS_HEADER
                        )
                    },
                    "allowed_client_headers": {
                        "patterns": [*_exact("content-type", "retry-after"), {"prefix": "x-ratelimit-"}]
                    },
                    # A downgrade tells the client which model it asked for.
                    "allowed_client_headers_on_success": {"patterns": _exact(DOWNGRADED_HEADER)},
                },
            },
            "allowed_headers": {"patterns": _exact(*CLIENT_KEY_HEADERS, "content-type", *priority_headers)},
            "with_request_body": {
                "max_request_bytes": service.max_request_bytes,
                "allow_partial_message": False,
            },
            "failure_mode_allow": service.failure_mode == "open",
            "status_on_error": {"code": "ServiceUnavailable"},
            "clear_route_cache": True,
            "transport_api_version": "V3",
        },
    )
