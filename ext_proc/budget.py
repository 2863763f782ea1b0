"""Budget stages: each of a tenant's ``alerts_at`` shares of its daily budget, emitted once per UTC day.

The budget is the tenant's USD per day, or its tokens per day when it has no USD limit; a tenant with neither (or
no ``alerts_at``) has no stages. After every reserve, settle (or batch of settles) and sweep the ledger hands the
tenant's window totals here: the used ratio goes to a gauge, and every stage at or below it that was not yet
emitted today is. "Once" holds across replicas: the store's :meth:`~ext_proc.store.base.Store.mark_once` lets
exactly one caller take a stage's mark for the day. Each process also remembers the stages it saw marked today, so
the store is asked at most once per stage, day and process — a request that crosses nothing costs a few float
operations.

An emitted stage is a count in ``meshgen_budget_alerts_total{tenant,stage}``, one JSON log line
``{"event": "budget_alert", "tenant", "stage", "used_ratio", "limit", "budget"}`` and, when the config names an
``alert_webhook``, a POST of that same JSON to it: fire-and-forget in a worker thread with a short timeout, never
awaited by admission; a failure is counted (``meshgen_alert_webhook_failures_total``) and logged, never raised.

The ledger's store down: the ledger hands its in-memory store here (:meth:`BudgetAlerts.degrade`) and stages are
marked there — once per process, best effort —, and on recovery (:meth:`BudgetAlerts.recover`) those marks are
taken in the store too, so other replicas do not emit them again; the ledger then re-checks the stages against
the store's totals.

Usage can shrink after a stage is emitted (a settle replaces a larger reservation); the stage is not emitted again
that day when usage climbs back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ext_proc.config import ServiceConfig
from ext_proc.metrics import Metrics
from ext_proc.store.base import DAY_S, Limit, Store

__all__ = ["BudgetAlerts", "post_json"]

WEBHOOK_TIMEOUT_S: Final = 2.0
_EPSILON: Final = 1e-9
"""Float slack in ``used / limit >= stage`` (USD is exact in micro-dollars; the division is not)."""


@dataclass(frozen=True, slots=True)
class _Budget:
    kind: Limit
    limit: float
    stages: tuple[tuple[float, str], ...]
    """(share, label) ascending; the label is the share as the metric and the log show it (``0.8``)."""


def post_json(url: str, payload: Mapping[str, Any], timeout_s: float) -> None:
    """POST `payload` as JSON; raise on a network error or a non-2xx answer (urllib raises HTTPError)."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (the operator's URL)
        response.read()


class BudgetAlerts:
    def __init__(
        self,
        config: ServiceConfig,
        store: Store,
        metrics: Metrics,
        *,
        logger: logging.Logger | None = None,
        webhook_timeout_s: float = WEBHOOK_TIMEOUT_S,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._log = logger if logger is not None else logging.getLogger("ext_proc")
        self._webhook = config.alert_webhook
        self._webhook_timeout_s = webhook_timeout_s
        self._budgets: dict[str, _Budget] = {}
        for name, tenant in config.tenants.items():
            stages = tuple((share, f"{share:g}") for share in sorted(set(tenant.alerts_at)))
            if tenant.limits.usd_per_day is not None:
                self._budgets[name] = _Budget(Limit.USD_PER_DAY, tenant.limits.usd_per_day, stages)
            elif tenant.limits.tpd is not None:
                self._budgets[name] = _Budget(Limit.TPD, float(tenant.limits.tpd), stages)
        self._day = -1
        self._seen: set[tuple[str, float]] = set()
        """(tenant, share) whose mark for `_day` this process took or saw taken."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._marks = store
        """Where stages are marked: the store, or the ledger's memory while the store is down."""
        self._local_marks: list[tuple[str, float]] = []
        """(key, window end) marked in memory while degraded: taken in the store on recovery."""

    def has_budget(self, tenant: str) -> bool:
        return tenant in self._budgets

    def ratio(self, tenant: str, used: Mapping[Limit, float]) -> float | None:
        """used / limit of the tenant's budget; None without one. A zero budget is spent at once (1.0)."""
        budget = self._budgets.get(tenant)
        if budget is None:
            return None
        if budget.limit <= 0:
            return 1.0
        return used.get(budget.kind, 0.0) / budget.limit

    async def observe(self, tenant: str, used: Mapping[Limit, float], now: float) -> None:
        """The tenant's window totals as they stand at `now`: update the gauge, emit every stage newly crossed."""
        budget = self._budgets.get(tenant)
        if budget is None:
            return
        ratio = 1.0 if budget.limit <= 0 else used.get(budget.kind, 0.0) / budget.limit
        self._metrics.used_ratio(tenant, ratio)
        day = int(now // DAY_S) * DAY_S
        if day != self._day:
            self._day, self._seen = day, set()
        for share, label in budget.stages:
            if ratio + _EPSILON < share:
                break
            if (tenant, share) in self._seen:
                continue
            self._seen.add((tenant, share))  # before the await: concurrent requests here ask the store once
            try:
                key = f"alert:{tenant}:{label}:{day}"
                first = await self._marks.mark_once(key, day + DAY_S, now)
            except Exception as exc:  # the store is down: try again on the next request
                self._seen.discard((tenant, share))
                self._log.error(json.dumps({"event": "budget_alert_failed", "error": type(exc).__name__}))
                continue
            if first:
                if self._marks is not self._store:
                    self._local_marks.append((key, day + DAY_S))
                self._emit(tenant, label, ratio, budget)

    def degrade(self, local: Store) -> None:
        """The store is down: mark stages in `local` until :meth:`recover`."""
        self._marks = local

    async def recover(self, store: Store, now: float) -> None:
        """The store answers again: take there the marks made in memory (the stage was emitted already), then
        mark in the store again. A store error propagates, leaving the rest for the next call."""
        while self._local_marks:
            key, end = self._local_marks[0]
            if end > now:
                await store.mark_once(key, end, now)
            self._local_marks.pop(0)
        self._store = self._marks = store

    def _emit(self, tenant: str, stage: str, ratio: float, budget: _Budget) -> None:
        self._metrics.alert(tenant, stage)
        event = {
            "event": "budget_alert",
            "tenant": tenant,
            "stage": float(stage),
            "used_ratio": round(ratio, 6),
            "limit": budget.limit,
            "budget": budget.kind.value,
        }
        self._log.warning(json.dumps(event))
        if self._webhook is not None:
            task = asyncio.ensure_future(self._post(self._webhook, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, event: Mapping[str, Any]) -> None:
        try:
            await asyncio.to_thread(post_json, url, event, self._webhook_timeout_s)
        except Exception as exc:
            self._metrics.webhook_failures.inc()
            self._log.error(json.dumps({"event": "alert_webhook_failed", "error": type(exc).__name__}))

    async def drain(self) -> None:
        """Wait for webhook POSTs under way (tests; shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
