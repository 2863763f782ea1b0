"""What both stores share: window alignment, micro-dollars, the order limits are checked in, retry-after."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence

from ext_proc.store.base import DAY_S, MINUTE_S, Cost, Limit, Limits

MICRO = 1_000_000
"""USD is counted in integer micro-dollars, so sums are exact (0.1 + 0.2 is 0.3)."""

KEEP_S = 2 * DAY_S
"""Reservations (and day windows) are kept this long; a settle later than that finds nothing (None)."""

MINUTE_KEEP_S = 2 * MINUTE_S
"""Minute windows are kept this long after they end; a later settle skips them (the day windows still change)."""

ORDER: tuple[Limit, ...] = (Limit.RPM, Limit.TPM, Limit.TPD, Limit.USD_PER_DAY)
"""Check order: the first violated limit in this order is the one reported."""

MINUTE_KINDS = frozenset({Limit.RPM, Limit.TPM})


def minute_bucket(now: float) -> int:
    """Start (epoch seconds) of the UTC minute holding `now`."""
    return int(now // MINUTE_S) * MINUTE_S


def day_bucket(now: float) -> int:
    """Start (epoch seconds) of the UTC day holding `now`."""
    return int(now // DAY_S) * DAY_S


def to_micro(usd: float) -> int:
    return round(usd * MICRO)


def from_micro(micro: int) -> float:
    return micro / MICRO


def new_id(now: float) -> str:
    """A reservation id: ``now`` in milliseconds (12 hex digits) then 80 random bits (``os.urandom``, 20 hex
    digits). Ids made later sort later: SQLite appends them at the end of its index instead of at random places
    (~20 % of a reserve's CPU), and old ones are found by an id range (:func:`id_bound`)."""
    return f"{max(0, int(now * 1000)):012x}{os.urandom(10).hex()}"


def id_bound(before: float) -> str:
    """Every id that :func:`new_id` made before ``before`` (to the millisecond) sorts below this one."""
    return f"{max(0, int(before * 1000)):012x}"


def check_cost(cost: Cost) -> None:
    if cost.tokens < 0 or cost.usd < 0:
        raise ValueError(f"a cost cannot be negative: {cost}")


def check_window(window_end: float, now: float) -> None:
    if not window_end > now:
        raise ValueError(f"a mark's window must end after now: window_end={window_end!r}, now={now!r}")


def limit_values(limits: Limits) -> dict[Limit, int | None]:
    """Each limit as the integer the windows hold (USD in micro-dollars); None is unlimited."""
    return {
        Limit.RPM: limits.rpm,
        Limit.TPM: limits.tpm,
        Limit.TPD: limits.tpd,
        Limit.USD_PER_DAY: None if limits.usd_per_day is None else to_micro(limits.usd_per_day),
    }


def additions(cost: Cost) -> dict[Limit, int]:
    """What one reservation adds to each window (USD in micro-dollars)."""
    return {Limit.RPM: 1, Limit.TPM: cost.tokens, Limit.TPD: cost.tokens, Limit.USD_PER_DAY: to_micro(cost.usd)}


@functools.lru_cache(maxsize=4096)
def caps(limits: Limits) -> tuple[int | None, int | None, int | None, int | None]:
    """:func:`limit_values` as a tuple in ORDER (cached: a tenant's limits are one object)."""
    return (
        limits.rpm,
        limits.tpm,
        limits.tpd,
        None if limits.usd_per_day is None else to_micro(limits.usd_per_day),
    )


def first_over(after: Sequence[int], limits: Limits) -> Limit | None:
    """The first limit (in ORDER) that the totals `after` (ORDER: requests, tokens this minute, tokens today,
    micro-dollars today, the reservation included) exceed; None when all fit. The same test as
    :func:`first_violated` with ``after = current + adding``."""
    for kind, cap, total in zip(ORDER, caps(limits), after, strict=True):
        if cap is not None and total > cap:
            return kind
    return None


def first_violated(current: Mapping[Limit, int], adding: Mapping[Limit, int], limits: Limits) -> Limit | None:
    """The first limit (in ORDER) that `current + adding` would exceed; None when all fit."""
    caps = limit_values(limits)
    for kind in ORDER:
        cap = caps[kind]
        if cap is not None and current.get(kind, 0) + adding[kind] > cap:
            return kind
    return None


def retry_after(kind: Limit, now: float) -> int:
    """Whole seconds (ceil, at least 1) until the window of `kind` holding `now` rolls over."""
    if kind in MINUTE_KINDS:
        end = minute_bucket(now) + MINUTE_S
    else:
        end = day_bucket(now) + DAY_S
    return max(1, math.ceil(end - now))


def used_of(totals: Sequence[int]) -> dict[Limit, float]:
    """:func:`as_used` of the four totals in ORDER."""
    rpm, tpm, tpd, usd = totals
    return {Limit.RPM: rpm, Limit.TPM: tpm, Limit.TPD: tpd, Limit.USD_PER_DAY: usd / MICRO}


def as_used(raw: Mapping[Limit, int]) -> dict[Limit, float]:
    """Window totals as the API reports them: counts as ints, USD as dollars."""
    return {kind: from_micro(raw.get(kind, 0)) if kind is Limit.USD_PER_DAY else raw.get(kind, 0) for kind in ORDER}
