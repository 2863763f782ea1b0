"""Tracing through a running gateway: Envoy's OpenTelemetry tracer and the data-plane service's span per request
reach an OTLP receiver as one trace, with the gen_ai attributes and never the prompt; the service's JSON line per
request names the same trace. Tracing off (the default) renders nothing and leaves the admission path as it was."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ext_proc.config import ServiceConfig
from ext_proc.server import Server
from meshgen.compile import compile_gateway, render_all
from meshgen.ir import model as ir
from tests.behaviour.conftest import DEV_KEY, POLICY, Running, running_gateway
from tests.observability.otlp import OtlpReceiver, ReceivedSpan, with_tracing

PROMPT = "ZEBRA-PROMPT-8812-do-not-log"


@pytest.fixture(scope="module")
def traced(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    out = tmp_path_factory.mktemp("traced")
    policy = out / "traced.yaml"  # the behaviour policy, with tracing turned on as a user would
    policy.write_text(with_tracing(POLICY.read_text(), receiver))
    gw = compile_gateway(policy)
    assert gw.tracing == ir.Tracing(otlp_host="127.0.0.1", otlp_port=receiver.port, sample_percent=100)
    with running_gateway(gw, out) as running:
        yield running


def _chat(model: str, content: str = PROMPT) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def _request_line(running: Running, predicate: Any) -> dict[str, Any]:
    assert running.service is not None
    line = running.service.wait_for_line(lambda line: '"event": "request"' in line and predicate(json.loads(line)))
    return dict(json.loads(line))


def test_one_request_is_one_trace_with_gen_ai_attributes_and_no_prompt(traced: Running, receiver: OtlpReceiver) -> None:
    reply = traced.post(_chat("dev-model"), key=DEV_KEY)
    assert reply.status == 200, reply.body
    answer = reply.json()
    request_id = reply.headers["x-request-id"]

    def ours(span: ReceivedSpan) -> bool:
        return span.service == "meshgen-service" and span.attributes.get("gen_ai.request.model") == "dev-model"

    span = receiver.wait_for(ours)
    assert span.name == "chat dev-model"
    assert span.attributes["gen_ai.system"] == "backup"  # the provider that served it
    assert span.attributes["gen_ai.response.model"] == answer["model"]
    assert span.attributes["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert span.attributes["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    assert span.attributes["meshgen.tenant"] == "dev"
    assert span.attributes["meshgen.decision"] == "allowed"
    # Parented to the gateway's trace: Envoy's own span for the request is in the same trace, and is our parent.
    gateway = receiver.wait_for(lambda s: s.service == "meshgen-gateway.us-east" and s.trace_id == span.trace_id)
    assert span.parent_span_id in {s.span_id for s in receiver.spans() if s.trace_id == span.trace_id}, gateway

    line = _request_line(traced, lambda doc: doc.get("request_id") == request_id)
    assert line["trace_id"] == span.trace_id
    assert line["decision"] == "allowed" and line["reason"] is None and line["status"] == 200
    assert (line["tenant"], line["model"], line["model_served"]) == ("dev", "dev-model", "dev-model")
    assert (line["input_tokens"], line["output_tokens"]) == (
        answer["usage"]["prompt_tokens"],
        answer["usage"]["completion_tokens"],
    )
    assert line["cost_usd"] == 0.0  # dev-model has no price

    # Never the prompt, the completion or the key: not in any span received, not in the service's log.
    assert traced.service is not None
    completion = answer["choices"][0]["message"]["content"]
    for secret in (PROMPT.encode(), DEV_KEY.encode(), completion.encode()):
        assert all(secret not in raw for raw in receiver.raw)
    log = "\n".join(traced.service.lines)
    for text in (PROMPT, DEV_KEY, completion):
        assert text not in log


def test_a_refusal_is_logged_and_traced_at_admission(traced: Running, receiver: OtlpReceiver) -> None:
    reply = traced.post(_chat("gpt-4o"), key=DEV_KEY)  # dev may use dev-model only
    assert reply.status == 403
    line = _request_line(traced, lambda doc: doc.get("decision") == "refused" and doc.get("model") == "gpt-4o")
    assert (line["tenant"], line["reason"], line["status"]) == ("dev", "model_not_allowed", 403)
    assert line["trace_id"] is not None  # Envoy's traceparent reached the admission call
    span = receiver.wait_for(
        lambda s: s.service == "meshgen-service" and s.attributes.get("meshgen.decision") == "refused"
    )
    assert span.trace_id == line["trace_id"]
    assert span.attributes["meshgen.reason"] == "model_not_allowed"
    assert all(PROMPT.encode() not in raw and DEV_KEY.encode() not in raw for raw in receiver.raw)


def test_tracing_off_renders_nothing_and_adds_nothing_to_admission() -> None:
    gw = compile_gateway(POLICY)
    assert gw.tracing is None
    docs = {d.path: d.data for d in render_all(gw)}
    envoy = json.dumps(docs["local/envoy/us-east.yaml"])
    assert "opentelemetry" not in envoy and "meshgen.otlp" not in envoy and "traceparent" not in envoy
    service = ServiceConfig.model_validate(docs["local/service.json"])
    assert service.tracing is None
    # The admission server keeps no trace header: its per-request header scan is what it was without tracing.
    server = Server(service)
    assert server.priority_headers == server.queue.headers
    assert b"traceparent" not in server.priority_headers


def test_tracing_on_renders_the_tracer_and_the_service_contract(tmp_path: Path) -> None:
    policy = tmp_path / "traced.yaml"
    policy.write_text(
        POLICY.read_text() + '\nobservability: {otlp_endpoint: "http://otel-collector:4317", sample_percent: 10}\n'
    )
    gw = compile_gateway(policy)
    assert gw.tracing == ir.Tracing(otlp_host="otel-collector", otlp_port=4317, sample_percent=10)
    docs = {d.path: d.data for d in render_all(gw)}
    service = ServiceConfig.model_validate(docs["compose/service.json"])
    assert service.tracing is not None and service.tracing.otlp_endpoint == "http://otel-collector:4317"
    assert b"traceparent" in Server(service).priority_headers


def test_a_stream_line_and_span_carry_the_streamed_counts(traced: Running, receiver: OtlpReceiver) -> None:
    reply = traced.post(_chat("dev-model") | {"stream": True, "max_tokens": 50}, key=DEV_KEY)
    assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n")
    request_id = reply.headers["x-request-id"]
    line = _request_line(traced, lambda doc: doc.get("request_id") == request_id)
    assert line["decision"] == "allowed" and line["model_served"] == "dev-model"
    assert line["input_tokens"] and line["output_tokens"] and line["estimated"] is False
    span = receiver.wait_for(lambda s: s.service == "meshgen-service" and s.trace_id == line["trace_id"])
    assert span.attributes["gen_ai.usage.output_tokens"] == line["output_tokens"]
    assert all(PROMPT.encode() not in raw for raw in receiver.raw)
