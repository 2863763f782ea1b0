"""Tracing: the HCM's OpenTelemetry tracer, spans over OTLP/gRPC to the policy's collector (`meshgen.otlp`).

Envoy starts (or continues, from a client's `traceparent`) a trace per request, at the policy's
`observability.sample_percent`, and sends W3C `traceparent` to the data-plane service's admission call and to the
provider. The gRPC access log carries the request's `traceparent` (access_log.py), so the service's own span — one
per request, with the `gen_ai.*` attributes — is made when the request is settled, off the request path, as a child
of the gateway's span. Without `observability.otlp_endpoint` nothing here is rendered.
"""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.envoy.types import API

OTLP_CLUSTER = "meshgen.otlp"
TRACE_HEADER = "traceparent"
FLUSH_INTERVAL_MS = 1000
"""Envoy's span batches go out at least this often (its default, 5 s, hides a fresh trace for long)."""


def hcm_tracing(tracing: ir.Tracing, region: ir.Region) -> dict[str, Any]:
    return {
        "tracing": {
            "random_sampling": {"value": tracing.sample_percent},
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": f"{API}.config.trace.v3.OpenTelemetryConfig",
                    "grpc_service": {"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "1s"},
                    "service_name": f"meshgen-gateway.{region.name}",
                },
            },
        }
    }


def tracing_runtime(tracing: ir.Tracing | None) -> dict[str, Any]:
    """Runtime keys of Envoy's OpenTelemetry tracer: flush every second, whatever the batch's size."""
    if tracing is None:
        return {}
    return {"tracing.opentelemetry.flush_interval_ms": FLUSH_INTERVAL_MS, "tracing.opentelemetry.min_flush_spans": 1}
