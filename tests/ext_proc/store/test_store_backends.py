"""What only one store does: SQLite's file locking and clean-up, Redis's keys and TTLs."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import redis.asyncio as aioredis

from ext_proc.store.base import DAY_S, MINUTE_S, Cost, Limit, Limits
from ext_proc.store.memory import MemoryStore
from ext_proc.store.redis import RedisStore
from ext_proc.store.sqlite import SqliteStore

T = 19_675 * DAY_S + 3600 + 15.5


# ---- SQLite -----------------------------------------------------------------------------------------


def test_sqlite_threads_with_their_own_connections_never_exceed_tpm(tmp_path: Path) -> None:
    """Two connections writing at the same time (as two processes would): BEGIN IMMEDIATE serialises them."""
    path = tmp_path / "ledger.sqlite3"
    SqliteStore.open(path).reserve_sync("warm", "m", Cost(0, 0), Limits(), T)  # schema ready before the race
    admitted: list[int] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        async def main() -> None:
            store = SqliteStore.open(path)
            try:
                barrier.wait()
                for _ in range(25):
                    v = await store.reserve("acme", "m", Cost(30, 0), Limits(tpm=1000), T)
                    admitted.append(int(v.admitted))
            finally:
                await store.close()

        asyncio.run(main())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 100 and sum(admitted) == 1000 // 30

    async def check() -> None:
        store = SqliteStore.open(path)
        try:
            assert await store.used("acme", T) == {Limit.RPM: 33, Limit.TPM: 990, Limit.TPD: 990, Limit.USD_PER_DAY: 0}
        finally:
            await store.close()

    asyncio.run(check())


def test_sqlite_reserves_of_one_tick_share_one_commit_and_each_returns_once_it_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    other = sqlite3.connect(str(path), isolation_level=None)  # another process's view of the file

    def on_file() -> int:
        return int(other.execute("SELECT count(*) FROM reservations").fetchone()[0])

    async def main() -> None:
        store = SqliteStore.open(path)
        try:
            seen: list[int] = []

            async def reserve() -> None:
                verdict = await store.reserve("acme", "m", Cost(10, 0), Limits(rpm=8), T)
                seen.append(on_file() if verdict.admitted else -1)

            statements: list[str] = []
            store._conn.set_trace_callback(statements.append)
            await asyncio.gather(*(reserve() for _ in range(10)))
            assert statements.count("BEGIN IMMEDIATE") == statements.count("COMMIT") == 1, statements
            # 8 admitted, each saw its reservation on the file when it returned; the 2 refused left nothing
            assert sorted(seen) == [-1, -1, *[8] * 8]
            assert on_file() == 8
        finally:
            await store.close()

    asyncio.run(main())
    other.close()


def test_sqlite_pragmas_and_schema(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "l.db")
    try:
        assert store._conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert store._conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    finally:
        asyncio.run(store.close())
    again = SqliteStore.open(tmp_path / "l.db")  # re-opening an existing ledger is fine
    asyncio.run(again.close())


def test_sqlite_expire_deletes_what_is_older_than_kept(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteStore.open(tmp_path / "l.db")
        try:
            old = (await store.reserve("acme", "m", Cost(100, 0.1), Limits(), T)).reservation
            settled = (await store.reserve("acme", "m", Cost(10, 0.1), Limits(), T)).reservation
            assert old and settled and await store.settle(settled, Cost(10, 0.1), T)
            # five minutes on: the minute windows are gone, the day windows stay; reservations stay
            assert await store.expire(T + 1, T + 5 * MINUTE_S) != []
            assert await store.settle(old, Cost(50, 0.05), T + 5 * MINUTE_S) is not None
            assert await store.used("acme", T) == {
                Limit.RPM: 0,
                Limit.TPM: 0,  # skipped silently, not re-created
                Limit.TPD: 60,
                Limit.USD_PER_DAY: 0.15,
            }
            # three days on: everything settled and made more than 2 days ago is gone
            assert await store.expire(T + 3 * DAY_S, T + 3 * DAY_S) == []
            assert await store.settle(old, Cost(1, 0), T + 3 * DAY_S) is None
            counts = [
                store._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("windows", "reservations")
            ]
            assert counts == [0, 0]
        finally:
            await store.close()

    asyncio.run(main())


def test_sqlite_a_failed_transaction_rolls_back(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "l.db")
    try:
        store._conn.execute("DROP TABLE reservations")  # the INSERT after the window updates fails
        try:
            store.reserve_sync("acme", "m", Cost(5, 0), Limits(), T)
        except sqlite3.OperationalError:
            pass
        else:
            raise AssertionError("expected the reserve to fail")
        assert store.used_sync("acme", T)[Limit.TPM] == 0
        assert not store._conn.in_transaction
    finally:
        asyncio.run(store.close())


# ---- Redis ------------------------------------------------------------------------------------------


def test_redis_keys_and_ttls(redis_url: str) -> None:
    async def main() -> None:
        store = RedisStore.from_url(redis_url, prefix="t:")
        raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            v = await store.reserve("acme", "m", Cost(7, 0.5), Limits(), T)
            minute, day = int(T // 60) * 60, int(T // DAY_S) * DAY_S
            windows = {
                f"t:w:acme:rpm:{minute}": "1",
                f"t:w:acme:tpm:{minute}": "7",
                f"t:w:acme:tpd:{day}": "7",
                f"t:w:acme:usd_per_day:{day}": "500000",
            }
            for key, value in windows.items():
                assert await raw.get(key) == value
                ttl = await raw.ttl(key)
                assert (0 < ttl <= 2 * MINUTE_S) if ":rpm:" in key or ":tpm:" in key else (DAY_S < ttl <= 2 * DAY_S)
            r = f"t:r:{v.reservation}"
            assert (await raw.hgetall(r))["state"] == "open"
            assert DAY_S < await raw.ttl(r) <= 2 * DAY_S
            assert await raw.zscore("t:open", v.reservation or "") == T
        finally:
            await store.close()
            await raw.aclose()

    asyncio.run(main())


def test_redis_settle_skips_an_expired_window(redis_url: str) -> None:
    async def main() -> None:
        store = RedisStore(aioredis.Redis.from_url(redis_url, decode_responses=True))
        raw = aioredis.Redis.from_url(redis_url)
        try:
            v = await store.reserve("acme", "m", Cost(100, 0.1), Limits(), T)
            assert v.reservation
            tpm = f"meshgen:w:acme:tpm:{int(T // 60) * 60}"
            await raw.delete(tpm)  # as its TTL would
            s = await store.settle(v.reservation, Cost(40, 0.04), T + 200)
            assert s is not None and s.tenant == "acme"
            assert await raw.exists(tpm) == 0
            assert await store.used("acme", T) == {
                Limit.RPM: 1,
                Limit.TPM: 0,
                Limit.TPD: 40,
                Limit.USD_PER_DAY: 0.04,
            }
            assert await raw.zcard("meshgen:open") == 0
        finally:
            await store.close()
            await raw.aclose()

    asyncio.run(main())


def test_redis_expire_walks_more_than_one_batch(redis_url: str) -> None:
    async def main() -> None:
        store = RedisStore.from_url(redis_url)
        try:
            for i in range(1203):
                await store.reserve("acme", "m", Cost(1, 0), Limits(), T + i / 1000)
            expired = await store.expire(T + 10, T + 10)
            assert len(expired) == 1203 and len({e.reservation for e in expired}) == 1203
            assert await store.expire(T + 10, T + 10) == []
        finally:
            await store.close()

    asyncio.run(main())


# ---- memory (the ledger's fallback while the store is down) ------------------------------------------------------


def test_memory_ids_carry_the_prefix_and_forget_takes_a_reservation_out_of_the_windows() -> None:
    async def main() -> None:
        store = MemoryStore(id_prefix="local:")
        a = (await store.reserve("acme", "m", Cost(100, 0.1), Limits(), T)).reservation
        b = (await store.reserve("acme", "m", Cost(50, 0.05), Limits(), T + 1)).reservation
        assert a and b and a.startswith("local:") and b.startswith("local:")
        await store.settle(a, Cost(30, 0.03), T + 2)
        assert [(r.id, r.tokens, r.state) for r in store.reservations()] == [(a, 30, "exact"), (b, 50, "open")]
        store.forget(a)
        assert len(store) == 1 and store.get(a) is None
        assert await store.used("acme", T) == {Limit.RPM: 1, Limit.TPM: 50, Limit.TPD: 50, Limit.USD_PER_DAY: 0.05}
        assert await store.settle(a, Cost(1, 0), T + 3) is None

    asyncio.run(main())
