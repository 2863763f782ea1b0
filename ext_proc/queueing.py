"""Non-critical requests wait instead of being refused while their tenant is over a soft limit.

A request is non-critical when it carries the tenant's ``non_critical.header`` with its ``value`` (e.g.
``x-priority: low``; Envoy's ext_authz forwards that header). When such a request is refused by a minute limit
(rpm or tpm: capacity that frees within the minute, or sooner when a settle replaces a reservation with a smaller
count), the admission call holds its answer and retries the reservation with backoff (20 ms doubling to 250 ms)
until it fits — 200, as if it had fitted at once — or until ``queue_max_wait`` has passed: then 429 with the last
refusal's headers (reason ``queue_timeout``). A refusal by the daily budget is never held (it frees only tomorrow).

Such a request also waits while its model's provider is saturated — before it is reserved, so the wait costs the
tenant nothing. The access log says so (:meth:`HoldQueue.saw`): an answer of 429, 503 or 529 from the provider itself
(the entry names it), or Envoy's circuit breaker to it overflowing (UO), makes the provider saturated for the
answer's Retry-After, else a second. When it still is after ``queue_max_wait``: 503 ``provider_saturated`` with
Retry-After. Critical requests are never held for this: they go on to the provider, failover and all.

The queue is bounded per tenant (``max_waiting``, 64, both kinds of wait together): a request arriving to a full
queue gets 429 at once (reason ``queue_full``). Held requests retry independently, so the order they are admitted
in is not guaranteed FIFO. Envoy's ext_authz timeout is rendered to outlast the longest ``queue_max_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Final, TypeVar

from ext_proc.accesslog import UsageRecord
from ext_proc.config import ServiceConfig
from ext_proc.errors import LimitExceeded, ProviderSaturated
from ext_proc.metrics import Metrics

__all__ = ["HELD_LIMITS", "HoldQueue"]

T = TypeVar("T")

HELD_LIMITS: Final = frozenset({"rpm", "tpm"})
MAX_WAITING: Final = 64
SATURATED: Final = frozenset({429, 503, 529})
"""A provider's answers that say it has no room (529: Anthropic's "overloaded")."""
SATURATED_FOR_S: Final = 1.0
"""How long a provider is taken as saturated after such an answer without Retry-After."""


class HoldQueue:
    def __init__(
        self,
        config: ServiceConfig,
        metrics: Metrics,
        *,
        max_waiting: int = MAX_WAITING,
        first_backoff_s: float = 0.02,
        max_backoff_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._provider_of = {name: model.provider for name, model in config.models.items()}
        self._saturated_until: dict[str, float] = {}
        self.max_waiting = max_waiting
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._policies: dict[str, tuple[bytes, bytes, float]] = {
            name: (
                t.non_critical.header.encode(),
                t.non_critical.value.encode(),
                t.non_critical.queue_max_wait_ms / 1000,
            )
            for name, t in config.tenants.items()
            if t.non_critical is not None
        }
        self.headers: frozenset[bytes] = frozenset(header for header, _, _ in self._policies.values())
        """Header names (lowercase) the HTTP server must keep for :meth:`max_wait`."""
        self._waiting: dict[str, int] = {}

    def max_wait(self, tenant: str, priority: Sequence[tuple[bytes, bytes]]) -> float | None:
        """Seconds a request may be held, when it is non-critical for `tenant`; None when it must not be held."""
        policy = self._policies.get(tenant)
        if policy is None:
            return None
        header, value, wait_s = policy
        for name, given in priority:
            if name == header and given.strip() == value:
                return wait_s
        return None

    def waiting(self, tenant: str) -> int:
        return self._waiting.get(tenant, 0)

    async def hold(
        self, tenant: str, max_wait_s: float, refused: LimitExceeded, attempt: Callable[[], Awaitable[T]]
    ) -> T:
        """Retry `attempt` (a reservation) until it returns, while it raises a held limit, for at most `max_wait_s`;
        `refused` is the refusal that sent the request here. Raises LimitExceeded when the queue is full or the
        wait is over, and whatever else `attempt` raises at once."""
        with self._queued(tenant, refused):
            start = self._clock()
            deadline = start + max_wait_s
            delay = self._first_backoff_s
            last = refused
            while (left := deadline - self._clock()) > 0:
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, self._max_backoff_s)
                try:
                    return await attempt()
                except LimitExceeded as err:
                    if err.limit not in HELD_LIMITS:
                        raise
                    last = err
            waited_ms = round((self._clock() - start) * 1000)
            raise _again(last, f"{last.message} Waited {waited_ms} ms in the queue.", "queue_timeout")

    def saw(self, records: Iterable[UsageRecord]) -> None:
        """Access-log entries: which providers refused for lack of room, and for how long (module docstring)."""
        now = self._clock()
        for record in records:
            if record.status not in SATURATED:
                continue
            provider = record.served_by
            if provider is None and record.overflow:
                provider = self._provider_of.get(record.request_model or "")
            if provider is None:
                continue  # Envoy's own answer (no healthy provider, a local limit): not a provider out of room
            until = now + (SATURATED_FOR_S if record.retry_after_s is None else record.retry_after_s)
            if until > self._saturated_until.get(provider, 0.0):
                self._saturated_until[provider] = until

    def saturated_for(self, model: str) -> float:
        """Seconds the model's provider stays saturated (0: it is not)."""
        until = self._saturated_until.get(self._provider_of.get(model, ""), 0.0)
        return max(0.0, until - self._clock())

    async def wait_for_provider(self, tenant: str, model: str, max_wait_s: float) -> None:
        """Return once the model's provider is not saturated, or raise ProviderSaturated after `max_wait_s`
        (LimitExceeded at once when the queue is full)."""
        refused = ProviderSaturated(tenant=tenant, model=model)
        with self._queued(tenant, LimitExceeded(refused.message, tenant=tenant, model=model)):
            deadline = self._clock() + max_wait_s
            while (left := self.saturated_for(model)) > 0:
                if (budget := deadline - self._clock()) <= 0:
                    retry = str(max(1, math.ceil(left)))
                    raise ProviderSaturated(tenant=tenant, model=model, headers=(("retry-after", retry),))
                await asyncio.sleep(min(left, budget, self._max_backoff_s))

    @contextlib.contextmanager
    def _queued(self, tenant: str, refused: LimitExceeded) -> Iterator[None]:
        """One place in the tenant's bounded queue, or `refused` as ``queue_full``; the depth and wait metrics."""
        depth = self._waiting.get(tenant, 0)
        if depth >= self.max_waiting:
            message = f"{refused.message} The queue of non-critical requests is full ({self.max_waiting} waiting)."
            raise _again(refused, message, "queue_full")
        self._waiting[tenant] = depth + 1
        self._metrics.queued(tenant, depth + 1)
        start = self._clock()
        try:
            yield
        finally:
            self._metrics.waited(tenant, self._clock() - start)
            remaining = self._waiting[tenant] - 1
            self._waiting[tenant] = remaining
            self._metrics.queued(tenant, remaining)


def _again(err: LimitExceeded, message: str, reason: str) -> LimitExceeded:
    return type(err)(message, tenant=err.tenant, model=err.model, headers=err.headers, limit=err.limit, reason=reason)
