"""The ledger's store down: `ledger_down: count_locally` counts in memory and replays into the store when it answers
again; `refuse` answers 503 `ledger_unavailable`. The store is a memory store behind a switch that makes every
call raise as a dead Redis does; the clock is fake."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
import redis.exceptions

from ext_proc.accesslog import UsageRecord
from ext_proc.config import ServiceConfig
from ext_proc.errors import LedgerUnavailable, LimitExceeded
from ext_proc.ledger import LOCAL_PREFIX, Ledger
from ext_proc.server import Server
from ext_proc.store.base import DAY_S, Cost, Limit, Limits, Settled, SettleItem, SettleState, Verdict
from ext_proc.store.memory import MemoryStore
from tests.ext_proc.kit import LogLines, capture_log, sha256_hex

T = 19_675 * DAY_S + 3600 + 15.5
KEY = "sk-acme"
HI = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
ESTIMATE = 12  # "hi" is 7 prompt tokens by the tokenizer, + max_tokens 5


def config(ledger_down: str = "count_locally", **limits: Any) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "schema_version": 1,
            "policy": "ledger-down",
            "failure_mode": "closed",
            "ledger_down": ledger_down,
            "models": {
                "m": {
                    "provider": "p",
                    "upstream_name": "m-v1",
                    "max_tokens_default": 9,
                    "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
                }
            },
            "tenants": {
                "acme": {"key_hashes": [sha256_hex(KEY)], "models": ["m"], "limits": limits, "alerts_at": [0.5]}
            },
        }
    )


class FlakyStore:
    """A shared ledger (a memory store) that raises redis's ConnectionError on every call while `down`."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False
        self.calls_while_down = 0
        self.before_reserve: Callable[[], Awaitable[None]] | None = None

    def _check(self) -> None:
        if self.down:
            self.calls_while_down += 1
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    async def reserve(self, tenant: str, model: str, cost: Cost, limits: Limits, now: float) -> Verdict:
        self._check()
        if self.before_reserve is not None:
            hook, self.before_reserve = self.before_reserve, None
            await hook()
        return await self.inner.reserve(tenant, model, cost, limits, now)

    async def settle(
        self, reservation: str, cost: Cost, now: float, state: SettleState = SettleState.EXACT
    ) -> Settled | None:
        self._check()
        return await self.inner.settle(reservation, cost, now, state)

    async def settle_many(self, items: Sequence[SettleItem], now: float) -> list[Settled | None]:
        self._check()
        return await self.inner.settle_many(items, now)

    async def expire(self, reserved_before: float, now: float) -> list[Settled]:
        self._check()
        return await self.inner.expire(reserved_before, now)

    async def used(self, tenant: str, now: float) -> dict[Limit, float]:
        self._check()
        return await self.inner.used(tenant, now)

    async def mark_once(self, key: str, window_end: float, now: float) -> bool:
        self._check()
        return await self.inner.mark_once(key, window_end, now)

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = T

    def __call__(self) -> float:
        return self.now


def run(scenario: Callable[[Ledger, FlakyStore, LogLines, Clock], Awaitable[None]], cfg: ServiceConfig) -> None:
    log, lines = capture_log(logging.DEBUG)
    store, clock = FlakyStore(), Clock()
    asyncio.run(scenario(Ledger(cfg, store, clock=clock, logger=log), store, lines, clock))


def usage(reservation: str, input_tokens: int, output_tokens: int, *, estimated: bool = False) -> UsageRecord:
    return UsageRecord(
        reservation=reservation,
        tenant="acme",
        request_model="m",
        served_model="m-v1",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        status=200,
        has_usage=True,
        estimated=estimated,
    )


def sample(ledger: Ledger, name: str, labels: dict[str, str] | None = None) -> float:
    return ledger.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def tokens(used: dict[Limit, float]) -> float:
    return used[Limit.TPD]


def test_count_locally_admits_and_counts_in_memory() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        before = await ledger.reserve("acme", "m", HI)
        assert not before.reservation.startswith(LOCAL_PREFIX) and not ledger.degraded
        store.down = True
        during = [await ledger.reserve("acme", "m", HI) for _ in range(5)]
        assert all(r.reservation.startswith(LOCAL_PREFIX) for r in during)
        assert store.calls_while_down == 1, "degraded: the dead store is not asked on every request"
        assert ledger.degraded
        assert tokens(await ledger.local.used("acme", T)) == 5 * ESTIMATE
        assert sample(ledger, "meshgen_ledger_degraded") == 1
        assert sample(ledger, "meshgen_ledger_errors_total", {"op": "reserve"}) == 1
        assert len(lines.of("ledger_degraded")) == 1
        assert lines.of("ledger_degraded")[0]["policy"] == "count_locally"
        settled = await ledger.settle(usage(during[0].reservation, 7, 3))
        assert settled is not None and settled.cost.tokens == 10
        assert tokens(await ledger.local.used("acme", T)) == 4 * ESTIMATE + 10

    run(scenario, config())


def test_refuse_answers_503_ledger_unavailable() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        store.down = True
        for _ in range(3):
            with pytest.raises(LedgerUnavailable) as refused:
                await ledger.reserve("acme", "m", HI)
        err = refused.value
        assert (err.status, err.type, err.code, err.authz_status) == (503, "server_error", "ledger_unavailable", 424)
        assert json.loads(err.body())["error"]["code"] == "ledger_unavailable"
        assert store.calls_while_down == 1 and len(ledger.local) == 0
        assert lines.of("ledger_degraded")[0]["policy"] == "refuse"
        assert await ledger.reconcile() is False  # still down
        store.down = False
        assert await ledger.reconcile() is True
        assert not ledger.degraded and sample(ledger, "meshgen_ledger_degraded") == 0
        assert not (await ledger.reserve("acme", "m", HI)).reservation.startswith(LOCAL_PREFIX)

    run(scenario, config("refuse"))


def test_refuse_through_the_server_answers_envoy_424_with_the_503_body() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        store.down = True
        server = Server(ledger._config, ledger=ledger)
        _, port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = json.dumps(HI)
            writer.write(
                (
                    "POST /authz/v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n{body}"
                ).encode()
            )
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
            answer = json.loads(await reader.readexactly(length))
            writer.close()
        finally:
            await server.close()
        assert head.startswith("HTTP/1.1 424 Failed Dependency")
        assert answer["error"]["code"] == "ledger_unavailable" and answer["error"]["type"] == "server_error"
        assert sample(ledger, "meshgen_refusals_total", {"tenant": "acme", "reason": "ledger_unavailable"}) == 1

    run(scenario, config("refuse"))


def test_reconcile_replays_exact_estimated_and_open_reservations_once() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        before = await ledger.reserve("acme", "m", HI)
        await ledger.settle(usage(before.reservation, 7, 3))
        store.down = True
        exact, cut, still_open = [(await ledger.reserve("acme", "m", HI)).reservation for _ in range(3)]
        await ledger.settle(usage(exact, 7, 3))
        await ledger.settle(usage(cut, 7, 1, estimated=True))
        assert await ledger.reconcile() is False and ledger.degraded
        assert lines.of("ledger_recovered") == []
        store.down = False
        clock.now = T + 5
        assert await ledger.reconcile() is True
        assert not ledger.degraded and len(ledger.local) == 0
        assert [e["replayed"] for e in lines.of("ledger_recovered")] == [3]
        assert len(lines.of("ledger_degraded")) == 1
        assert sample(ledger, "meshgen_ledger_replayed_total") == 3
        used = await store.inner.used("acme", T)
        assert used[Limit.RPM] == 4 and tokens(used) == 10 + 10 + 8 + ESTIMATE  # the open one at its estimate
        # A late settle of a replayed local id lands on the store reservation it became: exactly once.
        late = await ledger.settle(usage(still_open, 7, 3))
        assert late is not None and not late.reservation.startswith(LOCAL_PREFIX)
        assert tokens(await store.inner.used("acme", T)) == 10 + 10 + 8 + 10
        await ledger.settle(usage(still_open, 7, 3))  # the same count again: no change
        await ledger.settle(usage(exact, 7, 3))
        assert tokens(await store.inner.used("acme", T)) == 10 + 10 + 8 + 10
        # The store keeps every state: only the open one is left for the sweep.
        expired = await store.inner.expire(T + 1000, T + 1000)
        assert expired == []
        assert tokens(await ledger.local.used("acme", T)) == 0

    run(scenario, config())


def test_a_settle_during_the_replay_still_lands() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        store.down = True
        rid = (await ledger.reserve("acme", "m", HI)).reservation
        store.down = False

        async def settle_meanwhile() -> None:  # the usage arrives while the replay's reserve is under way
            assert await ledger.settle(usage(rid, 7, 3)) is not None

        store.before_reserve = settle_meanwhile
        assert await ledger.reconcile() is True
        assert tokens(await store.inner.used("acme", T)) == 10
        assert await store.inner.expire(T + 1000, T + 1000) == []  # settled exact in the store, not left open

    run(scenario, config())


def test_settles_of_store_reservations_while_down_are_replayed() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        rid = (await ledger.reserve("acme", "m", HI)).reservation
        store.down = True
        assert await ledger.settle(usage(rid, 7, 3)) is None  # kept, not lost
        assert ledger.degraded and sample(ledger, "meshgen_ledger_errors_total", {"op": "settle"}) == 1
        assert tokens(await store.inner.used("acme", T)) == ESTIMATE
        store.down = False
        assert await ledger.reconcile() is True
        assert tokens(await store.inner.used("acme", T)) == 10

    run(scenario, config())


def test_the_sweep_settles_local_reservations_and_skips_the_dead_store() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        store.down = True
        rid = (await ledger.reserve("acme", "m", HI)).reservation
        clock.now = T + ledger.settle_after_s + 1
        swept = await ledger.sweep()
        assert [s.reservation for s in swept] == [rid] and store.calls_while_down == 1
        store.down = False
        assert await ledger.reconcile() is True
        assert tokens(await store.inner.used("acme", T)) == ESTIMATE
        assert await store.inner.expire(T + 10_000, T + 10_000) == []  # replayed as estimated: not swept twice
        # a late exact count still replaces the estimate
        await ledger.settle(usage(rid, 7, 3))
        assert tokens(await store.inner.used("acme", T)) == 10

    run(scenario, config())


def test_local_counting_starts_from_the_days_usage_the_store_last_reported() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        for _ in range(3):
            await ledger.reserve("acme", "m", HI)  # 36 of 50 tokens today
        store.down = True
        await ledger.reserve("acme", "m", HI)  # 48: fits
        with pytest.raises(LimitExceeded) as refused:
            await ledger.reserve("acme", "m", HI)  # 60: over, even though memory alone holds 12
        assert refused.value.limit == "tpd"

    run(scenario, config(tpd=50))


def test_budget_stages_while_degraded_are_marked_in_the_store_on_recovery() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        store.down = True
        await ledger.reserve("acme", "m", HI)  # 12 of 20 tokens a day: the 50 % stage, marked in memory
        assert len(lines.of("budget_alert")) == 1
        store.down = False
        assert await ledger.reconcile() is True
        day = int(T // DAY_S) * DAY_S
        assert await store.inner.mark_once(f"alert:acme:0.5:{day}", day + DAY_S, T) is False  # taken on recovery
        await ledger.reserve("acme", "m", {**HI, "max_tokens": 1})
        assert len(lines.of("budget_alert")) == 1  # not emitted again

    run(scenario, config(tpd=20))


def test_settle_many_routes_each_usage_as_settle_does() -> None:
    """One access-log batch mixing a store reservation, a local one, a replayed local one and an unknown id, with
    the store up, then down (kept and replayed), then up again: every count lands once, where settle puts it."""

    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        in_store = (await ledger.reserve("acme", "m", HI)).reservation
        store.down = True
        replayed, local = [(await ledger.reserve("acme", "m", HI)).reservation for _ in range(2)]
        assert replayed.startswith(LOCAL_PREFIX) and local.startswith(LOCAL_PREFIX)
        batch = [usage(in_store, 7, 3), usage(local, 7, 1), usage("unknown", 1, 1)]
        results = await ledger.settle_many(batch)
        assert results[0] is None and results[2] is None  # store ids: kept for the replay
        assert results[1] is not None and results[1].cost.tokens == 8  # settled in memory at once
        assert tokens(await ledger.local.used("acme", T)) == ESTIMATE + 8
        store.down = False
        assert await ledger.reconcile() is True
        assert tokens(await store.inner.used("acme", T)) == 10 + ESTIMATE + 8  # the kept settle replayed
        # After the replay: both local ids now settle in the store, once, whatever the batch repeats.
        again = await ledger.settle_many([usage(replayed, 7, 3), usage(local, 7, 1), usage(replayed, 7, 3)])
        assert [r is not None and not r.reservation.startswith(LOCAL_PREFIX) for r in again] == [True] * 3
        assert tokens(await store.inner.used("acme", T)) == 10 + 10 + 8
        exact = {"tenant": "acme", "model": "m", "count": "exact"}
        assert sample(ledger, "meshgen_settled_requests_total", exact) == 4  # as settle: a kept settle is not counted

    run(scenario, config())


def test_settle_many_checks_budget_stages_once_per_tenant_after_the_batch() -> None:
    async def scenario(ledger: Ledger, store: FlakyStore, lines: LogLines, clock: Clock) -> None:
        rids = [(await ledger.reserve("acme", "m", {**HI, "max_tokens": 1})).reservation for _ in range(2)]
        assert lines.of("budget_alert") == []  # 2 × 8 of 40 tokens
        reads = 0
        used = store.used

        async def counted(tenant: str, now: float) -> dict[Limit, float]:
            nonlocal reads
            reads += 1
            return await used(tenant, now)

        store.used = counted  # type: ignore[method-assign]
        await ledger.settle_many([usage(rids[0], 7, 3), usage(rids[1], 7, 13)])  # 10 + 20 of 40: crosses 50 %
        assert reads == 1
        assert [e["stage"] for e in lines.of("budget_alert")] == [0.5]

    run(scenario, config(tpd=40))
