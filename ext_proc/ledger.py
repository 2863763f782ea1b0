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
(the used-ratio gauge and the 80/90/100 % stages) and settled tokens and dollars to the metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ext_proc.accesslog import UsageRecord
from ext_proc.budget import BudgetAlerts
from ext_proc.config import ModelConfig, ServiceConfig
from ext_proc.errors import BudgetExceeded, LimitExceeded
from ext_proc.metrics import Metrics
from ext_proc.store.base import MINUTE_S, Cost, Limit, Limits, Settled, SettleState, Store, Verdict
from ext_proc.tokens import estimate_prompt_tokens

__all__ = ["Ledger", "Reserved"]

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


@dataclass(frozen=True, slots=True)
class Reserved:
    """An admitted reservation."""

    reservation: str
    model: str
    """The model reserved for, and to route to: the requested one, or its downgrade."""
    downgraded_from: str | None
    """The requested model when the budget moved the request to its downgrade; None otherwise."""
    verdict: Verdict


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

    def estimate(self, model: str, request: Mapping[str, Any]) -> Cost:
        """Prompt tokens counted with the real tokenizer, plus the most the reply may use."""
        spec = self._config.models[model]
        prompt = estimate_prompt_tokens(request)
        completion = _max_tokens(request, spec.max_tokens_default)
        return Cost(prompt + completion, _price(spec, prompt, completion))

    async def reserve(self, tenant: str, model: str, request: Mapping[str, Any]) -> Reserved:
        """Reserve the estimate — or the downgrade's, when the budget refuses and the model has one — or raise
        LimitExceeded / BudgetExceeded naming the limit, with 429 headers."""
        limits = self._limits[tenant]
        now = self._clock()
        cost = self.estimate(model, request)
        verdict = await self._store.reserve(tenant, model, cost, limits, now)
        if verdict.admitted:
            await self.alerts.observe(tenant, verdict.used, now)
            return Reserved(verdict.reservation or "", model, None, verdict)
        refusal = self._refusal(tenant, model, cost, limits, verdict, now)
        target = self._config.models[model].downgrade
        if target is None or verdict.refused_by not in _BUDGET_LIMITS:
            raise refusal
        down_cost = self.estimate(target, request)
        down = await self._store.reserve(tenant, target, down_cost, limits, now)
        if down.admitted:
            self.metrics.downgraded(tenant, model)
            await self.alerts.observe(tenant, down.used, now)
            return Reserved(down.reservation or "", target, model, down)
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

    async def settle(self, usage: UsageRecord) -> Settled | None:
        """The count replaces the reservation, priced as the model that served it: exact from the provider, or
        estimated (a cut stream counted with the tokenizer; never replaces an exact count). A failed request the
        provider answered without usage is billed nothing; a successful one without usage stays open until the
        sweep settles it at its reservation."""
        if usage.has_usage:
            spec = self._by_upstream.get(usage.served_model or usage.request_model or "")
            tokens_in, tokens_out = usage.input_tokens, usage.output_tokens
            cost = Cost(tokens_in + tokens_out, _price(spec, tokens_in, tokens_out))
        elif usage.status >= 400:
            tokens_in = tokens_out = 0
            cost = Cost(0, 0.0)
        else:
            return None
        now = self._clock()
        state = SettleState.ESTIMATED if usage.estimated else SettleState.EXACT
        settled = await self._store.settle(usage.reservation, cost, now, state)
        if settled is not None:
            if usage.estimated:
                self.metrics.settled_estimated(settled.tenant, settled.model, cost.tokens, cost.usd)
            else:
                self.metrics.settled_exact(settled.tenant, settled.model, tokens_in, tokens_out, cost.usd)
            await self._observe(settled.tenant, now)
        return settled

    async def sweep(self) -> list[Settled]:
        """Settle, at their estimate, reservations whose usage is overdue: the bound on lost accounting."""
        now = self._clock()
        settled = await self._store.expire(now - self.settle_after_s, now)
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
        try:
            await self.alerts.observe(tenant, await self._store.used(tenant, now), now)
        except Exception as exc:  # the settle itself is done; the next one looks again
            self._log.error(json.dumps({"event": "budget_check_failed", "error": type(exc).__name__}))


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
