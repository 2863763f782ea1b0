"""Streams counted through the real path: Envoy's ext_proc (on streaming routes only) into the real service, which
passes every SSE chunk on, reads the provider's usage out of it and settles the reservation."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import pytest

from ext_proc.store.base import Limit
from ext_proc.tokens import count_text, estimate_prompt_tokens
from meshgen.compile import compile_gateway
from meshgen.ir.model import Gateway, Limits
from tests.behaviour.conftest import DEV_KEY, POLICY, TEAM_KEY, Running, chat, running_gateway
from tests.behaviour.test_accounting import used, wait_until_used
from tests.behaviour.test_budgets import metrics

DEV_UPSTREAM = "provider.backup.*"
CLAUDE_UPSTREAM = "provider.claude.*"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_gateway(compile_gateway(POLICY), tmp_path_factory.mktemp("streaming")) as running:
        yield running


class Streamed(NamedTuple):
    status: int
    body: bytes
    """As far as it came."""
    whole: bool
    request_id: str
    """The gateway's x-request-id, which the service's settle log carries."""


def stream(
    lab: Running,
    body: Mapping[str, Any],
    *,
    key: str = DEV_KEY,
    path: str = "/v1/chat/completions",
    mock: str | None = None,
) -> Streamed:
    """POST a streaming request."""
    conn = http.client.HTTPConnection("127.0.0.1", lab.port, timeout=15)
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    if mock:
        headers["x-mock"] = mock
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        request_id = response.getheader("x-request-id", "")
        try:
            return Streamed(response.status, response.read(), True, request_id)
        except http.client.IncompleteRead as cut:
            return Streamed(response.status, cut.partial, False, request_id)
    finally:
        conn.close()


def events(body: bytes) -> list[Any]:
    return [
        json.loads(line[6:])
        for line in body.decode().split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def settled_log(lab: Running, request_id: str) -> dict[str, Any] | None:
    assert lab.service is not None and request_id
    for line in lab.service.lines:
        if request_id in line and line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "stream_settled" and entry.get("request_id") == request_id:
                return entry
    return None


def wait_settled(lab: Running, request_id: str) -> dict[str, Any]:
    """The service's settle log of one request (found by its id: a previous stream's may be logged late)."""
    deadline = time.monotonic() + 5
    while (found := settled_log(lab, request_id)) is None:
        assert time.monotonic() < deadline, f"no stream_settled for {request_id}"
        time.sleep(0.05)
    return found


def test_an_openai_stream_is_counted_exactly_and_the_client_sees_no_usage_it_did_not_ask_for(lab: Running) -> None:
    before = used(lab, "dev")
    status, body, whole, request_id = stream(lab, chat("dev-model", stream=True, max_tokens=300))
    assert (status, whole) == (200, True)
    assert body.endswith(b"data: [DONE]\n\n")
    assert all("usage" not in e for e in events(body)), body
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events(body)).startswith("mock reply")
    upstream = lab.upstream.requests(DEV_UPSTREAM)[-1].json()
    assert upstream["stream_options"] == {"include_usage": True}
    wait_until_used(lab, "dev", Limit.TPD, before[Limit.TPD] + 10)  # 7 + 3, the mock's usage, not 300 + prompt
    log = wait_settled(lab, request_id)
    assert (log["input_tokens"], log["output_tokens"], log["estimated"]) == (7, 3, False)


def test_time_to_first_token_is_a_histogram_of_the_service(lab: Running) -> None:
    count, fast = (
        ("meshgen_ttft_seconds_count", frozenset()),
        ("meshgen_ttft_seconds_bucket", frozenset({("le", "0.1")})),
    )
    before = metrics(lab)
    assert stream(lab, chat("dev-model", stream=True), mock="delay_ms=120")[0] == 200
    after = metrics(lab)
    assert after[count] == before.get(count, 0.0) + 1
    # The mock waits 120 ms before it answers: that request lands above the 0.1 s bucket.
    assert after[fast] == before.get(fast, 0.0)


def test_a_client_that_asked_for_usage_sees_it(lab: Running) -> None:
    before = used(lab, "dev")
    options = {"include_usage": True}
    status, body, _, _ = stream(lab, chat("dev-model", stream=True, stream_options=options))
    assert status == 200
    assert events(body)[-1]["usage"]["completion_tokens"] == 3
    assert lab.upstream.requests(DEV_UPSTREAM)[-1].json()["stream_options"] == options
    wait_until_used(lab, "dev", Limit.TPD, before[Limit.TPD] + 10)


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        ({}, {"include_usage": True}),
        ({"include_usage": False}, {"include_usage": True}),
        (None, {"include_usage": True}),
        ({"include_usage": True}, {"include_usage": True}),
    ],
)
def test_usage_is_asked_for_whatever_stream_options_the_client_sent(
    lab: Running, options: dict[str, Any] | None, sent: dict[str, Any]
) -> None:
    """Envoy's Lua filter edits the body as text: each shape of the key reaches the provider asking for usage,
    the body stays valid JSON, and the client sees the usage event only when it asked for it itself."""
    asked = options == {"include_usage": True}
    status, body, whole, request_id = stream(lab, chat("dev-model", stream=True, stream_options=options))
    assert (status, whole) == (200, True)
    assert lab.upstream.requests(DEV_UPSTREAM)[-1].json()["stream_options"] == sent
    assert any("usage" in e for e in events(body)) is asked
    log = wait_settled(lab, request_id)
    assert (log["input_tokens"], log["output_tokens"], log["estimated"]) == (7, 3, False)


@pytest.mark.parametrize("piece", [1, 7, 33])
def test_events_split_at_odd_byte_boundaries_are_counted_and_passed_on_intact(lab: Running, piece: int) -> None:
    mock = f"chunk_bytes={piece};chunk_delay_ms=1"
    status, body, whole, request_id = stream(lab, chat("dev-model", stream=True), mock=mock)
    assert (status, whole) == (200, True)
    assert all("usage" not in e for e in events(body))
    assert body.endswith(b"data: [DONE]\n\n")
    log = wait_settled(lab, request_id)
    assert (log["input_tokens"], log["output_tokens"], log["estimated"]) == (7, 3, False)


def test_an_anthropic_stream_counts_input_from_message_start_and_the_cumulative_output(lab: Running) -> None:
    before = used(lab, "team")
    body = chat("claude-model", stream=True, max_tokens=200)
    status, answer, whole, request_id = stream(
        lab, body, key=TEAM_KEY, path="/v1/messages", mock="chunk_bytes=19;chunk_delay_ms=1"
    )
    assert (status, whole) == (200, True)
    assert b"event: message_stop" in answer
    assert "stream_options" not in lab.upstream.requests(CLAUDE_UPSTREAM)[-1].json()  # the body went as sent
    log = wait_settled(lab, request_id)
    # message_start says output 1, message_delta 3 in all: the last, not the sum.
    assert (log["input_tokens"], log["output_tokens"], log["estimated"]) == (7, 3, False)
    wait_until_used(lab, "team", Limit.TPD, before[Limit.TPD] + 10)


def test_a_stream_cut_midway_is_settled_as_estimated_from_what_was_streamed(lab: Running) -> None:
    before = used(lab, "dev")
    status, body, whole, request_id = stream(
        lab, chat("dev-model", stream=True), mock="words=40;chunk_bytes=64;chunk_delay_ms=2;cut=900"
    )
    assert status == 200
    assert not whole
    log = wait_settled(lab, request_id)
    assert log["estimated"] is True
    # No usage came: the prompt is admission's estimate, which reached ext_proc in Envoy's metadata.
    assert log["input_tokens"] == estimate_prompt_tokens(chat("dev-model", stream=True))
    whole_events = events(body[: body.rfind(b"\n\n")])
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in whole_events)
    assert streamed.startswith("w0 w1") and not streamed.endswith("w39 ")
    assert log["output_tokens"] == count_text(streamed)
    # The ledger holds the tokenizer's count (prompt + what was streamed), not the reservation's max_tokens.
    wait_until_used(lab, "dev", Limit.TPD, before[Limit.TPD] + log["input_tokens"] + log["output_tokens"])


def test_a_json_request_opens_no_ext_proc_stream(lab: Running) -> None:
    before = lab.envoy.stats("http.gateway_us-east.ext_proc").get("http.gateway_us-east.ext_proc.streams_started", 0)
    assert lab.post(chat("dev-model"), key=DEV_KEY).status == 200
    assert (
        lab.envoy.stats("http.gateway_us-east.ext_proc").get("http.gateway_us-east.ext_proc.streams_started", 0)
        == before
    )


# ---- a budget downgrade: the real service re-routes, ext_proc rewrites the body's model -------------------------
def spent_budget(gw: Gateway) -> Gateway:
    """Tenant `team` has no dollars left today and failover-model has a price: the service downgrades it to
    eject-model (free), whose provider knows it as `eject-model-2024`."""
    models = tuple(
        m.model_copy(update={"price_input_per_mtok": 1.0, "price_output_per_mtok": 1.0})
        if m.name == "failover-model"
        else m.model_copy(update={"upstream_name": "eject-model-2024"})
        if m.name == "eject-model"
        else m
        for m in gw.models
    )
    tenants = tuple(
        t.model_copy(update={"limits": Limits(rpm=None, tpm=None, tpd=None, usd_per_day=0.0)})
        if t.name == "team"
        else t
        for t in gw.tenants
    )
    return gw.model_copy(update={"models": models, "tenants": tenants})


@pytest.fixture(scope="module")
def spent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_gateway(spent_budget(compile_gateway(POLICY)), tmp_path_factory.mktemp("spent")) as running:
        yield running


def test_a_downgraded_request_reaches_the_cheaper_provider_with_its_model_in_the_body(spent: Running) -> None:
    reply = spent.post(chat("failover-model", max_tokens=50))
    assert reply.status == 200, reply.body
    assert reply.headers["x-meshgen-downgraded-from"] == "failover-model"
    [received] = spent.upstream.requests("provider.flaky.*")
    assert received.json()["model"] == "eject-model-2024"
    assert int(received.headers["content-length"]) == len(received.body)
    assert "x-meshgen-route" not in received.headers and "x-meshgen-reservation" not in received.headers
    assert spent.upstream.count("provider.primary.*") == 0


def test_a_downgraded_stream_is_rewritten_and_counted(spent: Running) -> None:
    spent.upstream.clear()
    status, body, whole, request_id = stream(spent, chat("failover-model", stream=True), key=TEAM_KEY)
    assert (status, whole) == (200, True)
    assert all("usage" not in e for e in events(body))
    [received] = spent.upstream.requests("provider.flaky.*")
    assert received.json()["model"] == "eject-model-2024"
    assert received.json()["stream_options"] == {"include_usage": True}
    log = wait_settled(spent, request_id)
    assert (log["model"], log["input_tokens"], log["output_tokens"]) == ("eject-model-2024", 7, 3)
