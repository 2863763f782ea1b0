"""A test OTLP/gRPC receiver: ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` on a free loopback port,
keeping every request (raw bytes too, to search them for what must never be there)."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

# Typed as Any: xds-protos or opentelemetry-proto, whichever pip installed last (ext_proc/tracing.py).
trace_service_pb2: Any = importlib.import_module("opentelemetry.proto.collector.trace.v1.trace_service_pb2")


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return None if kind is None else getattr(any_value, kind)


class OtlpReceiver:
    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self._cond = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self._export,
                    request_deserializer=lambda data: data,
                    response_serializer=lambda message: message.SerializeToString(),
                )
            },
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def _export(self, data: bytes, context: Any) -> Any:
        with self._cond:
            self.raw.append(data)
            self._cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)

    def spans(self) -> Iterator[ReceivedSpan]:
        with self._cond:
            raw = list(self.raw)
        for data in raw:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(data)
            for resource_spans in request.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
                # ScopeSpans (opentelemetry-proto) or InstrumentationLibrarySpans (xds-protos): field 2 either way
                scoped = getattr(resource_spans, "scope_spans", None)
                if scoped is None:
                    scoped = resource_spans.instrumentation_library_spans
                for scope in scoped:
                    for span in scope.spans:
                        yield ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        )

    def wait_for(self, predicate: Callable[[ReceivedSpan], bool], timeout: float = 15.0) -> ReceivedSpan:
        deadline = time.monotonic() + timeout
        while True:
            for span in self.spans():
                if predicate(span):
                    return span
            left = deadline - time.monotonic()
            if left <= 0:
                got = [(s.service, s.name) for s in self.spans()]
                raise AssertionError(f"no matching span within {timeout}s; received {got}")
            with self._cond:
                self._cond.wait(min(left, 0.2))


def with_tracing(policy_text: str, receiver: OtlpReceiver) -> str:
    """A policy's text with tracing turned on, as a user would, exporting to `receiver`."""
    return policy_text + f'\nobservability: {{otlp_endpoint: "http://127.0.0.1:{receiver.port}"}}\n'
