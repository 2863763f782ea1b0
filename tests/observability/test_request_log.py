"""The service's line (and span) per request, from the records the access log and admission give it: decisions,
tokens, cost, trace ids — and nothing of the prompt, the completion or the key."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ext_proc.accesslog import UsageRecord
from ext_proc.config import ServiceConfig, TracingConfig
from ext_proc.errors import BudgetExceeded, ModelNotAllowed
from ext_proc.requestlog import RequestLog
from ext_proc.tracing import Tracer, encode_spans, trace_id_of
from tests.ext_proc.kit import capture_log, config_dict

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
trace_service_pb2: Any = importlib.import_module("opentelemetry.proto.collector.trace.v1.trace_service_pb2")


def _config() -> ServiceConfig:
    return ServiceConfig.model_validate(config_dict() | {"tracing": {"otlp_endpoint": "http://127.0.0.1:4317"}})


def _record(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "reservation": "r1",
        "tenant": "team-a",
        "request_model": "gpt-4o",
        "served_model": "gpt-4o",
        "input_tokens": 1000,
        "output_tokens": 100,
        "status": 200,
        "has_usage": True,
        "request_id": "req-1",
        "traceparent": TRACEPARENT,
        "start_ns": 1_700_000_000_000_000_000,
        "duration_ns": 250_000_000,
    }
    return UsageRecord(**(base | fields))


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def _log(spans: InMemorySpanExporter | None = None) -> tuple[RequestLog, Any, Tracer | None]:
    config = _config()
    logger, lines = capture_log()
    tracer = Tracer(config.tracing, exporter=spans) if spans is not None and config.tracing else None
    return RequestLog(config, logger=logger, tracer=tracer), lines, tracer


def test_an_allowed_request_is_one_line_with_tokens_cost_and_trace(spans: InMemorySpanExporter) -> None:
    log, lines, tracer = _log(spans)
    log.finished([_record()])
    assert lines.of("request") == [
        {
            "event": "request",
            "decision": "allowed",
            "reason": None,
            "status": 200,
            "tenant": "team-a",
            "model": "gpt-4o",
            "model_served": "gpt-4o",
            "provider": "openai",
            "input_tokens": 1000,
            "output_tokens": 100,
            "cost_usd": 0.0035,  # 1000 × $2.50/M + 100 × $10/M
            "estimated": False,
            "queued_ms": None,
            "attempts": 1,
            "request_id": "req-1",
            "trace_id": TRACE,
        }
    ]
    assert tracer is not None and tracer.flush()
    (span,) = spans.get_finished_spans()
    assert span.name == "chat gpt-4o"
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT  # the gateway's span
    assert (span.start_time, span.end_time) == (1_700_000_000_000_000_000, 1_700_000_000_250_000_000)
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 100,
        "http.response.status_code": 200,
        "meshgen.decision": "allowed",
        "meshgen.tenant": "team-a",
        "meshgen.model_served": "gpt-4o",
        "meshgen.cost_usd": 0.0035,
    }
    tracer.shutdown()


def test_a_downgrade_names_the_model_asked_for_and_is_billed_as_served() -> None:
    log, lines, _ = _log()
    log.finished([_record(served_model="gpt-4o-mini", request_model="gpt-4o-mini", downgraded_from="gpt-4o")])
    (line,) = lines.of("request")
    assert (line["decision"], line["reason"], line["model"], line["model_served"]) == (
        "downgraded",
        "gpt-4o",
        "gpt-4o",
        "gpt-4o-mini",
    )
    assert line["cost_usd"] == 0.0  # gpt-4o-mini has no price


def test_a_queued_request_says_how_long_it_waited() -> None:
    log, lines, _ = _log()
    log.finished([_record(queued_ms=1250)])
    (line,) = lines.of("request")
    assert (line["decision"], line["queued_ms"]) == ("queued", 1250)


def test_a_stream_takes_its_tokens_from_the_streaming_settle() -> None:
    log, lines, _ = _log()
    log.stream_settled("r1", "llama3:8b", 12, 34, True)
    log.finished([_record(request_model="llama3", served_model=None, has_usage=False, input_tokens=0)])
    (line,) = lines.of("request")
    assert (line["model_served"], line["input_tokens"], line["output_tokens"], line["estimated"]) == (
        "llama3",
        12,
        34,
        True,
    )
    log.finished([_record(reservation="r2", has_usage=False, served_model=None)])  # no counts seen: none shown
    assert (lines.of("request")[1]["input_tokens"], lines.of("request")[1]["cost_usd"]) == (None, None)


def test_refusals_say_why_and_carry_the_trace(spans: InMemorySpanExporter) -> None:
    log, lines, tracer = _log(spans)
    log.refused(BudgetExceeded("spent", tenant="team-a", model="gpt-4o", limit="usd_per_day"), 429, TRACEPARENT)
    log.refused(ModelNotAllowed("llama3", tenant="team-a"), 403)
    assert [(e["decision"], e["reason"], e["status"], e["trace_id"]) for e in lines.of("request")] == [
        ("refused", "usd_per_day", 429, TRACE),
        ("refused", "model_not_allowed", 403, None),
    ]
    assert tracer is not None and tracer.flush()
    (span,) = spans.get_finished_spans()  # only the traced one
    assert span.attributes is not None and span.attributes["meshgen.reason"] == "usd_per_day"
    tracer.shutdown()


def test_an_unsampled_trace_gets_no_span(spans: InMemorySpanExporter) -> None:
    log, lines, tracer = _log(spans)
    log.finished([_record(traceparent=f"00-{TRACE}-{PARENT}-00")])
    assert tracer is not None and tracer.flush()
    assert spans.get_finished_spans() == ()
    assert lines.of("request")[0]["trace_id"] == TRACE  # the line still leads to the (unsampled) trace id
    tracer.shutdown()


def test_spans_encode_to_otlp_in_the_installed_protos(spans: InMemorySpanExporter) -> None:
    tracer = Tracer(TracingConfig(otlp_endpoint="http://127.0.0.1:4317"), exporter=spans)
    tracer.span("chat m", traceparent=TRACEPARENT, start_ns=1, end_ns=2, attributes={"gen_ai.usage.input_tokens": 3})
    assert tracer.flush()
    data = encode_spans(spans.get_finished_spans()).SerializeToString()
    decoded = trace_service_pb2.ExportTraceServiceRequest.FromString(data)
    (resource_spans,) = decoded.resource_spans
    scoped = getattr(resource_spans, "scope_spans", None) or resource_spans.instrumentation_library_spans
    (span,) = scoped[0].spans
    assert (span.trace_id.hex(), span.parent_span_id.hex(), span.name) == (TRACE, PARENT, "chat m")
    assert [(kv.key, kv.value.int_value) for kv in span.attributes] == [("gen_ai.usage.input_tokens", 3)]
    tracer.shutdown()


def test_trace_id_of() -> None:
    assert trace_id_of(TRACEPARENT) == TRACE
    assert trace_id_of(None) is None and trace_id_of("garbage") is None
