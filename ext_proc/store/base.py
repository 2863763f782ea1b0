"""The ledger of tokens and dollars per tenant: what every store (SQLite, Redis) promises.

Reserve, then reconcile. At admission the service *reserves* an estimate (prompt tokens + max_tokens, and its
price) against every limit of the tenant at once — admitted or refused atomically, so concurrent requests
cannot all slip under a limit together. When the usage arrives (access log for JSON, ext_proc for streams) the
reservation is *settled*: the estimate is replaced by the real count in the windows it was counted in. A
reservation whose usage never arrives is settled at its estimate after a bounded time and marked estimated —
never silently released — and a late exact count still replaces that estimate.

Windows are aligned to the clock (UTC minute for rpm/tpm, UTC day for tpd/usd_per_day) and expire by themselves.
Time is only ever the `now` the caller passes (a fake clock in tests). USD is counted in integer micro-dollars, so
sums are exact (limits too are compared in micro-dollars).

Overshoot bound: admitted reservations never exceed a limit at admission time, so a window's final total can
exceed the limit only by what requests used beyond their reservation: prompt tokens the estimate missed (the
estimate counts them with a real tokenizer) and nothing on the output side, which providers cap at max_tokens.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

MINUTE_S = 60
DAY_S = 86_400


class Limit(enum.StrEnum):
    RPM = "rpm"
    TPM = "tpm"
    TPD = "tpd"
    USD_PER_DAY = "usd_per_day"


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; None is unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    usd_per_day: float | None = None


@dataclass(frozen=True)
class Cost:
    """What a request counts: tokens (input + output) and dollars."""

    tokens: int
    usd: float


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    reservation: str | None
    """Id of the reservation made (admitted only); settle() takes it."""
    refused_by: Limit | None
    """The first limit that refused, in the order rpm, tpm, tpd, usd_per_day."""
    retry_after_s: int
    """Seconds until the refusing window rolls over: ceil, at least 1 (0 when admitted). A cost larger than the
    limit itself is refused on an empty window too, with the same retry-after (retrying will not help)."""
    used: dict[Limit, float]
    """All four windows' totals (unlimited ones are counted too) after this reservation (admitted) or as they
    stood (refused): requests and tokens as whole numbers, USD in dollars."""


class SettleState(enum.StrEnum):
    EXACT = "exact"
    ESTIMATED = "estimated"


@dataclass(frozen=True)
class Settled:
    reservation: str
    tenant: str
    model: str
    state: SettleState
    cost: Cost
    """What the reservation counts now: the exact cost (EXACT) or its reserved estimate (ESTIMATED)."""


SettleItem = tuple[str, Cost, SettleState]
"""One settle of :meth:`Store.settle_many`: (reservation, cost, state)."""


class Store(Protocol):
    async def reserve(self, tenant: str, model: str, cost: Cost, limits: Limits, now: float) -> Verdict:
        """Atomically: if adding `cost` (and one request) keeps every limited window within its limit, add it and
        record a reservation; otherwise change nothing. Windows without a limit (None) are not checked but are
        counted, so usage stays visible. The reservation id is random (not derived from the time)."""
        ...

    async def settle(
        self, reservation: str, cost: Cost, now: float, state: SettleState = SettleState.EXACT
    ) -> Settled | None:
        """Replace the reservation's counted cost with `cost` (exact) in the windows it was counted in.
        Idempotent for the same exact cost; an exact settle after an estimated one replaces the estimate.
        None if the reservation is unknown (never made, or older than the store keeps). With `state` ESTIMATED
        (a stream cut before its usage, counted with the tokenizer) it replaces an open or estimated count but never
        an exact one: then nothing changes and the result is None.

        The delta goes to the windows of the reservation's own minute and day, even when they are no longer
        current; a window the store no longer keeps is skipped (never re-created). The request count is not
        changed. An exact settle with a different cost after an exact one applies the delta too: the last exact
        cost wins. `now` is not used by the current stores (kept for symmetry and logging)."""
        ...

    async def settle_many(self, items: Sequence[SettleItem], now: float) -> list[Settled | None]:
        """:meth:`settle` of each item in order — the same results, one per item, as that many calls would give
        (a reservation may appear more than once: each item sees the ones before it) — in one go: SQLite in one
        transaction (all or nothing), Redis in one round trip (each settle atomic; settles are idempotent, so a
        batch cut short may be applied again). Raises ValueError, changing nothing, when a cost is negative."""
        ...

    async def expire(self, reserved_before: float, now: float) -> list[Settled]:
        """Settle every reservation made before `reserved_before` (strictly) and still open, at its estimate
        (ESTIMATED: the windows keep what was reserved), and return those. Each is returned once. Stores also
        drop what is older than they keep here (lazily) or by TTL."""
        ...

    async def used(self, tenant: str, now: float) -> dict[Limit, float]:
        """The tenant's current window totals (requests this minute, tokens this minute and day, USD today);
        all four kinds, zeros when nothing was counted."""
        ...

    async def mark_once(self, key: str, window_end: float, now: float) -> bool:
        """True for the first caller to mark `key` (in any process sharing the store) while the mark lasts, False
        for every other; the mark lasts until `window_end` (epoch seconds, on the caller's clock like `now`), after
        which the key may be marked again. Atomic. Raises ValueError when `window_end` is not after `now`.
        Budget alerts use it so that each stage is emitted once per window across replicas."""
        ...

    async def close(self) -> None:
        """Release the connection (SQLite) or the client (Redis: the store owns the client it was given)."""
        ...
