"""The ledger in this process's memory: the fallback while the real store (Redis, SQLite) does not answer.

Same promises as every ``Store`` (``base.py``), for one process only: nothing is shared with other replicas
and nothing survives a restart. The :class:`~ext_proc.ledger.Ledger` counts here while its store is down
(policy ``ledger_down: count_locally``) and replays what was counted into the store when it answers again:
:meth:`MemoryStore.reservations` lists what to replay, :meth:`MemoryStore.forget` drops one that was.

Reservation ids carry ``id_prefix`` (the ledger uses ``local:``), so a settle can tell where its reservation
lives. Clean-up is lazy, in :meth:`expire` (at most once a minute of its ``now``), at the same horizons as
the other stores. Every method runs without awaiting, so each is atomic on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ext_proc.store import _ledger as L
from ext_proc.store.base import DAY_S, MINUTE_S, Cost, Limit, Limits, Settled, SettleItem, SettleState, Verdict

__all__ = ["LocalReservation", "MemoryStore"]

_OPEN = "open"


@dataclass(slots=True)
class LocalReservation:
    """One reservation as the memory store holds it."""

    id: str
    tenant: str
    model: str
    tokens: int
    usd_micro: int
    created: float
    minute: int
    day: int
    state: str
    """``open``, ``estimated`` or ``exact``."""

    @property
    def cost(self) -> Cost:
        return Cost(self.tokens, L.from_micro(self.usd_micro))

    @property
    def settle_state(self) -> SettleState | None:
        """How it was settled; None while open."""
        return None if self.state == _OPEN else SettleState(self.state)


class MemoryStore:
    """``Store`` in a few dicts. One object per process; not thread-safe (the event loop's thread only)."""

    never_suspends: Final = True
    """Its coroutines finish without awaiting anything (see :attr:`ext_proc.ledger.Ledger.inline`)."""

    def __init__(self, *, id_prefix: str = "") -> None:
        self.id_prefix = id_prefix
        self._windows: dict[tuple[str, Limit, int], int] = {}
        self._reservations: dict[str, LocalReservation] = {}
        self._marks: dict[str, float] = {}
        self._cleaned_at: float | None = None

    async def reserve(self, tenant: str, model: str, cost: Cost, limits: Limits, now: float) -> Verdict:
        L.check_cost(cost)
        minute, day = L.minute_bucket(now), L.day_bucket(now)
        keys = _keys(tenant, minute, day)
        current = {kind: self._windows.get(keys[kind], 0) for kind in L.ORDER}
        adding = L.additions(cost)
        refused = L.first_violated(current, adding, limits)
        if refused is not None:
            return Verdict(False, None, refused, L.retry_after(refused, now), L.as_used(current))
        for kind in L.ORDER:
            self._windows[keys[kind]] = current[kind] + adding[kind]
        reservation = self.id_prefix + L.new_id(now)
        self._reservations[reservation] = LocalReservation(
            reservation, tenant, model, cost.tokens, adding[Limit.USD_PER_DAY], now, minute, day, _OPEN
        )
        after = {kind: current[kind] + adding[kind] for kind in L.ORDER}
        return Verdict(True, reservation, None, 0, L.as_used(after))

    async def settle(
        self, reservation: str, cost: Cost, now: float, state: SettleState = SettleState.EXACT
    ) -> Settled | None:
        L.check_cost(cost)
        usd_micro = L.to_micro(cost.usd)
        r = self._reservations.get(reservation)
        if r is None:
            return None
        if r.state == SettleState.EXACT.value and state is SettleState.ESTIMATED:
            return None
        settled = Settled(reservation, r.tenant, r.model, state, Cost(cost.tokens, L.from_micro(usd_micro)))
        if r.state == SettleState.EXACT.value and (r.tokens, r.usd_micro) == (cost.tokens, usd_micro):
            return settled
        self._shift(r, cost.tokens - r.tokens, usd_micro - r.usd_micro)
        r.tokens, r.usd_micro, r.state = cost.tokens, usd_micro, state.value
        return settled

    async def settle_many(self, items: Sequence[SettleItem], now: float) -> list[Settled | None]:
        for _, cost, _ in items:
            L.check_cost(cost)
        return [await self.settle(reservation, cost, now, state) for reservation, cost, state in items]

    async def expire(self, reserved_before: float, now: float) -> list[Settled]:
        due = sorted(
            (r for r in self._reservations.values() if r.state == _OPEN and r.created < reserved_before),
            key=lambda r: r.created,
        )
        for r in due:
            r.state = SettleState.ESTIMATED.value
        if self._cleaned_at is None or now - self._cleaned_at >= MINUTE_S:
            self._clean(now)
            self._cleaned_at = now
        return [Settled(r.id, r.tenant, r.model, SettleState.ESTIMATED, r.cost) for r in due]

    async def used(self, tenant: str, now: float) -> dict[Limit, float]:
        keys = _keys(tenant, L.minute_bucket(now), L.day_bucket(now))
        return L.as_used({kind: self._windows.get(keys[kind], 0) for kind in L.ORDER})

    async def mark_once(self, key: str, window_end: float, now: float) -> bool:
        L.check_window(window_end, now)
        held = self._marks.get(key)
        if held is not None and held > now:
            return False
        self._marks[key] = window_end
        return True

    async def close(self) -> None:
        """Nothing to release (what it holds stays readable: a shared instance may be opened again)."""

    # ---- for the ledger's replay into the real store ------------------------------------------------------------

    def reservations(self) -> list[LocalReservation]:
        """Every reservation held (open or settled), oldest first: a snapshot (copies)."""
        return [
            LocalReservation(r.id, r.tenant, r.model, r.tokens, r.usd_micro, r.created, r.minute, r.day, r.state)
            for r in sorted(self._reservations.values(), key=lambda r: r.created)
        ]

    def get(self, reservation: str) -> LocalReservation | None:
        return self._reservations.get(reservation)

    def forget(self, reservation: str) -> None:
        """Drop a reservation and take what it counts out of the windows (it now counts in the real store)."""
        r = self._reservations.pop(reservation, None)
        if r is None:
            return
        keys = _keys(r.tenant, r.minute, r.day)
        for kind, amount in ((Limit.RPM, 1), (Limit.TPM, r.tokens), (Limit.TPD, r.tokens)):
            self._take(keys[kind], amount)
        self._take(keys[Limit.USD_PER_DAY], r.usd_micro)

    def __len__(self) -> int:
        return len(self._reservations)

    def _take(self, key: tuple[str, Limit, int], amount: int) -> None:
        if key in self._windows:
            self._windows[key] -= amount

    def _shift(self, r: LocalReservation, d_tokens: int, d_micro: int) -> None:
        keys = _keys(r.tenant, r.minute, r.day)
        for kind, delta in ((Limit.TPM, d_tokens), (Limit.TPD, d_tokens), (Limit.USD_PER_DAY, d_micro)):
            if delta and keys[kind] in self._windows:  # a window no longer kept is skipped, never re-created
                self._windows[keys[kind]] += delta

    def _clean(self, now: float) -> None:
        minute_cut = now - MINUTE_S - L.MINUTE_KEEP_S
        day_cut = now - DAY_S - L.KEEP_S
        for key in [k for k in self._windows if k[2] < (minute_cut if k[1] in L.MINUTE_KINDS else day_cut)]:
            del self._windows[key]
        keep_from = now - L.KEEP_S
        for rid in [rid for rid, r in self._reservations.items() if r.created < keep_from and r.state != _OPEN]:
            del self._reservations[rid]
        for mark in [k for k, end in self._marks.items() if end <= now]:
            del self._marks[mark]


def _keys(tenant: str, minute: int, day: int) -> dict[Limit, tuple[str, Limit, int]]:
    return {
        Limit.RPM: (tenant, Limit.RPM, minute),
        Limit.TPM: (tenant, Limit.TPM, minute),
        Limit.TPD: (tenant, Limit.TPD, day),
        Limit.USD_PER_DAY: (tenant, Limit.USD_PER_DAY, day),
    }
