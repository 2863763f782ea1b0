"""A trace for one request through the lab (`meshgen lab up` of policies/lab.yaml on free ports, with
`observability.otlp_endpoint` set as a user would) reaches an OTLP receiver: the gateway's span and the data-plane
service's child span with the gen_ai attributes — and never the prompt or the key."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from tests.lab.test_lab_supervised import RunningLab, lab_policy
from tests.observability.otlp import OtlpReceiver, with_tracing
from tests.support import require_binary

PROMPT = "OKAPI-PROMPT-4471-never-logged"


@pytest.fixture(scope="module")
def lab(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    require_binary("envoy")
    tmp = tmp_path_factory.mktemp("traced-lab")
    policy = lab_policy(tmp)
    policy.write_text(with_tracing(policy.read_text(), receiver))
    running = RunningLab(policy, tmp / "generated", tmp / "run")
    code, out = running.up()
    assert code == 0, out
    yield running
    running.cli("lab", "down")


def test_one_request_through_the_lab_is_one_trace_with_gen_ai_attributes(
    lab: RunningLab, receiver: OtlpReceiver
) -> None:
    info = lab.status()
    port = int(info["regions"]["us-east"]["base_url"].split(":")[2].split("/")[0])
    key = info["tenants"]["platform"]["api_key"]
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"authorization": f"Bearer {key}"})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer

    span = receiver.wait_for(
        lambda s: s.service == "meshgen-service" and s.attributes.get("gen_ai.request.model") == "gpt-4o-mini"
    )
    assert span.attributes["gen_ai.system"] == "openai"
    assert span.attributes["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert span.attributes["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    receiver.wait_for(lambda s: s.service == "meshgen-gateway.us-east" and s.trace_id == span.trace_id)
    assert span.parent_span_id in {s.span_id for s in receiver.spans() if s.trace_id == span.trace_id}
    for secret in (PROMPT.encode(), key.encode()):
        assert all(secret not in raw for raw in receiver.raw)
