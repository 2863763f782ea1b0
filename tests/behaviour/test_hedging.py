"""Hedging streams on time to first token, through the real Envoy and service: the stream twin of a hedged chain
holds each attempt's headers until its first token (ext_proc/hold.py), so a provider that answers its headers at
once and its first token late is hedged like one whose headers are late. hedge-model: slowpoke, then backup,
hedged after 200 ms."""

from __future__ import annotations

import time

from tests.behaviour.conftest import TEAM_KEY, Running, chat
from tests.behaviour.test_budgets import metrics
from tests.behaviour.test_streaming import events
from tests.support.client import TimedReply, post_timed

SLOWPOKE = "provider.slowpoke.us-east.ep0"
BACKUP = "provider.backup.us-east.ep0"
HEDGES = "cluster.model_hedge-model_chain_stream.upstream_rq_retry"
WON = ("meshgen_hedge_wins_total", frozenset({("model", "hedge-model"), ("provider", "backup")}))
HOLDS = "cluster.model_hedge-model_chain_stream.ext_proc.streams_started"


def timed_stream(lab: Running, mock: str) -> TimedReply:
    headers = {"authorization": f"Bearer {TEAM_KEY}", "x-mock": mock}
    return post_timed(lab.port, chat("hedge-model", stream=True), headers, timeout=15)


def test_a_stream_whose_first_token_is_late_is_hedged_to_the_next_provider(lab: Running) -> None:
    hedges, won = lab.envoy.stats("cluster.model_hedge").get(HEDGES, 0), metrics(lab).get(WON, 0.0)
    reply = timed_stream(lab, f"ttft_ms=1500@{SLOWPOKE}")
    assert (reply.status, reply.headers.get("x-served-by")) == (200, BACKUP)
    assert reply.first_byte_s < 1.0, "the hedge's first token came, not the primary's 1.5 s one"
    assert reply.body.endswith(b"data: [DONE]\n\n")
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events(reply.body)).startswith("mock reply")
    assert lab.upstream.count(SLOWPOKE) == 1 and lab.upstream.count(BACKUP) == 1
    lab.envoy.wait_stat(HEDGES, hedges + 1)  # the hedge sent
    wait_for_metric(lab, WON, won + 1)  # and won, counted by the service from the access log


def test_a_stream_whose_first_token_is_early_is_served_whole_by_the_primary(lab: Running) -> None:
    holds = lab.envoy.stats("cluster.model_hedge").get(HOLDS, 0)
    reply = timed_stream(lab, f"ttft_ms=50;chunk_delay_ms=20@{SLOWPOKE}")
    assert (reply.status, reply.headers.get("x-served-by")) == (200, SLOWPOKE)
    assert reply.body.endswith(b"data: [DONE]\n\n")
    assert lab.upstream.count(BACKUP) == 0
    assert lab.envoy.stats("cluster.model_hedge")[HOLDS] == holds + 1  # the hold ran, and let it by


def test_a_json_request_is_hedged_on_its_headers_without_a_hold(lab: Running) -> None:
    holds, won = lab.envoy.stats("cluster.model_hedge").get(HOLDS, 0), metrics(lab).get(WON, 0.0)
    reply = lab.post(chat("hedge-model"), headers={"x-mock": f"delay_ms=1500@{SLOWPOKE}"})
    assert (reply.status, reply.headers["x-served-by"]) == (200, BACKUP)
    assert lab.envoy.stats("cluster.model_hedge").get(HOLDS, 0) == holds
    wait_for_metric(lab, WON, won + 1)


def wait_for_metric(lab: Running, key: tuple[str, frozenset[tuple[str, str]]], value: float) -> None:
    deadline = time.monotonic() + 5  # the access log is flushed every 0.5 s
    while (found := metrics(lab).get(key, 0.0)) < value:
        assert time.monotonic() < deadline, f"{key} = {found}, expected {value}"
        time.sleep(0.1)
