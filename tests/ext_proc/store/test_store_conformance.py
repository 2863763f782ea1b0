"""One suite, every store: what ``ext_proc.store.base.Store`` promises, on SQLite, on a real Redis and in memory.

Time is a fake clock: T is 15.5 s into a minute, 3615.5 s into a UTC day.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from ext_proc.store.base import DAY_S, MINUTE_S, Cost, Limit, Limits, Settled, SettleState, Store, Verdict
from tests.ext_proc.store.kit import OpenStore

DAY0 = 19_675 * DAY_S  # 2023-11-14T00:00:00Z
MINUTE0 = DAY0 + 3600
T = MINUTE0 + 15.5
MINUTE_LEFT = 45  # ceil(60 - 15.5)
DAY_LEFT = 82_785  # ceil(86400 - 3615.5)

ONE = Cost(tokens=10, usd=0.01)


def run(open_store: OpenStore, scenario: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        async with open_store() as store:
            await scenario(store)

    asyncio.run(main())


def used(rpm: int = 0, tpm: int = 0, tpd: int = 0, usd: float = 0.0) -> dict[Limit, float]:
    return {Limit.RPM: rpm, Limit.TPM: tpm, Limit.TPD: tpd, Limit.USD_PER_DAY: usd}


def refused(v: Verdict, by: Limit, retry: int) -> None:
    assert (v.admitted, v.reservation, v.refused_by, v.retry_after_s) == (False, None, by, retry)


# ---- admission --------------------------------------------------------------------------------------


def test_admit_counts_every_window_even_unlimited(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        v = await s.reserve("acme", "gpt", Cost(100, 0.25), Limits(), T)
        assert v.admitted and v.reservation and v.refused_by is None and v.retry_after_s == 0
        assert v.used == used(1, 100, 100, 0.25)
        assert await s.used("acme", T) == used(1, 100, 100, 0.25)
        assert await s.used("other", T) == used()
        v2 = await s.reserve("acme", "gpt", Cost(1, 0.0), Limits(), T)
        assert v2.reservation != v.reservation

    run(open_store, scenario)


def test_refuse_rpm(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        limits = Limits(rpm=2)
        assert (await s.reserve("acme", "m", ONE, limits, T)).admitted
        assert (await s.reserve("acme", "m", ONE, limits, T)).admitted
        v = await s.reserve("acme", "m", ONE, limits, T)
        refused(v, Limit.RPM, MINUTE_LEFT)
        assert v.used == used(2, 20, 20, 0.02)
        assert await s.used("acme", T) == used(2, 20, 20, 0.02)

    run(open_store, scenario)


def test_refuse_tpm(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        limits = Limits(rpm=100, tpm=100)
        assert (await s.reserve("acme", "m", Cost(60, 0.1), limits, T)).admitted
        assert (await s.reserve("acme", "m", Cost(40, 0.1), limits, T)).admitted  # exactly at the limit
        v = await s.reserve("acme", "m", Cost(1, 0.0), limits, T)
        refused(v, Limit.TPM, MINUTE_LEFT)
        assert await s.used("acme", T) == used(2, 100, 100, 0.2)

    run(open_store, scenario)


def test_refuse_tpd_across_minutes(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        limits = Limits(tpm=100, tpd=150)
        assert (await s.reserve("acme", "m", Cost(100, 0), limits, T)).admitted
        later = T + 2 * MINUTE_S  # a fresh minute, the same day
        v = await s.reserve("acme", "m", Cost(60, 0), limits, later)
        refused(v, Limit.TPD, DAY_LEFT - 2 * MINUTE_S)
        assert v.used == used(0, 0, 100, 0)
        assert (await s.reserve("acme", "m", Cost(50, 0), limits, later)).admitted

    run(open_store, scenario)


def test_refuse_usd_per_day(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        limits = Limits(usd_per_day=1.0)
        assert (await s.reserve("acme", "m", Cost(1, 0.75), limits, T)).admitted
        v = await s.reserve("acme", "m", Cost(1, 0.250001), limits, T)
        refused(v, Limit.USD_PER_DAY, DAY_LEFT)
        assert (await s.reserve("acme", "m", Cost(1, 0.25), limits, T)).admitted
        assert await s.used("acme", T) == used(2, 2, 2, 1.0)

    run(open_store, scenario)


def test_first_violated_limit_in_order(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        assert (await s.reserve("acme", "m", Cost(100, 1.0), Limits(), T)).admitted
        everything = Limits(rpm=1, tpm=100, tpd=100, usd_per_day=1.0)
        refused(await s.reserve("acme", "m", ONE, everything, T), Limit.RPM, MINUTE_LEFT)
        no_rpm = Limits(tpm=100, tpd=100, usd_per_day=1.0)
        refused(await s.reserve("acme", "m", ONE, no_rpm, T), Limit.TPM, MINUTE_LEFT)
        refused(await s.reserve("acme", "m", ONE, Limits(tpd=100, usd_per_day=1.0), T), Limit.TPD, DAY_LEFT)
        refused(await s.reserve("acme", "m", ONE, Limits(usd_per_day=1.0), T), Limit.USD_PER_DAY, DAY_LEFT)
        assert await s.used("acme", T) == used(1, 100, 100, 1.0)

    run(open_store, scenario)


def test_cost_above_the_limit_refused_on_an_empty_window(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        refused(await s.reserve("acme", "m", Cost(101, 0), Limits(tpm=100), T), Limit.TPM, MINUTE_LEFT)
        refused(await s.reserve("acme", "m", Cost(1, 2.0), Limits(usd_per_day=1.5), T), Limit.USD_PER_DAY, DAY_LEFT)
        refused(await s.reserve("acme", "m", ONE, Limits(rpm=0), T), Limit.RPM, MINUTE_LEFT)
        assert await s.used("acme", T) == used()

    run(open_store, scenario)


def test_tenants_are_separate(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        assert (await s.reserve("a", "m", Cost(100, 0), Limits(tpm=100), T)).admitted
        assert (await s.reserve("b", "m", Cost(100, 0), Limits(tpm=100), T)).admitted
        refused(await s.reserve("a", "m", ONE, Limits(tpm=100), T), Limit.TPM, MINUTE_LEFT)

    run(open_store, scenario)


# ---- windows roll over with the clock ---------------------------------------------------------------


def test_minute_rollover(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        limits = Limits(rpm=1, tpm=100)
        assert (await s.reserve("acme", "m", Cost(100, 0), limits, T)).admitted
        almost = MINUTE0 + MINUTE_S - 0.2
        refused(await s.reserve("acme", "m", ONE, limits, almost), Limit.RPM, 1)  # ceil(0.2), never 0
        v = await s.reserve("acme", "m", Cost(100, 0), limits, MINUTE0 + MINUTE_S)  # on the boundary: new window
        assert v.admitted and v.used == used(1, 100, 200, 0)

    run(open_store, scenario)


def test_day_rollover(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        limits = Limits(tpd=100, usd_per_day=1.0)
        assert (await s.reserve("acme", "m", Cost(100, 1.0), limits, T)).admitted
        last = DAY0 + DAY_S - 0.5
        refused(await s.reserve("acme", "m", Cost(1, 0), limits, last), Limit.TPD, 1)
        refused(await s.reserve("acme", "m", Cost(0, 0.01), limits, last), Limit.USD_PER_DAY, 1)
        v = await s.reserve("acme", "m", Cost(100, 1.0), limits, DAY0 + DAY_S)
        assert v.admitted and v.used == used(1, 100, 100, 1.0)
        assert await s.used("acme", DAY0 + DAY_S) == used(1, 100, 100, 1.0)

    run(open_store, scenario)


# ---- settle -----------------------------------------------------------------------------------------


def test_settle_replaces_the_estimate_down_and_up(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        v = await s.reserve("acme", "gpt", Cost(1000, 0.5), Limits(tpm=2000), T)
        assert v.reservation
        down = await s.settle(v.reservation, Cost(400, 0.2), T + 1)
        assert down == Settled(v.reservation, "acme", "gpt", SettleState.EXACT, Cost(400, 0.2))
        assert await s.used("acme", T + 1) == used(1, 400, 400, 0.2)
        up = await s.settle(v.reservation, Cost(1500, 0.75), T + 2)
        assert up == Settled(v.reservation, "acme", "gpt", SettleState.EXACT, Cost(1500, 0.75))  # last exact wins
        assert await s.used("acme", T + 2) == used(1, 1500, 1500, 0.75)
        refused(await s.reserve("acme", "gpt", Cost(501, 0), Limits(tpm=2000), T + 3), Limit.TPM, MINUTE_LEFT - 3)

    run(open_store, scenario)


def test_settle_lands_in_the_windows_reserved_in(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        v = await s.reserve("acme", "m", Cost(100, 0.1), Limits(), T)
        assert v.reservation
        next_minute = MINUTE0 + MINUTE_S + 5
        assert await s.settle(v.reservation, Cost(30, 0.05), next_minute) is not None
        assert await s.used("acme", T) == used(1, 30, 30, 0.05)  # the old minute window changed
        assert await s.used("acme", next_minute) == used(0, 0, 30, 0.05)  # the current one did not

    run(open_store, scenario)


def test_exact_settle_twice_is_a_no_op(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        v = await s.reserve("acme", "m", Cost(100, 0.1), Limits(), T)
        assert v.reservation
        first = await s.settle(v.reservation, Cost(70, 0.07), T + 1)
        second = await s.settle(v.reservation, Cost(70, 0.07), T + 2)
        assert first == second == Settled(v.reservation, "acme", "m", SettleState.EXACT, Cost(70, 0.07))
        assert await s.used("acme", T) == used(1, 70, 70, 0.07)

    run(open_store, scenario)


def test_expire_estimates_then_a_late_exact_replaces(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        a = (await s.reserve("acme", "m", Cost(100, 0.1), Limits(), T)).reservation
        b = (await s.reserve("acme", "m", Cost(50, 0.05), Limits(), T + 10)).reservation
        c = (await s.reserve("acme", "m", Cost(20, 0.02), Limits(), T + 1)).reservation
        assert a and b and c
        assert await s.settle(c, Cost(20, 0.02), T + 2) is not None  # settled: never expired
        expired = await s.expire(T + 10, T + 30)  # reserved strictly before T + 10
        assert expired == [Settled(a, "acme", "m", SettleState.ESTIMATED, Cost(100, 0.1))]
        assert await s.expire(T + 10, T + 31) == []  # once only
        assert await s.used("acme", T + 30) == used(3, 170, 170, 0.17)  # kept at the estimate, not released
        late = await s.settle(a, Cost(80, 0.08), T + 40)
        assert late == Settled(a, "acme", "m", SettleState.EXACT, Cost(80, 0.08))
        assert await s.used("acme", T + 40) == used(3, 150, 150, 0.15)
        assert await s.settle(a, Cost(80, 0.08), T + 41) == late
        assert await s.used("acme", T + 41) == used(3, 150, 150, 0.15)
        assert [x.reservation for x in await s.expire(T + 100, T + 100)] == [b]

    run(open_store, scenario)


def test_an_estimated_settle_never_replaces_an_exact_one(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        cut = (await s.reserve("acme", "m", Cost(100, 0.1), Limits(), T)).reservation
        done = (await s.reserve("acme", "m", Cost(100, 0.1), Limits(), T)).reservation
        assert cut and done
        # A stream cut before its usage: counted with the tokenizer, marked estimated, no longer open.
        estimated = await s.settle(cut, Cost(30, 0.03), T + 1, SettleState.ESTIMATED)
        assert estimated == Settled(cut, "acme", "m", SettleState.ESTIMATED, Cost(30, 0.03))
        assert await s.expire(T + 10, T + 10) == [Settled(done, "acme", "m", SettleState.ESTIMATED, Cost(100, 0.1))]
        await s.settle(done, Cost(40, 0.04), T + 11)
        assert await s.settle(done, Cost(5, 0.005), T + 12, SettleState.ESTIMATED) is None
        assert await s.used("acme", T + 12) == used(2, 70, 70, 0.07)
        # The exact count, when it does arrive, still replaces the estimate.
        assert (await s.settle(cut, Cost(35, 0.035), T + 13)) == Settled(
            cut, "acme", "m", SettleState.EXACT, Cost(35, 0.035)
        )
        assert await s.used("acme", T + 13) == used(2, 75, 75, 0.075)

    run(open_store, scenario)


def test_expire_at_the_estimate_keeps_the_windows(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        ids = [(await s.reserve("t", "m", Cost(i, 0), Limits(), T + i)).reservation for i in range(1, 6)]
        expired = await s.expire(T + 100, T + 100)
        assert sorted(x.reservation or "" for x in expired) == sorted(i or "" for i in ids)
        assert {x.state for x in expired} == {SettleState.ESTIMATED}
        assert await s.used("t", T + 5) == used(5, 15, 15, 0)

    run(open_store, scenario)


def test_unknown_reservation(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        assert await s.settle("0" * 32, Cost(1, 0.0), T) is None
        assert await s.settle("nope", Cost(1, 0.0), T) is None
        assert await s.used("acme", T) == used()

    run(open_store, scenario)


def test_negative_cost_rejected(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        with pytest.raises(ValueError):
            await s.reserve("acme", "m", Cost(-1, 0.0), Limits(), T)

    run(open_store, scenario)


def test_settle_many_is_settle_of_each_in_order(open_store: OpenStore) -> None:
    """The same settles, one by one for tenant `one` and in one settle_many for tenant `many`: the same results
    and the same windows — repeats of one id, an estimate after an exact count and unknown ids included."""

    async def scenario(s: Store) -> None:
        plans: dict[str, list[str]] = {}
        for tenant in ("one", "many"):
            ids = [(await s.reserve(tenant, "m", Cost(100, 0.1), Limits(), T)).reservation or "" for _ in range(4)]
            plans[tenant] = ids

        def steps(ids: list[str]) -> list[tuple[str, Cost, SettleState]]:
            a, b, c, _ = ids  # the fourth stays open
            return [
                (a, Cost(40, 0.04), SettleState.EXACT),
                (b, Cost(30, 0.03), SettleState.ESTIMATED),
                ("0" * 32, Cost(1, 0.0), SettleState.EXACT),
                (a, Cost(45, 0.045), SettleState.EXACT),  # the last exact count wins
                (a, Cost(5, 0.005), SettleState.ESTIMATED),  # never replaces an exact one: None
                (b, Cost(35, 0.035), SettleState.EXACT),  # an exact count replaces the estimate
                (c, Cost(100, 0.1), SettleState.EXACT),  # the estimate itself, made exact
                (a, Cost(45, 0.045), SettleState.EXACT),  # the same exact count again: no change
                ("nope", Cost(1, 0.0), SettleState.ESTIMATED),
            ]

        one = [await s.settle(r, cost, T + 5, state) for r, cost, state in steps(plans["one"])]
        many = await s.settle_many(steps(plans["many"]), T + 5)
        assert len(many) == len(one)
        for x, y in zip(one, many, strict=True):
            assert (x is None) == (y is None)
            if x is not None and y is not None:
                assert (x.tenant, y.tenant) == ("one", "many")
                assert (x.model, x.state, x.cost) == (y.model, y.state, y.cost)
        assert [x is None for x in many] == [False, False, True, False, True, False, False, False, True]
        assert await s.used("many", T + 5) == await s.used("one", T + 5) == used(4, 280, 280, 0.28)
        assert await s.settle_many([], T + 5) == []

    run(open_store, scenario)


def test_settle_many_spans_windows_and_tenants(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        next_minute = MINUTE0 + MINUTE_S + 5
        a = (await s.reserve("acme", "m", Cost(100, 0.1), Limits(), T)).reservation or ""
        b = (await s.reserve("acme", "m", Cost(100, 0.1), Limits(), next_minute)).reservation or ""
        c = (await s.reserve("zeta", "m", Cost(100, 0.1), Limits(), T)).reservation or ""
        items = [(a, Cost(10, 0.01), SettleState.EXACT), (b, Cost(20, 0.02), SettleState.EXACT)]
        settled = await s.settle_many([*items, (c, Cost(300, 0.3), SettleState.EXACT)], next_minute)
        assert [(x.reservation, x.tenant) for x in settled if x is not None] == [(a, "acme"), (b, "acme"), (c, "zeta")]
        assert await s.used("acme", T) == used(1, 10, 30, 0.03)
        assert await s.used("acme", next_minute) == used(1, 20, 30, 0.03)
        assert await s.used("zeta", T) == used(1, 300, 300, 0.3)

    run(open_store, scenario)


def test_settle_many_with_a_negative_cost_changes_nothing(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        a = (await s.reserve("acme", "m", Cost(100, 0.1), Limits(), T)).reservation or ""
        with pytest.raises(ValueError):
            await s.settle_many([(a, Cost(10, 0.01), SettleState.EXACT), (a, Cost(-1, 0.0), SettleState.EXACT)], T)
        assert await s.used("acme", T) == used(1, 100, 100, 0.1)

    run(open_store, scenario)


# ---- exactness and concurrency ----------------------------------------------------------------------


def test_usd_is_counted_in_micro_dollars(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        limits = Limits(usd_per_day=0.3)
        assert (await s.reserve("acme", "m", Cost(1, 0.1), limits, T)).admitted
        v = await s.reserve("acme", "m", Cost(1, 0.2), limits, T)  # 0.1 + 0.2 > 0.3 in floats; not here
        assert v.admitted and v.used[Limit.USD_PER_DAY] == 0.3
        refused(await s.reserve("acme", "m", Cost(1, 0.000001), limits, T), Limit.USD_PER_DAY, DAY_LEFT)
        for _ in range(10):
            await s.reserve("z", "m", Cost(0, 0.1), Limits(), T)
        assert (await s.used("z", T))[Limit.USD_PER_DAY] == 1.0
        assert (await s.used("acme", T))[Limit.USD_PER_DAY] == 0.3

    run(open_store, scenario)


def test_50_concurrent_reserves_never_exceed_tpm(open_store: OpenStore) -> None:
    limit = 1000

    async def main() -> None:
        async with open_store() as one, open_store() as two:
            stores = (one, two)
            rng = random.Random(7)
            costs = [Cost(rng.randint(1, 60), rng.randint(1, 900) / 1e6) for _ in range(50)]
            verdicts = await asyncio.gather(
                *(stores[i % 2].reserve("acme", "m", c, Limits(tpm=limit), T) for i, c in enumerate(costs))
            )
            won = [c for c, v in zip(costs, verdicts, strict=True) if v.admitted]
            lost = [v for v in verdicts if not v.admitted]
            assert lost and won, "the costs are drawn so that some fit and some do not"
            assert all(v.refused_by is Limit.TPM and v.retry_after_s == MINUTE_LEFT for v in lost)
            tokens = sum(c.tokens for c in won)
            micro = sum(round(c.usd * 1e6) for c in won)
            assert tokens <= limit
            # refused reserves left no trace: the windows hold exactly the admitted ones
            assert await one.used("acme", T) == used(len(won), tokens, tokens, micro / 1e6)
            assert len(await two.expire(T + 1, T + 1)) == len(won)

            same = await asyncio.gather(
                *(stores[i % 2].reserve("b", "m", Cost(30, 0), Limits(tpm=limit), T) for i in range(50))
            )
            assert sum(v.admitted for v in same) == limit // 30
            assert (await two.used("b", T))[Limit.TPM] == (limit // 30) * 30

    asyncio.run(main())


# ---- mark_once: a budget stage is emitted once per window, across replicas ---------------------------


def test_mark_once_first_caller_only(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        end = DAY0 + DAY_S
        assert await s.mark_once("alert:acme:0.8", end, T) is True
        assert await s.mark_once("alert:acme:0.8", end, T + 1) is False
        assert await s.mark_once("alert:acme:0.8", end, end - 0.5) is False
        assert await s.mark_once("alert:acme:0.9", end, T) is True  # another key
        assert await s.mark_once("alert:other:0.8", end, T) is True

    run(open_store, scenario)


def test_mark_once_again_after_its_window_ends(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        end = DAY0 + DAY_S
        assert await s.mark_once("k", end, T) is True
        assert await s.mark_once("k", end + DAY_S, end) is True  # the old mark ended at `end`
        assert await s.mark_once("k", end + DAY_S, end + 1) is False

    run(open_store, scenario)


def test_mark_once_needs_a_window_after_now(open_store: OpenStore) -> None:
    async def scenario(s: Store) -> None:
        with pytest.raises(ValueError, match="after now"):
            await s.mark_once("k", T, T)
        assert await s.mark_once("k", T + 1, T) is True  # nothing was marked by the refused call

    run(open_store, scenario)


def test_mark_once_is_shared_by_stores_on_one_ledger(open_store: OpenStore) -> None:
    async def main() -> None:
        async with open_store() as a, open_store() as b:
            end = DAY0 + DAY_S
            assert await b.mark_once("k", end, T) is True
            assert await a.mark_once("k", end, T) is False

    asyncio.run(main())


def test_mark_once_concurrent_callers_one_winner(open_store: OpenStore) -> None:
    async def main() -> None:
        async with open_store() as a, open_store() as b:
            end = DAY0 + DAY_S
            calls = [s.mark_once("race", end, T) for s in (a, b) for _ in range(20)]
            assert sorted(await asyncio.gather(*calls)) == [False] * 39 + [True]

    asyncio.run(main())
