"""Chaos scenarios on the running lab (`meshgen lab up` of policies/lab.yaml on free ports): the mocks' admin API
switches a fault on for every request, a bounded load runs, and the clients' view and the gateway's metrics are
read back."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from meshgen.compile import compile_gateway
from meshgen.lab.providers.client import MockAdmin
from tests.lab.test_lab_demo import POLICY
from tests.lab.test_lab_supervised import RunningLab, lab_policy
from tests.support import require_binary
from tests.support.client import post_timed

HEDGE_AFTER_S = 2.0  # gpt-4o's hedge.after in policies/lab.yaml
SLOW_TTFT_MS = 6000


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    """policies/lab.yaml on free ports, gpt-4o's canary reachable by header only (so every request takes the
    hedged openai → anthropic → ollama chain)."""
    require_binary("envoy")
    tmp = tmp_path_factory.mktemp("scenarios")
    policy = lab_policy(tmp, (r"(canary: \{model: gpt-4o-beta, weight: )\d+", r"\g<1>0"))
    running = RunningLab(policy, tmp / "generated", tmp / "run")
    code, out = running.up()
    assert code == 0, out
    yield running
    running.cli("lab", "down")


def stream(base_url: str, key: str) -> tuple[int, str | None, float, bytes]:
    """(status, x-meshgen-served-by, seconds to the first byte, body) of one gpt-4o stream."""
    port = int(base_url.split(":")[2].split("/")[0])
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    reply = post_timed(port, body, {"authorization": f"Bearer {key}"})
    return reply.status, reply.headers.get("x-meshgen-served-by"), reply.first_byte_s, reply.body


def service_metric(info: dict[str, Any], name: str, labels: str) -> float:
    with urllib.request.urlopen(info["urls"]["service"] + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_fast_model_is_not_hedged(lab: RunningLab) -> None:
    """(Before the slow one, which leaves openai ejected for its ejection time.)"""
    info = lab.status()
    base, key = info["regions"]["us-east"]["base_url"], info["tenants"]["platform"]["api_key"]
    status, served, first_s, body = stream(base, key)
    assert (status, served) == (200, "openai") and first_s < HEDGE_AFTER_S
    assert body.endswith(b"data: [DONE]\n\n")


def test_slow_model_is_hedged_then_ejected(lab: RunningLab) -> None:
    """openai's first token comes after 6 s, above gpt-4o's hedge.after (2 s). Each openai endpoint ahead of
    anthropic in us-east's chain (us-east's own, then europe's) is hedged after 2 s, so the first clients' first
    token comes near 2 s per endpoint ahead plus anthropic's own time, translated to OpenAI's format, and the
    hedges won are counted. Envoy counts each late first token against its endpoint: after 3 in a row
    (consecutive_5xx) openai is ejected and the next clients go straight to anthropic."""
    chain = dict(next(r for r in compile_gateway(lab.policy).regions if r.name == "us-east").chains)["gpt-4o"]
    ahead = next(i for i, cluster in enumerate(chain) if cluster.startswith("provider.anthropic."))
    assert ahead >= 1
    info = lab.status()
    base, key = info["regions"]["us-east"]["base_url"], info["tenants"]["platform"]["api_key"]
    won = 'model="gpt-4o",provider="anthropic"'
    before = service_metric(info, "meshgen_hedge_wins_total", won)
    admin = MockAdmin(info["urls"]["mocks_admin"])
    admin.fault("provider.openai.*", f"ttft_ms={SLOW_TTFT_MS}")
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            hedged = list(pool.map(lambda _: stream(base, key), range(3)))
            ejected = list(pool.map(lambda _: stream(base, key), range(3)))
    finally:
        admin.clear_faults()
    for status, served, _, body in hedged + ejected:
        assert (status, served) == (200, "anthropic")
        assert body.endswith(b"data: [DONE]\n\n") and b"chat.completion.chunk" in body
    for _, _, first_s, _ in hedged:
        assert ahead * HEDGE_AFTER_S - 0.1 < first_s < ahead * HEDGE_AFTER_S + 1.5, (ahead, first_s)
    assert all(first_s < HEDGE_AFTER_S / 2 for _, _, first_s, _ in ejected), ejected
    stats = envoy_stats(info["regions"]["us-east"]["admin_url"], "outlier_detection.ejections_enforced_total")
    assert stats["cluster.provider_openai_us-east.outlier_detection.ejections_enforced_total"] >= 1
    deadline = time.monotonic() + 5  # the access log reaches the service every 0.5 s
    while service_metric(info, "meshgen_hedge_wins_total", won) < before + len(hedged):
        assert time.monotonic() < deadline, "the hedges won were not counted"
        time.sleep(0.2)


def envoy_stats(admin_url: str, contains: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{admin_url}/stats?filter={contains}", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    return {name: int(value) for name, _, value in (line.partition(": ") for line in lines) if value.isdigit()}


def test_every_lab_provider_recovers_within_30_s() -> None:
    """The seed's target: an ejected provider gets traffic again within 30 s — its ejection time plus one
    detection interval (tests/behaviour/test_recovery.py shows Envoy keeps to that)."""
    for cluster in compile_gateway(POLICY).clusters:
        assert cluster.outlier.ejection_ms + cluster.outlier.interval_ms < 30_000, cluster.name
