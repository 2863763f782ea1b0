"""The service's Prometheus metrics, served at ``GET /metrics`` on its HTTP port.

Every metric lives in a registry owned by one :class:`Metrics` object (never prometheus_client's global one), so
two services in one process — the tests — never share a count. Label values come from the config only: a tenant or
model the config does not name is counted as ``other``; reasons are the limits' and the errors' fixed codes. The
label children the hot path uses are cached, so a request costs a dict lookup and an increment.

=========================================  =====================================================================
``meshgen_tokens_total``                   tokens settled, by tenant, model, type (``input``/``output`` from the
                                           provider's usage; ``total`` for an estimate, whose split is unknown)
                                           and count (``exact`` | ``estimated``)
``meshgen_cost_usd_total``                 dollars settled, by tenant, model and count
``meshgen_settled_requests_total``         requests settled, by tenant, model and count: estimated vs reported
``meshgen_budget_used_ratio``              used / limit of the tenant's daily budget (USD, else tokens per day)
``meshgen_budget_alerts_total``            budget stages crossed (once per tenant, stage and UTC day)
``meshgen_alert_webhook_failures_total``   alert webhook POSTs that failed or timed out
``meshgen_refusals_total``                 refusals by tenant and reason (``rpm``, ``tpm``, ``tpd``,
                                           ``usd_per_day``, ``queue_full``, ``queue_timeout``, or an error code)
``meshgen_downgrades_total``               requests re-routed to the downgrade model, by tenant and requested model
``meshgen_queue_depth``                    non-critical requests held now, by tenant
``meshgen_queue_wait_seconds``             how long held requests waited (served or refused), by tenant
``meshgen_ledger_degraded``                1 while the ledger's store does not answer and the service counts in
                                           its own memory (``count_locally``) or refuses (``refuse``), else 0
``meshgen_ledger_errors_total``            store calls that failed (down, timed out, locked), by operation
                                           (``reserve``, ``settle``, ``sweep``, ``reconcile``)
``meshgen_ledger_replayed_total``          reservations counted locally and replayed into the store on recovery
=========================================  =====================================================================

A reservation settled as an estimate and later replaced by the exact count is counted under both ``count`` values:
the ``exact`` series is what providers reported, the ``estimated`` one what was billed without a report.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ext_proc.config import ServiceConfig

__all__ = ["CONTENT_TYPE", "OTHER", "Metrics"]

OTHER: Final = "other"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
_WAIT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, config: ServiceConfig) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._tenants = frozenset(config.tenants)
        self._models = frozenset(config.models)
        r = self.registry
        self.tokens = Counter("meshgen_tokens", "Tokens settled.", ["tenant", "model", "type", "count"], registry=r)
        self.cost = Counter("meshgen_cost_usd", "Dollars settled.", ["tenant", "model", "count"], registry=r)
        self.settled = Counter(
            "meshgen_settled_requests",
            "Requests settled, exact or estimated.",
            ["tenant", "model", "count"],
            registry=r,
        )
        self.budget_used = Gauge(
            "meshgen_budget_used_ratio", "Used share of the tenant's daily budget.", ["tenant"], registry=r
        )
        self.budget_alerts = Counter(
            "meshgen_budget_alerts", "Budget stages crossed, once per window.", ["tenant", "stage"], registry=r
        )
        self.webhook_failures = Counter(
            "meshgen_alert_webhook_failures", "Alert webhook POSTs that failed.", registry=r
        )
        self.refusals = Counter("meshgen_refusals", "Requests refused.", ["tenant", "reason"], registry=r)
        self.downgrades = Counter(
            "meshgen_downgrades", "Requests re-routed to the downgrade model.", ["tenant", "model"], registry=r
        )
        self.hedge_wins = Counter(
            "meshgen_hedge_wins",
            "Requests of a hedged model answered by a later attempt on another provider than the model's own, "
            "by the provider that answered (the hedges sent: Envoy's upstream_rq_retry on the hedged chain).",
            ["model", "provider"],
            registry=r,
        )
        self.queue_depth = Gauge("meshgen_queue_depth", "Non-critical requests held.", ["tenant"], registry=r)
        self.queue_wait = Histogram(
            "meshgen_queue_wait_seconds", "Time held requests waited.", ["tenant"], buckets=_WAIT_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "meshgen_ttft_seconds",
            "Streams: from the request reaching the gateway's ext_proc to the first response chunk (the provider's "
            "time to first token plus the gateway's).",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.ledger_degraded = Gauge(
            "meshgen_ledger_degraded", "1 while the ledger's store does not answer.", registry=r
        )
        self.ledger_errors = Counter("meshgen_ledger_errors", "Ledger store calls that failed.", ["op"], registry=r)
        self.ledger_replayed = Counter(
            "meshgen_ledger_replayed", "Local reservations replayed into the store.", registry=r
        )
        self._refusals: dict[tuple[str | None, str], Counter] = {}
        self._budget_used: dict[str, Gauge] = {}
        self._exact: dict[tuple[str, str], tuple[Counter, Counter, Counter, Counter]] = {}
        self._estimated: dict[tuple[str, str], tuple[Counter, Counter, Counter]] = {}

    def tenant(self, name: str | None) -> str:
        return name if name in self._tenants else OTHER

    def model(self, name: str | None) -> str:
        return name if name in self._models else OTHER

    def refused(self, tenant: str | None, reason: str) -> None:
        child = self._refusals.get((tenant, reason))
        if child is None:
            child = self._refusals[tenant, reason] = self.refusals.labels(self.tenant(tenant), reason)
        child.inc()

    def used_ratio(self, tenant: str, ratio: float) -> None:
        child = self._budget_used.get(tenant)
        if child is None:
            child = self._budget_used[tenant] = self.budget_used.labels(self.tenant(tenant))
        child.set(ratio)

    def settled_exact(
        self, tenant: str, model: str, input_tokens: int, output_tokens: int, usd: float, *, requests: int = 1
    ) -> None:
        """`requests` settled with the provider's counts, these their sums."""
        tokens_in, tokens_out, cost, settled = self._exact_children(tenant, model)
        tokens_in.inc(input_tokens)
        tokens_out.inc(output_tokens)
        cost.inc(usd)
        settled.inc(requests)

    def settled_estimated(self, tenant: str, model: str, tokens: int, usd: float, *, requests: int = 1) -> None:
        """`requests` settled at an estimate, these their sums."""
        key = (tenant, model)
        children = self._estimated.get(key)
        if children is None:
            t, m = self.tenant(tenant), self.model(model)
            children = self._estimated[key] = (
                self.tokens.labels(t, m, "total", "estimated"),
                self.cost.labels(t, m, "estimated"),
                self.settled.labels(t, m, "estimated"),
            )
        total, cost, settled = children
        total.inc(tokens)
        cost.inc(usd)
        settled.inc(requests)

    def _exact_children(self, tenant: str, model: str) -> tuple[Counter, Counter, Counter, Counter]:
        key = (tenant, model)
        children = self._exact.get(key)
        if children is None:
            t, m = self.tenant(tenant), self.model(model)
            children = self._exact[key] = (
                self.tokens.labels(t, m, "input", "exact"),
                self.tokens.labels(t, m, "output", "exact"),
                self.cost.labels(t, m, "exact"),
                self.settled.labels(t, m, "exact"),
            )
        return children

    def downgraded(self, tenant: str, model: str) -> None:
        self.downgrades.labels(self.tenant(tenant), self.model(model)).inc()

    def alert(self, tenant: str, stage: str) -> None:
        self.budget_alerts.labels(self.tenant(tenant), stage).inc()

    def queued(self, tenant: str, depth: int) -> None:
        self.queue_depth.labels(self.tenant(tenant)).set(depth)

    def waited(self, tenant: str, seconds: float) -> None:
        self.queue_wait.labels(self.tenant(tenant)).observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format, for ``GET /metrics``."""
        return generate_latest(self.registry)
