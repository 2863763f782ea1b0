"""Every fault type of the mock providers, through the real Envoy and the real data-plane service: what a client of
the gateway sees when its provider is slow, failing, throttling, resetting, cutting, stalling or garbling a stream.

A policy of its own (below): each model has its own provider, no retries (so the client sees the fault itself,
except `retry-model`, which shows Envoy honouring Retry-After), and outlier detection that never ejects.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from meshgen.compile import compile_gateway
from tests.behaviour.conftest import TEAM_KEY, Running, running_gateway
from tests.lab.test_mock_providers import Timed, anthropic, call, chat, gaps

POLICY = f"""
apiVersion: meshgen/v1
name: mock-faults
service: {{timeout: 2s, failure_mode: closed}}
regions:
  us-east: {{auth: api-key}}
provider_defaults:
  outlier: {{consecutive_5xx: 100000, interval: 1s, ejection: 1s, max_ejection_percent: 100}}
providers:
  oa: {{schema: openai, endpoints: [{{url: "https://api.openai.com", region: us-east}}]}}
  claude: {{schema: anthropic, endpoints: [{{url: "https://api.anthropic.com", region: us-east}}]}}
  local: {{schema: openai, endpoints: [{{url: "http://ollama:11434", region: us-east}}]}}
  patient: {{schema: openai, endpoints: [{{url: "https://patient.example", region: us-east}}]}}
models:
  fault-model: {{provider: oa, retry: {{attempts: 0}}}}
  claude-model: {{provider: claude, retry: {{attempts: 0}}}}
  llama3: {{provider: local, retry: {{attempts: 0}}}}
  retry-model: {{provider: patient, retry: {{attempts: 1}}}}
tenants:
  team:
    keys: ["sha256:{hashlib.sha256(TEAM_KEY.encode()).hexdigest()}"]
    models: [fault-model, claude-model, llama3, retry-model]
"""
OA = "provider.oa.*"
CLAUDE = "provider.claude.*"
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    out = tmp_path_factory.mktemp("mock-faults")
    policy = out / "mock-faults.yaml"
    policy.write_text(POLICY)
    with running_gateway(compile_gateway(policy), out / "run") as running:
        yield running


def gateway(
    lab: Running,
    body: Mapping[str, Any] | bytes,
    mock: str | None = None,
    *,
    path: str = "/v1/chat/completions",
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Timed:
    """One request to the gateway as the team tenant, its body timed piece by piece as it arrives."""
    sent = {"authorization": f"Bearer {TEAM_KEY}", "content-type": "application/json", **(headers or {})}
    if mock is not None:
        sent["x-mock"] = mock
    return call(lab.port, path, body, sent, timeout=timeout)


def test_added_latency(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model"), "delay_ms=400")
    assert reply.status == 200 and reply.t_headers >= 0.4
    assert reply.headers["x-served-by"] == "provider.oa.us-east.ep0"


def test_slow_first_token_of_a_stream(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model", stream=True), "ttft_ms=500")
    assert reply.status == 200 and reply.error is None
    assert reply.t_first >= 0.5 and reply.sse()[-1] == "[DONE]"


def test_slow_first_token_of_a_json_answer(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model"), "ttft_ms=400")
    assert reply.status == 200 and reply.t_headers >= 0.4 and reply.json()["usage"]["total_tokens"] == 10


def test_events_spaced_out_reach_the_client_one_by_one(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model", stream=True), "event_delay_ms=100;words=3")
    assert reply.status == 200 and reply.sse()[-1] == "[DONE]"
    assert len(reply.pieces) >= 4 and reply.pieces[-1][0] - reply.pieces[0][0] >= 0.4


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_reaches_the_client_in_the_providers_shape(lab: Running, status: int) -> None:
    reply = gateway(lab, chat("fault-model"), f"status={status}")
    assert reply.status == status
    assert reply.json()["error"]["type"] == "server_error"
    assert lab.upstream.count(OA) == 1  # no retry for this model


@pytest.mark.parametrize(("mock", "retry_after"), [("status=429", None), ("status=429;retry_after=7", "7")])
def test_429_with_and_without_retry_after(lab: Running, mock: str, retry_after: str | None) -> None:
    reply = gateway(lab, chat("fault-model"), mock)
    assert (reply.status, reply.headers.get("retry-after")) == (429, retry_after)
    assert reply.json()["error"]["code"] == "rate_limit_exceeded"


def test_envoy_waits_for_retry_after_before_it_retries_a_429(lab: Running) -> None:
    reply = gateway(lab, chat("retry-model"), "status=429;retry_after=1")
    assert reply.status == 429
    first, second = lab.upstream.wait_for("provider.patient.*", 2)
    assert second.time - first.time >= 0.9


@pytest.mark.parametrize("mock", ["reset=1", "drop=1"], ids=["reset", "close"])
def test_a_connection_reset_before_headers_is_a_503(lab: Running, mock: str) -> None:
    reply = gateway(lab, chat("fault-model"), mock)
    assert reply.status == 503
    assert b"upstream connect error or disconnect/reset before headers" in reply.body
    assert lab.upstream.count(OA) == 1


def test_a_stream_cut_midway_never_looks_complete(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model", stream=True, max_tokens=50), "words=20;cut_after=5")
    assert reply.status == 200
    assert reply.error is not None, "the client must see the stream end abnormally"
    assert "[DONE]" not in reply.sse()
    assert len(reply.sse()) <= 5


def test_a_byte_cut_inside_an_event(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model", stream=True), "chunk_bytes=50;chunk_delay_ms=2;cut=120")
    assert reply.status == 200 and reply.error is not None and b"[DONE]" not in reply.body


def test_a_stalled_stream_delivers_what_it_had_then_nothing(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model", stream=True), "words=5;stall_after=3", timeout=1.0)
    assert reply.status == 200 and isinstance(reply.error, TimeoutError)
    assert len(reply.sse()) == 3
    paused = gateway(lab, chat("fault-model", stream=True), "stall_after=2;stall_ms=500")
    assert paused.error is None and paused.sse()[-1] == "[DONE]"
    assert max(gaps([t for t, _ in paused.pieces])) >= 0.45


def test_a_malformed_event_is_passed_on_and_the_stream_goes_on(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model", stream=True), "malformed_after=2")
    assert reply.status == 200 and reply.error is None
    data = reply.sse()
    assert data[-1] == "[DONE]"
    unparsable = []
    for d in data[:-1]:
        try:
            json.loads(d)
        except ValueError:
            unparsable.append(d)
    assert len(unparsable) == 1


def test_a_stream_without_done_ends_cleanly_without_it(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model", stream=True), "no_done=1")
    assert reply.status == 200 and reply.error is None
    assert reply.sse() and "[DONE]" not in reply.sse()
    claude = gateway(lab, chat("claude-model", stream=True), "no_done=1", path="/v1/messages")
    assert claude.status == 200 and "message_stop" not in claude.sse_names()
    assert claude.sse_names()[-1] == "message_delta"


def test_context_length_exceeded_is_the_providers_400(lab: Running) -> None:
    reply = gateway(lab, chat("fault-model"), "context_exceeded=1")
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    claude = gateway(lab, anthropic("claude-model"), "context_exceeded=1", path="/v1/messages")
    assert claude.status == 400
    assert claude.json()["error"]["type"] == "invalid_request_error"
    assert claude.json()["error"]["message"].startswith("prompt is too long")


def test_ollama_native_chat_and_a_cut_ndjson_stream(lab: Running) -> None:
    whole = gateway(lab, {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}, path="/api/chat")
    assert whole.status == 200, whole.body
    assert whole.ndjson()[-1]["eval_count"] == 3
    cut = gateway(lab, {"model": "llama3", "messages": []}, "cut_after=2", path="/api/chat")
    assert cut.status == 200 and cut.error is not None and len(cut.body.splitlines()) == 2


def test_a_global_fault_and_a_header_that_wins_over_it(lab: Running) -> None:
    lab.upstream.fault(OA, "status=500")
    assert gateway(lab, chat("fault-model")).status == 500
    assert gateway(lab, chat("fault-model"), "status=200").status == 200
    assert gateway(lab, chat("fault-model"), "global=off").status == 200
    assert gateway(lab, chat("claude-model"), path="/v1/messages").status == 200
    lab.upstream.reset()
    assert gateway(lab, chat("fault-model")).status == 200


def test_a_wrong_schema_gets_the_providers_error_through_the_gateway(lab: Running) -> None:
    # The gateway passes /v1/messages bodies on as sent: an OpenAI body there is Anthropic's 400.
    wrong = gateway(lab, chat("claude-model"), "schema=strict", path="/v1/messages", headers=ANTHROPIC_HEADERS)
    assert wrong.status == 400
    assert wrong.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    right = gateway(lab, anthropic("claude-model"), "schema=strict", path="/v1/messages", headers=ANTHROPIC_HEADERS)
    assert right.status == 200 and right.json()["usage"] == {"input_tokens": 7, "output_tokens": 3}


def test_the_clients_key_never_reaches_a_provider_that_requires_one(lab: Running) -> None:
    # Envoy strips the client's key; a same-schema chain sets no provider key, so a checking provider refuses.
    reply = gateway(lab, chat("fault-model"), "auth=required")
    assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert "authorization" not in lab.upstream.requests(OA)[-1].headers
