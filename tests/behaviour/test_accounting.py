"""Tokens counted through the real path: admission reserves, Envoy's gRPC access log delivers the provider's usage,
the ledger replaces the estimate with it."""

from __future__ import annotations

import asyncio
import http.client
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from ext_proc.store.base import Limit
from ext_proc.store.sqlite import SqliteStore
from tests.behaviour.conftest import Running, chat

METERED = "sk-test-metered"  # tenant metered: tpm 400, dev-model only
TPM = 400


def used(lab: Running, tenant: str) -> dict[Limit, float]:
    async def read() -> dict[Limit, float]:
        store = SqliteStore.open(lab.ledger)
        try:
            return await store.used(tenant, time.time())
        finally:
            await store.close()

    return asyncio.run(read())


def wait_until_used(lab: Running, tenant: str, kind: Limit, value: float) -> dict[Limit, float]:
    deadline = time.monotonic() + 5  # the access log is flushed every 0.5 s
    while (now := used(lab, tenant))[kind] != value:
        assert time.monotonic() < deadline, f"{kind} stayed {now[kind]}, expected {value}"
        time.sleep(0.1)
    return now


def test_the_providers_usage_replaces_the_estimate(lab: Running) -> None:
    before = used(lab, "team")
    reply = lab.post(chat("claude-model", max_tokens=500))
    assert reply.status == 200
    # Admission reserved 500 + the prompt; the mock provider reports 7 prompt + 3 completion tokens.
    after = wait_until_used(lab, "team", Limit.TPD, before[Limit.TPD] + 10)
    assert after[Limit.RPM] == before[Limit.RPM] + 1


def test_a_request_that_cannot_fit_is_refused_before_the_provider_sees_it(lab: Running) -> None:
    reply = lab.post(chat("dev-model", max_tokens=TPM), key=METERED)
    assert reply.status == 429
    error = reply.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in error["message"]
    assert reply.headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert lab.upstream.count() == 0


def test_concurrent_requests_never_reserve_past_the_limit(lab: Running) -> None:
    def send(n: int) -> Counter[int]:
        statuses: Counter[int] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", lab.port, timeout=15)
        try:
            for _ in range(n):
                statuses[lab.post(chat("dev-model", max_tokens=40), key=METERED, conn=conn).status] += 1
        finally:
            conn.close()
        return statuses

    with ThreadPoolExecutor(10) as pool:
        statuses = sum(pool.map(send, [5] * 10), Counter())
    assert set(statuses) == {200, 429}, statuses
    # Reservations (47 tokens: max_tokens + the prompt) and settled counts (10) together never pass the limit.
    assert used(lab, "metered")[Limit.TPM] <= TPM
