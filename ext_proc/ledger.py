"""The tenant ledger as the service uses it: estimate and reserve at admission, settle on usage, sweep the lost.

Prices and limits come from the config; counting is the store's (`ext_proc/store/`). A request is billed to the
model that served it (a failover or hedge to a cheaper or dearer model), known by the provider's model name in the
response; the mirror leg never reaches the ledger (it has no admission and no access log entry of its own).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from ext_proc.accesslog import UsageRecord
from ext_proc.config import ModelConfig, ServiceConfig
from ext_proc.errors import BudgetExceeded, LimitExceeded
from ext_proc.store.base import MINUTE_S, Cost, Limit, Limits, Settled, Store, Verdict
from ext_proc.tokens import estimate_prompt_tokens

__all__ = ["Ledger"]

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


class Ledger:
    def __init__(self, config: ServiceConfig, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._store = store
        self._clock = clock
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

    async def reserve(self, tenant: str, model: str, request: Mapping[str, Any]) -> Verdict:
        """Reserve the estimate, or raise LimitExceeded / BudgetExceeded naming the limit, with 429 headers."""
        cost = self.estimate(model, request)
        limits = self._limits[tenant]
        now = self._clock()
        verdict = await self._store.reserve(tenant, model, cost, limits, now)
        if verdict.admitted:
            return verdict
        refused_by = verdict.refused_by or Limit.TPM
        requested = {Limit.RPM: 1, Limit.USD_PER_DAY: round(cost.usd, 6)}.get(refused_by, cost.tokens)
        message = (
            f"Limit reached for tenant '{tenant}' on {_LIMIT_WORDS[refused_by]}: "
            f"limit {getattr(limits, refused_by.value):g}, used {verdict.used.get(refused_by, 0.0):g}, "
            f"requested {requested:g}."
        )
        error = BudgetExceeded if refused_by is Limit.USD_PER_DAY else LimitExceeded
        raise error(message, tenant=tenant, model=model, headers=_rate_limit_headers(limits, verdict, now))

    async def settle(self, usage: UsageRecord) -> Settled | None:
        """The exact count replaces the reservation, priced as the model that served it. A failed request the
        provider answered without usage is billed nothing; a successful one without usage stays open until the
        sweep settles it as estimated."""
        if usage.has_usage:
            spec = self._by_upstream.get(usage.served_model or usage.request_model or "")
            tokens_in, tokens_out = usage.input_tokens, usage.output_tokens
            cost = Cost(tokens_in + tokens_out, _price(spec, tokens_in, tokens_out))
        elif usage.status >= 400:
            cost = Cost(0, 0.0)
        else:
            return None
        return await self._store.settle(usage.reservation, cost, self._clock())

    async def sweep(self) -> list[Settled]:
        """Settle, at their estimate, reservations whose usage is overdue: the bound on lost accounting."""
        now = self._clock()
        return await self._store.expire(now - self.settle_after_s, now)


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
