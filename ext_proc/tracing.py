"""The service's spans: one per request, made when the request is settled, exported over OTLP/gRPC.

Only when the config has ``tracing`` (the policy's ``observability.otlp_endpoint``): otherwise nothing here is
built and the request path never looks for a trace context.

Why at settle time and not in the admission call: the admission call (ext_authz over HTTP/1.1) is the request's
only blocking Python call and costs ~30 µs in all (PERF-FACTS.md); a span there would add about as much again,
and would not know the answer's tokens yet. The gRPC access log already brings every finished request to the
service in batches, with its ``traceparent`` (the gateway's span, ``access_log.py``), its start and duration,
tenant, models and usage, so the span is built there, off the request path, as a child of the gateway's span.
Refusals at admission (no access-log entry follows) get theirs when they are refused — a rare path.

A span carries the OpenTelemetry GenAI attributes (``gen_ai.operation.name``, ``gen_ai.system``,
``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``) and
``meshgen.*`` ones (tenant, decision, cost) — never a prompt, a completion or a key: nothing here ever sees them.

Export: the SDK's :class:`BatchSpanProcessor` (a thread; batches every second) into :class:`OtlpGrpcExporter`,
which encodes with the OTLP protos that are installed — xds-protos ships an older generation of them
(``InstrumentationLibrarySpans``) under the same module names as ``opentelemetry-proto`` (``ScopeSpans``), and
whichever pip installed last wins; the two are the same on the wire (field 2 of ``ResourceSpans``). The gRPC
call goes by its method path, so no generated stub is needed either.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ext_proc.config import TracingConfig

__all__ = ["EXPORT_METHOD", "OtlpGrpcExporter", "Tracer", "encode_spans", "trace_id_of"]

# Typed as Any: which generation is installed (and whether it has type stubs) depends on the install order.
trace_service_pb2: Any = importlib.import_module("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
common_pb2: Any = importlib.import_module("opentelemetry.proto.common.v1.common_pb2")
resource_pb2: Any = importlib.import_module("opentelemetry.proto.resource.v1.resource_pb2")
trace_pb2: Any = importlib.import_module("opentelemetry.proto.trace.v1.trace_pb2")

EXPORT_METHOD: Final = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SCOPE: Final = "meshgen.ext_proc"
EXPORT_EVERY_MS: Final = 1000
_PROPAGATOR: Final = TraceContextTextMapPropagator()
# SDK SpanKind (INTERNAL=0 …) → OTLP Span.SpanKind (SPAN_KIND_INTERNAL=1 …)
_KIND: Final = {kind: kind.value + 1 for kind in SpanKind}
_STATUS: Final = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex) of a W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``), or None."""
    if traceparent is None:
        return None
    parts = traceparent.split("-")
    if len(parts) < 4 or len(parts[1]) != 32:
        return None
    return parts[1]


def _add_attributes(repeated: Any, attributes: Mapping[str, Any] | None) -> None:
    """Filled in place: half the CPU of building each KeyValue and AnyValue and passing them in."""
    add = repeated.add
    for key, value in (attributes or {}).items():
        any_value = add(key=key).value
        if isinstance(value, bool):
            any_value.bool_value = value
        elif isinstance(value, int):
            any_value.int_value = value
        elif isinstance(value, float):
            any_value.double_value = value
        else:
            any_value.string_value = str(value)


def encode_spans(spans: Sequence[ReadableSpan]) -> Any:
    """An ``ExportTraceServiceRequest`` of SDK spans, in whichever generation of the OTLP protos is installed."""
    by_resource: dict[int, tuple[Resource, list[Any]]] = {}
    for span in spans:
        ctx = span.context
        if ctx is None:
            continue
        parent = span.parent
        status = span.status
        encoded = trace_pb2.Span(
            trace_id=ctx.trace_id.to_bytes(16, "big"),
            span_id=ctx.span_id.to_bytes(8, "big"),
            parent_span_id=parent.span_id.to_bytes(8, "big") if parent is not None else b"",
            name=span.name,
            kind=_KIND[span.kind],
            start_time_unix_nano=span.start_time or 0,
            end_time_unix_nano=span.end_time or 0,
            status=trace_pb2.Status(code=_STATUS[status.status_code], message=status.description or ""),
        )
        _add_attributes(encoded.attributes, span.attributes)
        by_resource.setdefault(id(span.resource), (span.resource, []))[1].append(encoded)
    resource_spans = []
    for resource, encoded_spans in by_resource.values():
        pb_resource = resource_pb2.Resource()
        _add_attributes(pb_resource.attributes, resource.attributes)
        if hasattr(trace_pb2, "ScopeSpans"):  # opentelemetry-proto
            scoped = trace_pb2.ScopeSpans(scope=common_pb2.InstrumentationScope(name=SCOPE), spans=encoded_spans)
            resource_spans.append(trace_pb2.ResourceSpans(resource=pb_resource, scope_spans=[scoped]))
        else:  # xds-protos' older generation: the same bytes on the wire
            library = trace_pb2.InstrumentationLibrarySpans(
                instrumentation_library=common_pb2.InstrumentationLibrary(name=SCOPE), spans=encoded_spans
            )
            resource_spans.append(
                trace_pb2.ResourceSpans(resource=pb_resource, instrumentation_library_spans=[library])
            )
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=resource_spans)


class OtlpGrpcExporter(SpanExporter):
    """Spans → ``TraceService/Export`` on an OTLP/gRPC collector (plain HTTP/2), from the processor's thread."""

    def __init__(self, endpoint: str, *, timeout_s: float = 5.0, logger: logging.Logger | None = None) -> None:
        self._channel = grpc.insecure_channel(endpoint.removeprefix("http://").rstrip("/"))
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        self._timeout_s = timeout_s
        self._log = logger or logging.getLogger("ext_proc")
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self._export(encode_spans(spans), timeout=self._timeout_s)
        except grpc.RpcError as exc:
            if not self._failing:  # one line per outage, not one per batch
                self._failing = True
                code = exc.code() if hasattr(exc, "code") else None
                self._log.warning('{"event": "trace_export_failed", "code": "%s"}', getattr(code, "name", "unknown"))
            return SpanExportResult.FAILURE
        self._failing = False
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._channel.close()


class Tracer:
    """Makes the service's spans and exports them in the background (:meth:`shutdown` flushes)."""

    def __init__(
        self, config: TracingConfig, *, exporter: SpanExporter | None = None, logger: logging.Logger | None = None
    ) -> None:
        self._provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        self._processor = BatchSpanProcessor(
            exporter if exporter is not None else OtlpGrpcExporter(config.otlp_endpoint, logger=logger),
            schedule_delay_millis=EXPORT_EVERY_MS,
        )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer(SCOPE)

    def span(
        self,
        name: str,
        *,
        traceparent: str | None,
        start_ns: int | None,
        end_ns: int | None,
        attributes: Mapping[str, str | int | float | bool],
        error: bool = False,
    ) -> str | None:
        """One finished span, the child of ``traceparent`` when given (not made when that trace is not
        sampled); returns its trace id (hex), or None when no span was made."""
        context = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        span = self._tracer.start_span(
            name, context=context, kind=SpanKind.CLIENT, attributes=attributes, start_time=start_ns
        )
        if error:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)
        ctx = span.get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid and ctx.trace_flags.sampled else None

    def flush(self, timeout_ms: int = 5000) -> bool:
        return bool(self._processor.force_flush(timeout_ms))

    def shutdown(self) -> None:
        self._provider.shutdown()
