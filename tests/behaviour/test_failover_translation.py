"""Cross-provider failover through the real Envoy, the real service and the mock providers: a chain that crosses
schemas (openai → anthropic → ollama) translates each attempt in its upstream ext_proc, and the client always gets
an answer in its own schema, with `x-meshgen-served-by`."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ext_proc.store.base import Limit
from meshgen.compile import compile_gateway
from tests.behaviour.conftest import TEAM_KEY, Running, chat, running_gateway
from tests.behaviour.test_accounting import used, wait_until_used
from tests.support.client import Reply, post_timed

POLICY = """\
apiVersion: meshgen/v1
name: translation
service: {timeout: 2s, failure_mode: closed}
regions:
  us-east: {auth: api-key}
provider_defaults:
  outlier: {consecutive_5xx: 3, interval: 1s, ejection: 60s, max_ejection_percent: 100}
providers:
  openai: {schema: openai, endpoints: [{url: "https://api.openai.com", region: us-east}]}
  anthropic: {schema: anthropic, endpoints: [{url: "https://api.anthropic.com"}]}
  ollama: {schema: openai, endpoints: [{url: "http://ollama:11434", region: us-east}]}
  claude-first: {schema: anthropic, endpoints: [{url: "https://claude.example"}]}
  gpt-second: {schema: openai, endpoints: [{url: "https://gpt.example", region: us-east}]}
  solo: {schema: openai, endpoints: [{url: "https://solo.example", region: us-east}]}
  openai-o: {schema: openai, endpoints: [{url: "https://o.openai.example", region: us-east}], outlier: {ejection: 1s}}
  anthropic-o: {schema: anthropic, endpoints: [{url: "https://o.anthropic.example"}]}
  solo-backup: {schema: openai, endpoints: [{url: "http://solo-backup:8000", region: us-east}]}
  openai-h: {schema: openai, endpoints: [{url: "https://h.openai.example", region: us-east}]}
  anthropic-h: {schema: anthropic, endpoints: [{url: "https://h.anthropic.example"}]}
models:
  gpt-4o: {provider: openai, failover: [claude-sonnet, llama3]}
  claude-sonnet: {provider: anthropic, upstream_name: claude-sonnet-4-5}
  llama3: {provider: ollama, upstream_name: llama3.3}
  claude-main: {provider: claude-first, upstream_name: claude-main-1, failover: [gpt-backup]}
  gpt-backup: {provider: gpt-second, upstream_name: gpt-4o-2026}
  plain: {provider: solo, failover: [plain-backup]}
  outage-gpt: {provider: openai-o, failover: [outage-claude, llama3]}
  outage-claude: {provider: anthropic-o}
  plain-backup: {provider: solo-backup}
  hedged-gpt: {provider: openai-h, failover: [hedged-claude], hedge: {after: 200ms}}
  hedged-claude: {provider: anthropic-h, upstream_name: claude-h}
tenants:
  team:   # key sk-test-team
    keys: ["sha256:d414d7154af989b8f8a7e6859d3a1daae71905faa1a75109bc366c299bb81109"]
    models: [gpt-4o, claude-main, plain, outage-gpt, hedged-gpt]
"""
KEYS = {
    "MESHGEN_KEY_OPENAI": "sk-openai-lab",
    "MESHGEN_KEY_ANTHROPIC": "sk-ant-lab",
    "MESHGEN_KEY_GPT_SECOND": "sk-gpt2",
    "MESHGEN_KEY_OPENAI_H": "sk-openai-h",
    "MESHGEN_KEY_ANTHROPIC_H": "sk-ant-h",
}
OPENAI = "provider.openai.*"
ANTHROPIC = "provider.anthropic.*"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    out = tmp_path_factory.mktemp("translation")
    policy = out / "policy.yaml"
    policy.write_text(POLICY)
    saved = {k: os.environ.get(k) for k in KEYS}
    os.environ.update(KEYS)  # the service reads its provider keys from its environment
    try:
        with running_gateway(compile_gateway(policy), out) as running:
            yield running
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stream(
    lab: Running, body: Mapping[str, Any], *, mock: str, path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, str], bytes]:
    """POST a streaming request; (status, headers, the body as far as it came)."""
    conn = http.client.HTTPConnection("127.0.0.1", lab.port, timeout=15)
    headers = {"content-type": "application/json", "authorization": f"Bearer {TEAM_KEY}", "x-mock": mock}
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        try:
            return response.status, headers, response.read()
        except http.client.IncompleteRead as cut:  # the stream was cut: what came, marked
            return response.status, headers | {"x-test-incomplete": "1"}, cut.partial
    finally:
        conn.close()


def post_path(lab: Running, path: str, body: Mapping[str, Any], mock: str) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", lab.port, timeout=15)
    headers = {"content-type": "application/json", "x-api-key": TEAM_KEY, "x-mock": mock}
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def events_of(body: bytes) -> list[bytes]:
    return [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.strip()]


def settled_use(lab: Running) -> float:
    """The team's tokens today once earlier requests have settled (their reservations replaced by their usage)."""
    last = used(lab, "team")[Limit.TPD]
    while True:
        time.sleep(0.6)  # the access log is flushed every 0.5 s
        now = used(lab, "team")[Limit.TPD]
        if now == last:
            return now
        last = now


def chain_streams(lab: Running, model: str, stat: str = "streams_started") -> int:
    """An upstream ext_proc stat of `model.<m>.chain`: streams opened (one per attempt), messages sent."""
    name = f"cluster.model_{model}_chain.ext_proc.{stat}"
    return lab.envoy.stats(name).get(name, 0)


def test_a_healthy_primary_gets_its_own_schema_and_key(lab: Running) -> None:
    before, sent = chain_streams(lab, "gpt-4o"), chain_streams(lab, "gpt-4o", "stream_msgs_sent")
    reply = lab.post(chat("gpt-4o"), headers={"x-mock": f"auth_key=sk-openai-lab@{OPENAI}"})
    assert reply.status == 200, reply.body
    assert reply.headers["x-meshgen-served-by"] == "openai"
    (got,) = lab.upstream.requests()
    assert got.label.startswith("provider.openai.") and got.path == "/v1/chat/completions"
    assert got.headers["authorization"] == "Bearer sk-openai-lab"  # from the service's environment
    assert "x-api-key" not in got.headers and "anthropic-version" not in got.headers
    assert got.json()["model"] == "gpt-4o"
    assert chain_streams(lab, "gpt-4o") == before + 1  # the chain crosses schemas: one stream per attempt
    # Nothing to translate back: the stream ends after the request body (mode_override), the answer skips Python.
    assert chain_streams(lab, "gpt-4o", "stream_msgs_sent") == sent + 2


def test_openai_down_the_client_gets_openai_json_from_anthropic(lab: Running) -> None:
    before = settled_use(lab)
    strict = f"auth_key=sk-ant-lab@{ANTHROPIC};schema=strict@{ANTHROPIC}"
    reply = lab.post(chat("gpt-4o", max_tokens=40), headers={"x-mock": f"status=500@{OPENAI};{strict}"})
    assert reply.status == 200, reply.body
    assert reply.headers["x-meshgen-served-by"] == "anthropic"
    answer = reply.json()
    assert answer["object"] == "chat.completion" and answer["model"] == "claude-sonnet-4-5"
    assert answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": "mock reply from provider.anthropic.global.ep0",
    }
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    anthropic = lab.upstream.requests(ANTHROPIC)[-1]
    assert anthropic.path == "/v1/messages"
    assert anthropic.headers["x-api-key"] == "sk-ant-lab" and anthropic.headers["anthropic-version"] == "2023-06-01"
    # The OpenAI attempt's auth and length were set on the same request: nothing of it leaked into this attempt.
    assert "authorization" not in anthropic.headers
    assert int(anthropic.headers["content-length"]) == len(anthropic.body)
    assert anthropic.json() == {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 40,
    }
    # The translated answer's usage is what the access log lifts: 7 + 3 tokens counted for the tenant.
    wait_until_used(lab, "team", Limit.TPD, before + 10)


def test_openai_down_a_stream_comes_back_as_openai_chunks(lab: Running) -> None:
    before = settled_use(lab)
    status, headers, body = stream(
        lab,
        chat("gpt-4o", stream=True),
        mock=f"status=500@{OPENAI};chunk_bytes=7@{ANTHROPIC};schema=strict@{ANTHROPIC}",
    )
    assert status == 200 and headers["x-meshgen-served-by"] == "anthropic"
    assert headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e) if e != b"[DONE]" else "[DONE]" for e in events_of(body)]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)  # the client did not ask for include_usage: the gateway hid it
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "mock reply from provider.anthropic.global.ep0 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    sent = lab.upstream.requests(ANTHROPIC)[-1]
    assert sent.path == "/v1/messages" and sent.json()["stream"] is True
    assert "stream_options" not in sent.json()
    # Counted from the translated stream by the service's streaming counter.
    wait_until_used(lab, "team", Limit.TPD, before + 10)


def test_a_stream_asking_for_usage_gets_it_translated(lab: Running) -> None:
    body = chat("gpt-4o", stream=True, stream_options={"include_usage": True})
    status, _, raw = stream(lab, body, mock=f"status=500@{OPENAI}")
    assert status == 200
    events = events_of(raw)
    assert events[-1] == b"[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_openai_and_anthropic_down_ollama_answers_in_openai_schema(lab: Running) -> None:
    reply = lab.post(chat("gpt-4o"), headers={"x-mock": f"status=500@{OPENAI};status=503@{ANTHROPIC}"})
    assert reply.status == 200, reply.body
    assert reply.headers["x-meshgen-served-by"] == "ollama"
    got = lab.upstream.requests("provider.ollama.*")[-1]
    assert got.path == "/v1/chat/completions" and got.json()["model"] == "llama3.3"
    # The Anthropic attempt before it set x-api-key, anthropic-version and /v1/messages: all undone.
    assert "x-api-key" not in got.headers and "anthropic-version" not in got.headers
    assert "authorization" not in got.headers  # no MESHGEN_KEY_OLLAMA in the service's environment
    assert int(got.headers["content-length"]) == len(got.body)
    assert reply.json()["object"] == "chat.completion"


def test_an_anthropic_client_fails_over_to_openai(lab: Running) -> None:
    body = {"model": "claude-main", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    mock = "status=529@provider.claude-first.*;auth_key=sk-gpt2@provider.gpt-second.*"
    reply = post_path(lab, "/v1/messages", body, mock)
    assert reply.status == 200, reply.body
    assert reply.headers["x-meshgen-served-by"] == "gpt-second"
    message = reply.json()
    assert message["type"] == "message" and message["content"] == [
        {"type": "text", "text": "mock reply from provider.gpt-second.us-east.ep0"}
    ]
    assert message["usage"] == {"input_tokens": 7, "output_tokens": 3}
    sent = lab.upstream.requests("provider.gpt-second.*")[-1]
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == "Bearer sk-gpt2"
    assert sent.json()["model"] == "gpt-4o-2026"
    # Its stream, too.
    status, _, raw = stream(lab, body | {"stream": True}, mock=mock, path="/v1/messages")
    assert status == 200
    assert b"event: message_start" in raw and raw.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_a_same_schema_chain_opens_no_upstream_stream(lab: Running) -> None:
    reply = lab.post(chat("plain"), headers={"x-mock": "status=500@provider.solo.*"})
    assert reply.status == 200 and reply.headers["x-meshgen-served-by"] == "solo-backup"
    stats = lab.envoy.stats("cluster.model_plain_chain.")
    assert stats.get("cluster.model_plain_chain.upstream_rq_retry_success", 0) >= 1
    assert stats.get("cluster.model_plain_chain.ext_proc.streams_started", 0) == 0


def test_three_failures_eject_the_provider(lab: Running) -> None:
    """The alert condition: after 3 consecutive 5xx the provider is ejected (Envoy's outlier stats), and the
    chain keeps answering from the next provider without trying it."""
    stat = "cluster.provider_openai_us-east.outlier_detection.ejections_consecutive_5xx"
    for _ in range(3):
        assert lab.post(chat("gpt-4o"), headers={"x-mock": f"status=500@{OPENAI}"}).status == 200
    deadline = time.monotonic() + 5
    while lab.envoy.stats(stat).get(stat, 0) < 1:
        assert time.monotonic() < deadline, lab.envoy.stats("cluster.provider_openai_us-east.outlier_detection")
        time.sleep(0.1)
    assert lab.envoy.stats(stat)[stat] >= 1
    lab.upstream.clear()
    reply = lab.post(chat("gpt-4o"))
    assert reply.status == 200 and reply.headers["x-meshgen-served-by"] == "anthropic"
    assert lab.upstream.count(OPENAI) == 0


def test_an_anthropic_error_reaches_the_client_in_openai_shape(lab: Running) -> None:
    reply = lab.post(chat("gpt-4o"), headers={"x-mock": f"status=500@{OPENAI};context_exceeded=1@{ANTHROPIC}"})
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request_error"
    assert "too long" in error["message"]


def test_a_reset_primary_fails_over_to_anthropic(lab: Running) -> None:
    reply = lab.post(chat("gpt-4o"), headers={"x-mock": f"reset=1@{OPENAI}"})
    assert reply.status == 200 and reply.headers["x-meshgen-served-by"] == "anthropic"
    assert reply.json()["object"] == "chat.completion"


def test_a_translated_stream_cut_by_anthropic_ends_as_an_error(lab: Running) -> None:
    mock = f"status=500@{OPENAI};cut_after=5@{ANTHROPIC};event_delay_ms=100@{ANTHROPIC}"
    status, headers, body = stream(lab, chat("gpt-4o", stream=True), mock=mock)
    assert status == 200 and headers["x-meshgen-served-by"] == "anthropic"
    assert headers.get("x-test-incomplete") == "1"  # HTTP/1.1: the chunked body never ends cleanly
    assert b'"content": "mock ' in body or b'"content":"mock ' in body  # the tokens before the cut came through
    assert b"[DONE]" not in body and b'finish_reason":"stop' not in body  # never a stream that looks complete


def _one(lab: Running, streaming: bool) -> tuple[int, str, bool]:
    """One outage-gpt request: (status, served by, whether the answer is a complete OpenAI answer)."""
    if not streaming:
        reply = lab.post(chat("outage-gpt"))
        ok = reply.status == 200 and reply.json()["object"] == "chat.completion"
        return reply.status, reply.headers.get("x-meshgen-served-by", ""), ok
    status, headers, body = stream(lab, chat("outage-gpt", stream=True), mock="global=on")
    events = events_of(body)
    ok = "x-test-incomplete" not in headers and events[-1] == b"[DONE]"
    ok = ok and all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])
    return status, headers.get("x-meshgen-served-by", ""), ok


def _load(lab: Running, n: int) -> list[tuple[int, str, bool]]:
    """`n` requests, half of them streams, 4 at a time."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda i: _one(lab, i % 2 == 1), range(n)))


def _wait(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_provider_outage_under_load(lab: Running) -> None:
    """openai down (500s, then connection resets) under a bounded load: no client error, every answer OpenAI's
    whoever served it, the provider ejected after 3 failures, and its traffic back once it recovers."""
    primary, ejections = (
        "provider.openai-o.*",
        "cluster.provider_openai-o_us-east.outlier_detection.ejections_enforced_total",
    )
    lab.upstream.fault(primary, "status=500")
    for phase in ("status=500", "reset=1"):
        lab.upstream.clear_faults()
        lab.upstream.fault(primary, phase)
        results = _load(lab, 40)
        assert [r for r in results if r[0] != 200 or not r[2]] == [], phase
        assert {served for _, served, _ in results} <= {"openai-o", "anthropic-o", "ollama"}
        assert any(served == "anthropic-o" for _, served, _ in results)
    assert lab.envoy.stats(ejections).get(ejections, 0) >= 1  # the alert condition
    lab.upstream.clear_faults()
    _wait(lambda: _one(lab, False)[1] == "openai-o", "openai-o never got its traffic back")
    assert all(r[0] == 200 and r[2] for r in _load(lab, 8))


def test_a_request_anthropic_cannot_take_gets_a_400_in_openai_shape(lab: Running) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "function", "name": "f", "content": "x"}]}
    reply = lab.post(body, headers={"x-mock": f"status=500@{OPENAI}"})
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["code"] == "translation_failed" and "anthropic" in error["message"]
    assert lab.upstream.count(ANTHROPIC) == 0  # never sent what the provider cannot read


@pytest.mark.parametrize("ttft_ms", [1500, 30])
def test_a_hedged_stream_across_schemas_is_won_by_the_first_token(lab: Running, ttft_ms: int) -> None:
    """The openai primary's first token comes after 1.5 s: the hedge after 200 ms goes to anthropic, translated,
    and wins. When it comes at once, the primary serves, no hedge is sent, and the processor leaves the
    untranslated stream after its first token (40 words: far fewer messages than chunks)."""
    lab.upstream.clear()
    sent_to_processor = "cluster.model_hedged-gpt_chain_stream.ext_proc.stream_msgs_sent"
    before = lab.envoy.stats("cluster.model_hedged-gpt").get(sent_to_processor, 0)
    mock = ";".join(f"{item}@provider.openai-h.*" for item in (f"ttft_ms={ttft_ms}", "words=40", "event_delay_ms=2"))
    headers = {"authorization": f"Bearer {TEAM_KEY}", "x-mock": mock}
    reply = post_timed(lab.port, chat("hedged-gpt", stream=True), headers, timeout=15)
    answer, first_byte_s, served = reply.body, reply.first_byte_s, reply.headers.get("x-meshgen-served-by")
    assert reply.status == 200 and answer.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in answer.decode().split("\n") if line.startswith("data: {")]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), "OpenAI's format whoever served"
    if ttft_ms > 1000:
        assert served == "anthropic-h" and first_byte_s < 1.0
        [sent] = lab.upstream.requests("provider.anthropic-h.*")
        assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == "sk-ant-h"
    else:
        assert served == "openai-h"
        assert lab.upstream.count("provider.anthropic-h.*") == 0
        assert len(chunks) > 40
        assert lab.envoy.stats("cluster.model_hedged-gpt")[sent_to_processor] - before < 10
