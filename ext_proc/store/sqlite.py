"""The ledger in one SQLite file: for a single host (one or several processes sharing the file).

Writes are ``BEGIN IMMEDIATE`` transactions, so they are atomic against other connections and other processes on
the same file (WAL, ``synchronous=NORMAL``: a commit survives a process crash; a power loss can drop the last few).
The reserves of one event-loop tick share one transaction (group commit): each runs its statements at once and
waits for the commit that ends the tick, so an admitted reservation is on the file before its caller hears of it,
and one COMMIT is paid per tick instead of per request (the service's CPU per request fell 15–20 % side by side
under load). A settle, ``settle_many``, expire or mark first commits the open group, then runs in a transaction of
its own. Calls run synchronously inside the ``async`` methods, cheaper than a hop to a thread. A reserve is one
upsert of its four windows that returns their totals (taken back when a limit refuses) and one insert; a
``settle_many`` reads all its reservations in one statement and writes each changed one and each window's summed
delta. They block the event loop while they run, and for up to ``busy_timeout_s`` if another process holds the
write lock (which a group holds for the rest of its tick).

Tables: ``windows`` (tenant, kind, bucket start, value — USD in micro-dollars), ``reservations`` (id, tenant,
model, tokens, usd_micro, created, minute bucket, day bucket, state open|estimated|exact) and ``marks`` (key, end of
the window it is marked for: ``mark_once``). Clean-up is lazy, in ``expire()`` (at most once a minute of its
``now``): minute windows ended more than 2 minutes ago, day windows ended more than 2 days ago, settled reservations
made more than 2 days ago and marks whose window has ended are deleted — the same horizons as the Redis store's TTLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from ext_proc.store import _ledger as L
from ext_proc.store.base import DAY_S, MINUTE_S, Cost, Limit, Limits, Settled, SettleItem, SettleState, Verdict

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (tenant, kind, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    usd_micro INTEGER NOT NULL,
    created REAL NOT NULL,
    minute_bucket INTEGER NOT NULL,
    day_bucket INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'estimated', 'exact'))
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (
    key TEXT PRIMARY KEY,
    window_end REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS open_reservations ON reservations (created) WHERE state = 'open';
DROP INDEX IF EXISTS reservations_by_created;
"""

_USED = " UNION ALL ".join(
    f"SELECT '{kind}', value FROM windows WHERE tenant = ? AND kind = '{kind}' AND bucket = ?"
    for kind in ("rpm", "tpm", "tpd", "usd_per_day")
)
"""The tenant's four current windows (those that exist), as (kind, value) rows."""
_SHIFT = "UPDATE windows SET value = value + ? WHERE tenant = ? AND kind = ? AND bucket = ?"
_ADD_ALL = (
    "INSERT INTO windows (tenant, kind, bucket, value) "
    "VALUES (?, 'rpm', ?, 1), (?, 'tpm', ?, ?), (?, 'tpd', ?, ?), (?, 'usd_per_day', ?, ?) "
    "ON CONFLICT (tenant, kind, bucket) DO UPDATE SET value = value + excluded.value RETURNING kind, value"
)
"""A reservation's four additions, returning each window's total after it."""
_INSERT = "INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_READ_MANY = (
    "SELECT id, tenant, model, tokens, usd_micro, minute_bucket, day_bucket, state FROM reservations "
    "WHERE id IN (SELECT value FROM json_each(?))"
)
_UPDATE = "UPDATE reservations SET tokens = ?, usd_micro = ?, state = ? WHERE id = ?"

_MARK = (
    "INSERT INTO marks (key, window_end) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET window_end = excluded.window_end WHERE marks.window_end <= ?"
)

_OPEN = "open"
_EXACT = SettleState.EXACT.value
_RPM, _TPM, _TPD, _USD = (kind.value for kind in L.ORDER)


class SqliteStore:
    """``Store`` on SQLite. Open with :meth:`open`; one object per process (or per thread) — not shared across
    threads."""

    never_suspends: Final = False
    """An admitted reserve waits for its group's commit (see :attr:`ext_proc.ledger.Ledger.inline`)."""

    def __init__(self, file: _File) -> None:
        self._file = file
        self._conn = file.conn
        self._closed = False

    @classmethod
    def open(cls, path: str | Path, *, busy_timeout_s: float = 5.0) -> SqliteStore:
        """Open (creating file and schema if needed) the ledger at `path`. Stores of one thread on one file share
        its connection: a second connection's write would wait for the first's group commit, which waits for this
        thread's event loop — for ever."""
        key = (os.path.realpath(path), threading.get_ident())
        file = _open_files.get(key)
        if file is None:
            file = _open_files[key] = _File(_connect(path, busy_timeout_s))
        file.users += 1
        return cls(file)

    async def reserve(self, tenant: str, model: str, cost: Cost, limits: Limits, now: float) -> Verdict:
        """Group commit: the reserves of one event-loop tick share one write transaction, committed once they have
        all run (``loop.call_soon``); an admitted reserve returns when its transaction is committed, a refused one
        (which leaves nothing behind) at once. A failed commit raises in every reserve of its group."""
        L.check_cost(cost)
        group = self._group_now()
        try:
            verdict = self._reserve_in_transaction(tenant, model, cost, limits, now)
        except BaseException as exc:
            self._end_group(exc)  # the transaction's state is unknown: none of the group's writes stand
            raise
        if verdict.admitted:
            committed = asyncio.get_running_loop().create_future()
            group.append(committed)
            await committed
        return verdict

    def reserve_sync(self, tenant: str, model: str, cost: Cost, limits: Limits, now: float) -> Verdict:
        """:meth:`reserve` in a transaction of its own, committed before it returns (for callers without an event
        loop, such as threads with their own connections)."""
        L.check_cost(cost)
        self._end_group()
        with _immediate(self._conn):
            return self._reserve_in_transaction(tenant, model, cost, limits, now)

    def _reserve_in_transaction(self, tenant: str, model: str, cost: Cost, limits: Limits, now: float) -> Verdict:
        """The four windows are added to and read back in one upsert; a refusal takes its additions back."""
        tokens, usd_micro = cost.tokens, L.to_micro(cost.usd)
        minute, day = L.minute_bucket(now), L.day_bucket(now)
        conn = self._conn
        after = dict(
            conn.execute(
                _ADD_ALL, (tenant, minute, tenant, minute, tokens, tenant, day, tokens, tenant, day, usd_micro)
            ).fetchall()
        )
        totals = (after[_RPM], after[_TPM], after[_TPD], after[_USD])
        refused = L.first_over(totals, limits)
        if refused is None:
            reservation = L.new_id(now)
            conn.execute(_INSERT, (reservation, tenant, model, tokens, usd_micro, now, minute, day, _OPEN))
            return Verdict(True, reservation, None, 0, L.used_of(totals))
        conn.executemany(
            _SHIFT,
            [(-1, tenant, _RPM, minute), (-tokens, tenant, _TPM, minute), (-tokens, tenant, _TPD, day)]
            + [(-usd_micro, tenant, _USD, day)],
        )
        current = (totals[0] - 1, totals[1] - tokens, totals[2] - tokens, totals[3] - usd_micro)
        return Verdict(False, None, refused, L.retry_after(refused, now), L.used_of(current))

    def _group_now(self) -> list[asyncio.Future[None]]:
        """This tick's group: its transaction begun and its commit scheduled when it is the tick's first."""
        file = self._file
        if file.group is None:
            self._conn.execute("BEGIN IMMEDIATE")
            file.group = []
            asyncio.get_running_loop().call_soon(self._end_group)
        return file.group

    def _end_group(self, failed: BaseException | None = None) -> None:
        """Commit the open group (or, ``failed``, roll it back) and tell its reserves. Every other write calls it
        first: its own transaction cannot begin inside the group's."""
        file = self._file
        group, file.group = file.group, None
        if group is None:
            return
        error = failed
        if error is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                error = exc
        if error is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
        for waiter in group:
            if waiter.done():  # its reserve was cancelled
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(sqlite3.OperationalError(f"the ledger's commit failed: {type(error).__name__}"))

    async def settle(
        self, reservation: str, cost: Cost, now: float, state: SettleState = SettleState.EXACT
    ) -> Settled | None:
        return self.settle_many_sync(((reservation, cost, state),), now)[0]

    def settle_sync(
        self, reservation: str, cost: Cost, now: float, state: SettleState = SettleState.EXACT
    ) -> Settled | None:
        """:meth:`settle` without the coroutine (what it runs)."""
        return self.settle_many_sync(((reservation, cost, state),), now)[0]

    async def settle_many(self, items: Sequence[SettleItem], now: float) -> list[Settled | None]:
        return self.settle_many_sync(items, now)

    def settle_many_sync(self, items: Sequence[SettleItem], now: float) -> list[Settled | None]:
        """:meth:`settle_many` without the coroutine (what it runs): one transaction that reads every reservation
        in one statement, then writes the changed ones and each window's summed delta."""
        for _, cost, _ in items:
            L.check_cost(cost)
        if not items:
            return []
        self._end_group()
        conn = self._conn
        results: list[Settled | None] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            ids = json.dumps(list({reservation: None for reservation, _, _ in items}))
            rows = {row[0]: list(row[1:]) for row in conn.execute(_READ_MANY, (ids,))}
            shifts: dict[tuple[str, str, int], int] = {}
            updates: dict[str, tuple[int, int, str, str]] = {}
            for reservation, cost, state in items:
                row = rows.get(reservation)
                if row is None:
                    results.append(None)
                    continue
                tenant, model, tokens, old_micro, minute, day, state_was = row
                if state_was == _EXACT and state is SettleState.ESTIMATED:
                    results.append(None)
                    continue
                usd_micro = L.to_micro(cost.usd)
                results.append(Settled(reservation, tenant, model, state, Cost(cost.tokens, L.from_micro(usd_micro))))
                if state_was == _EXACT and tokens == cost.tokens and old_micro == usd_micro:
                    continue
                d_tokens, d_micro = cost.tokens - tokens, usd_micro - old_micro
                if d_tokens:
                    shifts[tenant, _TPM, minute] = shifts.get((tenant, _TPM, minute), 0) + d_tokens
                    shifts[tenant, _TPD, day] = shifts.get((tenant, _TPD, day), 0) + d_tokens
                if d_micro:
                    shifts[tenant, _USD, day] = shifts.get((tenant, _USD, day), 0) + d_micro
                row[2], row[3], row[6] = cost.tokens, usd_micro, state.value
                updates[reservation] = (cost.tokens, usd_micro, state.value, reservation)
            if shifts:
                conn.executemany(_SHIFT, [(delta, *key) for key, delta in shifts.items() if delta])
            if updates:
                conn.executemany(_UPDATE, updates.values())
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return results

    async def expire(self, reserved_before: float, now: float) -> list[Settled]:
        return self.expire_sync(reserved_before, now)

    def expire_sync(self, reserved_before: float, now: float) -> list[Settled]:
        """:meth:`expire` without the coroutine (what it runs); also deletes what is older than the store keeps."""
        self._end_group()
        conn = self._conn
        with _immediate(conn):
            rows = conn.execute(
                "SELECT id, tenant, model, tokens, usd_micro FROM reservations "
                "WHERE state = 'open' AND created < ? ORDER BY created",
                (reserved_before,),
            ).fetchall()
            conn.executemany(
                "UPDATE reservations SET state = ? WHERE id = ?",
                [(SettleState.ESTIMATED.value, row[0]) for row in rows],
            )
            if self._file.cleaned_at is None or now - self._file.cleaned_at >= MINUTE_S:
                self._clean(now)
                self._file.cleaned_at = now
        return [
            Settled(rid, tenant, model, SettleState.ESTIMATED, Cost(tokens, L.from_micro(micro)))
            for rid, tenant, model, tokens, micro in rows
        ]

    def _clean(self, now: float) -> None:
        conn = self._conn
        # a window [b, b + length) is dropped once it ended more than its keep ago: b + length < now - keep
        minute_cut = now - MINUTE_S - L.MINUTE_KEEP_S
        day_cut = now - DAY_S - L.KEEP_S
        conn.execute("DELETE FROM windows WHERE bucket < ? AND kind IN (?, ?)", (minute_cut, *_MINUTE_KINDS))
        conn.execute("DELETE FROM windows WHERE bucket < ? AND kind IN (?, ?)", (day_cut, *_DAY_KINDS))
        conn.execute("DELETE FROM reservations WHERE id < ? AND state != ?", (L.id_bound(now - L.KEEP_S), _OPEN))
        conn.execute("DELETE FROM marks WHERE window_end <= ?", (now,))

    async def used(self, tenant: str, now: float) -> dict[Limit, float]:
        return self.used_sync(tenant, now)

    def used_sync(self, tenant: str, now: float) -> dict[Limit, float]:
        """:meth:`used` without the coroutine (what it runs)."""
        minute, day = L.minute_bucket(now), L.day_bucket(now)
        found = dict(self._conn.execute(_USED, (tenant, minute, tenant, minute, tenant, day, tenant, day)))
        return L.used_of((found.get(_RPM, 0), found.get(_TPM, 0), found.get(_TPD, 0), found.get(_USD, 0)))

    async def mark_once(self, key: str, window_end: float, now: float) -> bool:
        return self.mark_once_sync(key, window_end, now)

    def mark_once_sync(self, key: str, window_end: float, now: float) -> bool:
        """:meth:`mark_once` without the coroutine (what it runs): one upsert that only overwrites an ended mark."""
        L.check_window(window_end, now)
        self._end_group()
        with _immediate(self._conn):
            cursor = self._conn.execute(_MARK, (key, window_end, now))
        return cursor.rowcount == 1

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end_group()
        file = self._file
        file.users -= 1
        if file.users == 0:
            _open_files.pop(next(k for k, f in _open_files.items() if f is file), None)
            self._conn.close()


class _File:
    """One ledger file's connection in one thread, and the group transaction open on it."""

    __slots__ = ("cleaned_at", "conn", "group", "users")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.users = 0
        self.cleaned_at: float | None = None
        self.group: list[asyncio.Future[None]] | None = None
        """The admitted reserves waiting for this tick's commit; None while no group transaction is open."""


_open_files: dict[tuple[str, int], _File] = {}


def _connect(path: str | Path, busy_timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        with _immediate(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


_MINUTE_KINDS = (Limit.RPM.value, Limit.TPM.value)
_DAY_KINDS = (Limit.TPD.value, Limit.USD_PER_DAY.value)


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (``BEGIN IMMEDIATE``): committed on leaving, rolled back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
