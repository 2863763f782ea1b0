"""The tenant ledger as the service uses it: estimate and reserve at admission, settle on usage, sweep the lost.

Prices and limits come from the config; counting is the store's (`ext_proc/store/`). A request is billed to the
model that served it (a failover or hedge to a cheaper or dearer model), known by the provider's model name in the
response; the mirror leg never reaches the ledger (it has no admission and no access log entry of its own).

Downgrade: when a reservation is refused by the tenant's daily budget (USD per day, or tokens per day) and the
requested model has a ``downgrade``, the request is reserved again against the downgrade model's estimate and
price, and — if that fits — admitted re-routed to it (:attr:`Reserved.downgraded_from` names the model asked
for). The downgrade is the operator's policy, so it is allowed even when the tenant's ``models`` do not list the
target. One step only: a downgrade's own downgrade is not followed. If the downgrade does not fit either, the
original refusal stands (429 ``insufficient_quota`` for USD) — or the downgrade's, when a minute limit (rpm, tpm)
refused it, so that a non-critical request may wait for it. A budget that is fully spent admits only a downgrade
that costs nothing (a model without a price); a cheaper one fits only while some budget is left.

After every admitted reserve, settle and sweep the tenant's totals go to :class:`~ext_proc.budget.BudgetAlerts`
(the used-ratio gauge and the 80/90/100 % stages) and settled tokens and dollars to the metrics; a batch of settles
(:meth:`Ledger.settle_many`, one access-log message) goes to the store in one call and reads each tenant's totals
back once, after its last settle, so a stage crossed anywhere in the batch is seen.

The store down (Redis unreachable or timing out — its client is bounded to ~0.2 s a call —, SQLite locked past
its busy timeout; :data:`STORE_DOWN`): the ledger is *degraded* (gauge ``meshgen_ledger_degraded`` 1, one JSON log
line ``ledger_degraded`` on entering and ``ledger_recovered`` on leaving, each failed call counted in
``meshgen_ledger_errors_total``) and does what the config's ``ledger_down`` says:

- ``count_locally``: reservations are made in this process's :class:`~ext_proc.store.memory.MemoryStore` (ids
  ``local:…``), against the tenant's limits less the day's usage last seen in the store (the minute windows start
  empty); settles of those land there too, and settles of store reservations that fail are kept to be replayed.
- ``refuse``: reservations raise :class:`~ext_proc.errors.LedgerUnavailable` (503 ``ledger_unavailable``).

While degraded the store is not asked on the request path at all; :meth:`Ledger.reconcile` (the service calls it
about once a second) probes it and, when it answers, replays what was kept: every local reservation is reserved
in the store at its original time without limits (it was admitted already) and settled as it stands (exact or
estimated), then dropped locally — later settles of its ``local:`` id go to the store reservation it became —
and the kept settles are applied; then the ledger leaves degraded mode and re-checks the budget stages of the
tenants concerned against the store's totals. Stages crossed while degraded are marked in memory (best effort:
another replica may emit the same stage) and their marks taken in the store on recovery. The sweep settles
local reservations at their estimate as it does store ones. Nothing is counted twice: a replayed reservation
leaves memory in the same step (no await) that records where it went.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis.exceptions

from ext_proc.accesslog import UsageRecord
from ext_proc.budget import BudgetAlerts
from ext_proc.config import ModelConfig, ServiceConfig
from ext_proc.errors import BudgetExceeded, LedgerUnavailable, LimitExceeded
from ext_proc.metrics import Metrics
from ext_proc.store import _ledger as L
from ext_proc.store.base import MINUTE_S, Cost, Limit, Limits, Settled, SettleItem, SettleState, Store, Verdict
from ext_proc.store.memory import MemoryStore
from ext_proc.tokens import estimate_prompt_tokens

__all__ = ["LOCAL_PREFIX", "STORE_DOWN", "Ledger", "Reserved"]

STORE_DOWN: Final[tuple[type[BaseException], ...]] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,  # TimeoutError and ConnectionRefusedError are OSErrors
    sqlite3.OperationalError,  # "database is locked" after the busy timeout, disk I/O errors
)
"""Store errors that mean "the store does not answer now", as opposed to a bug: the ledger degrades on these."""

LOCAL_PREFIX: Final = "local:"
"""Reservation ids made in this process's memory while the store was down."""

MAX_KEPT_SETTLES: Final = 100_000
"""Settles of store reservations kept while the store is down, to replay on recovery; beyond this the oldest are
dropped (counted in ``meshgen_ledger_errors_total{op="settle_dropped"}``) and the sweep settles those
reservations at their estimate instead."""

REPLAYED_KEEP_S: Final = 600.0
"""How long a replayed ``local:`` id is remembered (at least; also at least twice the settle window), so that a
settle arriving after the replay still lands on the store reservation it became."""

_LIMIT_WORDS = {
    Limit.RPM: "requests per minute",
    Limit.TPM: "tokens per minute",
    Limit.TPD: "tokens per day",
    Limit.USD_PER_DAY: "USD per day",
}


def _price(model: ModelConfig | None, input_tokens: int, output_tokens: int) -> float:
    if model is None or model.price is None:
        return 0.0
    return (input_tokens * model.price.input_per_mtok + output_tokens * model.price.output_per_mtok) / 1_000_000


def _max_tokens(request: Mapping[str, Any], default: int) -> int:
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = request.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


_BUDGET_LIMITS = frozenset({Limit.USD_PER_DAY, Limit.TPD})
_NOTHING = Cost(0, 0.0)


@dataclass(frozen=True, slots=True)
class Reserved:
    """An admitted reservation."""

    reservation: str
    model: str
    """The model reserved for, and to route to: the requested one, or its downgrade."""
    downgraded_from: str | None
    """The requested model when the budget moved the request to its downgrade; None otherwise."""
    verdict: Verdict
    prompt_tokens: int
    """The prompt's tokens as estimated for the reservation (a stream cut before its usage is settled with it)."""


class Ledger:
    def __init__(
        self,
        config: ServiceConfig,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self.metrics = metrics if metrics is not None else Metrics(config)
        self._log = logger if logger is not None else logging.getLogger("ext_proc")
        self.alerts = BudgetAlerts(config, store, self.metrics, logger=self._log)
        self._limits = {
            name: Limits(t.limits.rpm, t.limits.tpm, t.limits.tpd, t.limits.usd_per_day)
            for name, t in config.tenants.items()
        }
        # Providers answer with their own model name; bill the configured model behind it.
        self._by_upstream = {m.upstream_name: m for m in config.models.values()} | dict(config.models)
        self.settle_after_s = config.settle_after_ms / 1000
        self._refuse = config.ledger_down == "refuse"
        self._local = MemoryStore(id_prefix=LOCAL_PREFIX)
        self._degraded_since: float | None = None
        """time.monotonic() when the store stopped answering; None while it answers."""
        self._day_used: dict[str, tuple[int, float, float]] = {}
        """tenant → (day bucket, tokens, USD) the store last reported for today."""
        self._kept_settles: deque[tuple[str, Cost, float, SettleState]] = deque()
        self._replayed: dict[str, tuple[str, float]] = {}
        """Replayed local id → (the store's id, when), in replay order (:meth:`_forget_replayed` drops the old)."""
        self._probe_tenant = next(iter(config.tenants), "meshgen-probe")
        self.inline: Final = bool(getattr(store, "never_suspends", False))
        """True when the store's coroutines never suspend (SQLite, memory): :meth:`reserve` then needs no task of
        its own unless a hold queue makes it wait — the HTTP server runs it at once (a Redis call must run in a
        task: redis-py's timeouts need one)."""

    def estimate(self, model: str, request: Mapping[str, Any], prompt: int | None = None) -> Cost:
        """Prompt tokens counted with the real tokenizer (unless given), plus the most the reply may use."""
        spec = self._config.models[model]
        if prompt is None:
            prompt = estimate_prompt_tokens(request)
        completion = _max_tokens(request, spec.max_tokens_default)
        return Cost(prompt + completion, _price(spec, prompt, completion))

    @property
    def degraded(self) -> bool:
        """True while the store does not answer (since a call failed, until :meth:`reconcile` succeeds)."""
        return self._degraded_since is not None

    @property
    def local(self) -> MemoryStore:
        """This process's own ledger while the store is down (``ledger_down: count_locally``)."""
        return self._local

    async def reserve(self, tenant: str, model: str, request: Mapping[str, Any]) -> Reserved:
        """Reserve the estimate — or the downgrade's, when the budget refuses and the model has one — or raise
        LimitExceeded / BudgetExceeded naming the limit, with 429 headers. The store down: reserve in memory
        (``count_locally``) or raise LedgerUnavailable (``refuse``)."""
        now = self._clock()
        if self._degraded_since is None:
            try:
                return await self._reserve_in(self._store, self._limits[tenant], tenant, model, request, now)
            except STORE_DOWN as exc:
                self._store_down("reserve", exc)
        if self._refuse:
            raise LedgerUnavailable(tenant=tenant, model=model)
        return await self._reserve_in(self._local, self._local_limits(tenant, now), tenant, model, request, now)

    def _local_limits(self, tenant: str, now: float) -> Limits:
        """The tenant's limits less what the store last said it used today (its day windows), for local counting."""
        limits = self._limits[tenant]
        seen = self._day_used.get(tenant)
        if seen is None or seen[0] != L.day_bucket(now):
            return limits
        _, tokens, usd = seen
        return Limits(
            limits.rpm,
            limits.tpm,
            None if limits.tpd is None else max(0, limits.tpd - int(tokens)),
            None if limits.usd_per_day is None else max(0.0, limits.usd_per_day - usd),
        )

    async def _reserve_in(
        self, store: Store, limits: Limits, tenant: str, model: str, request: Mapping[str, Any], now: float
    ) -> Reserved:
        prompt = estimate_prompt_tokens(request)
        cost = self.estimate(model, request, prompt)
        verdict = await store.reserve(tenant, model, cost, limits, now)
        if verdict.admitted:
            self._saw(store, tenant, verdict, now)
            await self.alerts.observe(tenant, verdict.used, now)
            return Reserved(verdict.reservation or "", model, None, verdict, prompt)
        refusal = self._refusal(tenant, model, cost, limits, verdict, now)
        target = self._config.models[model].downgrade
        if target is None or verdict.refused_by not in _BUDGET_LIMITS:
            raise refusal
        down_cost = self.estimate(target, request, prompt)
        down = await store.reserve(tenant, target, down_cost, limits, now)
        if down.admitted:
            self._saw(store, tenant, down, now)
            self.metrics.downgraded(tenant, model)
            await self.alerts.observe(tenant, down.used, now)
            return Reserved(down.reservation or "", target, model, down, prompt)
        if down.refused_by in _BUDGET_LIMITS:
            raise refusal
        raise self._refusal(tenant, target, down_cost, limits, down, now)

    def _refusal(
        self, tenant: str, model: str, cost: Cost, limits: Limits, verdict: Verdict, now: float
    ) -> LimitExceeded:
        refused_by = verdict.refused_by or Limit.TPM
        requested = {Limit.RPM: 1, Limit.USD_PER_DAY: round(cost.usd, 6)}.get(refused_by, cost.tokens)
        message = (
            f"Limit reached for tenant '{tenant}' on {_LIMIT_WORDS[refused_by]}: "
            f"limit {getattr(limits, refused_by.value):g}, used {verdict.used.get(refused_by, 0.0):g}, "
            f"requested {requested:g}."
        )
        error = BudgetExceeded if refused_by is Limit.USD_PER_DAY else LimitExceeded
        headers = _rate_limit_headers(limits, verdict, now)
        return error(message, tenant=tenant, model=model, headers=headers, limit=refused_by.value)

    def _priced(self, usage: UsageRecord) -> tuple[Cost, int, int] | None:
        """(cost, input tokens, output tokens) a usage settles at, priced as the model that served it; None when
        it does not settle (a success without usage: the sweep settles it at its reservation)."""
        if usage.has_usage:
            spec = self._by_upstream.get(usage.served_model or usage.request_model or "")
            tokens_in, tokens_out = usage.input_tokens, usage.output_tokens
            return Cost(tokens_in + tokens_out, _price(spec, tokens_in, tokens_out)), tokens_in, tokens_out
        if usage.status >= 400:
            return _NOTHING, 0, 0
        return None

    def _count_hedge(self, usage: UsageRecord) -> None:
        """A hedged model's answer from a later attempt on another provider: a hedge won (or, indistinguishably in
        the access log, a failover after the first attempt failed)."""
        if usage.attempts < 2 or not usage.served_by or not 0 < usage.status < 400:
            return
        spec = self._config.models.get(usage.request_model or "")
        if spec is not None and spec.hedged and usage.served_by != spec.provider:
            self.metrics.hedge_wins.labels(usage.request_model, usage.served_by).inc()

    async def settle(self, usage: UsageRecord) -> Settled | None:
        """The count replaces the reservation, priced as the model that served it: exact from the provider, or
        estimated (a cut stream counted with the tokenizer; never replaces an exact count). A failed request the
        provider answered without usage is billed nothing; a successful one without usage stays open until the
        sweep settles it at its reservation. (:meth:`settle_many` of one usage.)"""
        return (await self.settle_many([usage]))[0]

    async def settle_many(self, usages: Sequence[UsageRecord]) -> list[Settled | None]:
        """:meth:`settle` of each usage, in order — one access-log message — with the store asked once
        (:meth:`~ext_proc.store.base.Store.settle_many`) and the budget stages checked once per tenant, after the
        whole batch. Each usage goes where its reservation lives: in memory (``local:``, not replayed yet), or in
        the store (its own id, or the one a replayed ``local:`` id became); the store down, a store settle is kept
        for the replay. One result per usage."""
        now = self._clock()
        results: list[Settled | None] = [None] * len(usages)
        counts: list[tuple[int, int, int, float] | None] = [None] * len(usages)
        to_store: list[int] = []
        items: list[SettleItem] = []
        for i, usage in enumerate(usages):
            self._count_hedge(usage)
            priced = self._priced(usage)
            if priced is None:
                continue
            cost, tokens_in, tokens_out = priced
            counts[i] = (cost.tokens, tokens_in, tokens_out, cost.usd)
            state = SettleState.ESTIMATED if usage.estimated else SettleState.EXACT
            reservation = usage.reservation
            if reservation.startswith(LOCAL_PREFIX):
                target = self._replayed.get(reservation)
                if target is None:
                    results[i] = await self._local.settle(reservation, cost, now, state)  # never suspends
                    continue
                reservation = target[0]
            to_store.append(i)
            items.append((reservation, cost, state))
        if items:
            stored: list[Settled | None] | None = None
            if self._degraded_since is None:
                try:
                    stored = await self._store.settle_many(items, now)
                except STORE_DOWN as exc:
                    self._store_down("settle", exc)
            if stored is None:
                for reservation, cost, state in items:
                    self._keep(reservation, cost, now, state)
            else:
                for i, settled in zip(to_store, stored, strict=True):
                    results[i] = settled
        # Metrics summed per series (one increment each), stages once per tenant.
        exact: dict[tuple[str, str], list[float]] = {}
        estimated: dict[tuple[str, str], list[float]] = {}
        for usage, settled, count in zip(usages, results, counts, strict=True):
            if settled is None or count is None:
                continue
            tokens, tokens_in, tokens_out, usd = count
            if usage.estimated:
                sums = estimated.setdefault((settled.tenant, settled.model), [0, 0, 0.0])
                sums[0] += 1
                sums[1] += tokens
            else:
                sums = exact.setdefault((settled.tenant, settled.model), [0, 0, 0, 0.0])
                sums[0] += 1
                sums[1] += tokens_in
                sums[2] += tokens_out
            sums[-1] += usd
        for (tenant, model), (n, sum_in, sum_out, usd) in exact.items():
            self.metrics.settled_exact(tenant, model, int(sum_in), int(sum_out), usd, requests=int(n))
        for (tenant, model), (n, sum_tokens, usd) in estimated.items():
            self.metrics.settled_estimated(tenant, model, int(sum_tokens), usd, requests=int(n))
        for tenant in dict.fromkeys(key[0] for key in [*exact, *estimated]):
            await self._observe(tenant, now)
        return results

    def _keep(self, reservation: str, cost: Cost, now: float, state: SettleState) -> None:
        """A settle of a store reservation the store could not take now: replayed by :meth:`reconcile`."""
        if len(self._kept_settles) == MAX_KEPT_SETTLES:
            self._kept_settles.popleft()
            self.metrics.ledger_errors.labels("settle_dropped").inc()
        self._kept_settles.append((reservation, cost, now, state))

    async def sweep(self) -> list[Settled]:
        """Settle, at their estimate, reservations whose usage is overdue: the bound on lost accounting. Local
        reservations (the store down) too; the store's are left until it answers."""
        now = self._clock()
        settled = await self._local.expire(now - self.settle_after_s, now)
        self._forget_replayed(now)
        if self._degraded_since is None:
            try:
                settled += await self._store.expire(now - self.settle_after_s, now)
            except STORE_DOWN as exc:
                self._store_down("sweep", exc)
        for s in settled:
            self.metrics.settled_estimated(s.tenant, s.model, s.cost.tokens, s.cost.usd)
        for tenant in {s.tenant for s in settled}:
            await self._observe(tenant, now)
        return settled

    async def _observe(self, tenant: str, now: float) -> None:
        """Budget stages after a settle: the totals are read back (one store call, only for tenants with a budget;
        off the request path). A store error here is logged, never raised: the settle already happened."""
        if not self.alerts.has_budget(tenant):
            return
        store = self._local if self._degraded_since is not None else self._store
        try:
            await self.alerts.observe(tenant, await store.used(tenant, now), now)
        except Exception as exc:  # the settle itself is done; the next one looks again
            self._log.error(json.dumps({"event": "budget_check_failed", "error": type(exc).__name__}))

    # ---- the store down, and back ---------------------------------------------------------------------------------

    def _saw(self, store: Store, tenant: str, verdict: Verdict, now: float) -> None:
        """Remember the day's usage the store reported: local counting starts from it if the store goes down."""
        if store is self._store:
            used = verdict.used
            self._day_used[tenant] = (L.day_bucket(now), used.get(Limit.TPD, 0.0), used.get(Limit.USD_PER_DAY, 0.0))

    def _store_down(self, op: str, exc: BaseException) -> None:
        self.metrics.ledger_errors.labels(op).inc()
        if self._degraded_since is not None:
            return
        self._degraded_since = time.monotonic()
        self.metrics.ledger_degraded.set(1)
        self.alerts.degrade(self._local)
        policy = "refuse" if self._refuse else "count_locally"
        self._log.error(
            json.dumps({"event": "ledger_degraded", "policy": policy, "op": op, "error": type(exc).__name__})
        )

    async def reconcile(self) -> bool:
        """Degraded: probe the store and, when it answers, replay what was kept and leave degraded mode.
        True when the ledger is (now) not degraded. A store error on the way leaves it degraded (what was
        replayed stays replayed) for the next call; one call at a time (the service's loop)."""
        if self._degraded_since is None:
            return True
        now = self._clock()
        tenants: set[str] = set()
        try:
            await self._store.used(self._probe_tenant, now)  # the probe
            while self._kept_settles:
                reservation, cost, at, state = self._kept_settles[0]
                await self._store.settle(reservation, cost, at, state)
                self._kept_settles.popleft()
            replayed = 0
            while len(self._local):
                for r in self._local.reservations():
                    if await self._replay(r.id, now):
                        tenants.add(r.tenant)
                        replayed += 1
            await self.alerts.recover(self._store, now)
        except STORE_DOWN as exc:
            self.metrics.ledger_errors.labels("reconcile").inc()
            self._log.debug(json.dumps({"event": "ledger_still_down", "error": type(exc).__name__}))
            return False
        # No await since the local ledger was seen empty: nothing was reserved there meanwhile.
        degraded_s = time.monotonic() - self._degraded_since
        self._degraded_since = None
        self.metrics.ledger_degraded.set(0)
        self._log.warning(
            json.dumps({"event": "ledger_recovered", "replayed": replayed, "degraded_s": round(degraded_s, 3)})
        )
        for tenant in sorted(tenants):
            await self._observe(tenant, now)
        return True

    async def _replay(self, local_id: str, now: float) -> bool:
        """One local reservation into the store: reserved at its own time without limits, then settled to match
        what it counts locally — again if a settle changed it meanwhile —, then dropped from memory."""
        r = self._local.get(local_id)
        if r is None:
            return False
        verdict = await self._store.reserve(
            r.tenant, r.model, Cost(r.tokens, L.from_micro(r.usd_micro)), Limits(), r.created
        )
        target = verdict.reservation or ""
        applied = (r.tokens, r.usd_micro, "open")
        while True:
            current = self._local.get(local_id)
            if current is None or (current.tokens, current.usd_micro, current.state) == applied:
                break
            state = current.settle_state or SettleState.ESTIMATED
            await self._store.settle(target, current.cost, now, state)
            applied = (current.tokens, current.usd_micro, current.state)
        # No await from the check above to here: a settle of local_id now finds it replayed.
        self._replayed[local_id] = (target, now)
        self._local.forget(local_id)
        self.metrics.ledger_replayed.inc()
        return True

    def _forget_replayed(self, now: float) -> None:
        horizon = now - max(REPLAYED_KEEP_S, 2 * self.settle_after_s)
        while self._replayed:
            first = next(iter(self._replayed))
            if self._replayed[first][1] >= horizon:
                break
            del self._replayed[first]


def _rate_limit_headers(limits: Limits, verdict: Verdict, now: float) -> tuple[tuple[str, str], ...]:
    """OpenAI's `x-ratelimit-*` headers for the minute windows, and Retry-After for the one that refused."""
    headers = [("retry-after", str(max(1, verdict.retry_after_s)))]
    for limit, noun in ((Limit.RPM, "requests"), (Limit.TPM, "tokens")):
        value = getattr(limits, limit.value)
        if value is None:
            continue
        remaining = max(0, math.floor(value - verdict.used.get(limit, 0.0)))
        reset = math.ceil(MINUTE_S - now % MINUTE_S)
        headers += [
            (f"x-ratelimit-limit-{noun}", str(value)),
            (f"x-ratelimit-remaining-{noun}", str(remaining)),
            (f"x-ratelimit-reset-{noun}", f"{reset}s"),
        ]
    return tuple(headers)
