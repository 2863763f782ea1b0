"""Recording rules for the SLIs and the alerts, from the IR.

Metric names are the ones the components export as Prometheus scrapes them: Envoy's ``envoy_http_downstream_*``
(``envoy_http_conn_manager_prefix="gateway_<region>"``) and ``envoy_cluster_*`` (``envoy_cluster_name`` is the
cluster's name with dots as ``_``: ``provider_openai_us-east``, ``model_gpt-4o_chain``, ``meshgen_service``), and the
data-plane service's ``meshgen_*`` (ext_proc/metrics.py).

SLOs alert on multi-window, multi-burn-rate pairs (the Google SRE workbook): 2 % of the window's error budget spent in
1 h (checked over 5 m too) and 5 % in 6 h (checked over 30 m), both paging; over a 30-day window these are the
workbook's 14.4× and 6×.
"""

from __future__ import annotations

from typing import Any, Final

from meshgen.ir.model import Gateway, ProviderCluster, Slo, Tenant
from meshgen.render.envoy.routes import chain_cluster
from meshgen.render.prometheus.scrape import JOB_ENVOY, JOB_SERVICE

__all__ = ["BURN_WINDOWS", "ENVOY_TIME_BUCKETS_MS", "alert_rules", "burn_factor", "sli_rules"]

ENVOY_TIME_BUCKETS_MS: Final = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
"""Envoy's default histogram buckets (``*_rq_time``, ms): a latency SLO counts requests under the largest bucket
that does not pass its threshold."""
BURN_WINDOWS: Final = (("1h", "5m", 0.02, 1), ("6h", "30m", 0.05, 6))
"""(long window, short window, share of the error budget, long window in hours), each pair paging."""
QUANTILES: Final = (0.5, 0.95, 0.99)
GATEWAY: Final = 'envoy_http_conn_manager_prefix=~"gateway_.+"'
ESTIMATED_SHARE: Final = 0.1
"""Settled tokens counted at an estimate rather than the provider's report, above which accounting is flagged."""
HEDGES_MIN: Final = 10
"""Hedges sent in an hour below which hedging is too rare to say it stopped winning."""


def stat_name(name: str) -> str:
    return name.replace(".", "_")


def _sli_window(window_ms: int) -> float:
    return window_ms / 3_600_000


def burn_factor(slo: Slo, budget_share: float, hours: int) -> float:
    """The burn rate that spends ``budget_share`` of the SLO window's error budget in ``hours``."""
    return round(budget_share * _sli_window(slo.window_ms) / hours, 6)


def _error_budget(slo: Slo) -> float:
    return round(1 - slo.objective / 100, 10)


def _latency_bucket(slo: Slo) -> str:
    assert slo.threshold_ms is not None
    fitting = [b for b in ENVOY_TIME_BUCKETS_MS if b <= slo.threshold_ms] or [ENVOY_TIME_BUCKETS_MS[0]]
    return f"{fitting[-1]:g}"


def _slo_error_ratio(slo: Slo, window: str) -> str:
    """Bad requests over all, per region: 5xx answers, or (latency SLO) answers slower than the threshold."""
    if slo.threshold_ms is None:
        bad = (
            f'sum by (region) (rate(envoy_http_downstream_rq_xx{{{GATEWAY},envoy_response_code_class="5"}}[{window}]))'
        )
        total = f"sum by (region) (rate(envoy_http_downstream_rq_completed{{{GATEWAY}}}[{window}]))"
        return f"{bad} / {total}"
    le = _latency_bucket(slo)
    good = f'sum by (region) (rate(envoy_http_downstream_rq_time_bucket{{{GATEWAY},le="{le}"}}[{window}]))'
    total = f"sum by (region) (rate(envoy_http_downstream_rq_time_count{{{GATEWAY}}}[{window}]))"
    return f"1 - {good} / {total}"


def _slo_windows() -> tuple[str, ...]:
    return tuple(sorted({w for pair in BURN_WINDOWS for w in pair[:2]}, key=lambda w: (w[-1], int(w[:-1]))))


def _record(name: str, expr: str, **labels: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"record": name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def sli_rules(gw: Gateway) -> dict[str, Any]:
    gateway = [
        _record(
            "meshgen:gateway_requests:rate5m",
            f"sum by (region) (rate(envoy_http_downstream_rq_completed{{{GATEWAY}}}[5m]))",
        ),
        _record(
            "meshgen:gateway_errors:ratio_rate5m",
            f'sum by (region) (rate(envoy_http_downstream_rq_xx{{{GATEWAY},envoy_response_code_class="5"}}[5m]))'
            f" / sum by (region) (rate(envoy_http_downstream_rq_completed{{{GATEWAY}}}[5m]))",
        ),
        *(
            _record(
                "meshgen:gateway_latency_seconds:quantile5m",
                f"histogram_quantile({q:g}, sum by (region, le) "
                f"(rate(envoy_http_downstream_rq_time_bucket{{{GATEWAY}}}[5m]))) / 1000",
                quantile=f"{q:g}",
            )
            for q in QUANTILES
        ),
    ]
    providers = "|".join(stat_name(c.name) for c in gw.clusters)
    upstream = f'envoy_cluster_name=~"{providers}"'
    provider_rules = [
        _record(
            "meshgen:provider_requests:rate5m",
            f"sum by (region, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total{{{upstream}}}[5m]))",
        ),
        _record(
            "meshgen:provider_errors:ratio_rate5m",
            f"sum by (region, envoy_cluster_name) "
            f'(rate(envoy_cluster_upstream_rq_xx{{{upstream},envoy_response_code_class="5"}}[5m]))'
            f" / sum by (region, envoy_cluster_name) (rate(envoy_cluster_upstream_rq_total{{{upstream}}}[5m]))",
        ),
        *(
            _record(
                "meshgen:provider_latency_seconds:quantile5m",
                f"histogram_quantile({q:g}, sum by (region, envoy_cluster_name, le) "
                f"(rate(envoy_cluster_upstream_rq_time_bucket{{{upstream}}}[5m]))) / 1000",
                quantile=f"{q:g}",
            )
            for q in QUANTILES
        ),
    ]
    service = [
        *(
            _record(
                "meshgen:ttft_seconds:quantile5m",
                f"histogram_quantile({q:g}, sum by (le) (rate(meshgen_ttft_seconds_bucket[5m])))",
                quantile=f"{q:g}",
            )
            for q in QUANTILES
        ),
        _record("meshgen:tokens:rate5m", "sum by (tenant, model, type) (rate(meshgen_tokens_total[5m]))"),
        _record("meshgen:cost_usd:rate5m", "sum by (tenant, model) (rate(meshgen_cost_usd_total[5m]))"),
        _record(
            "meshgen:tokens_estimated:ratio_rate15m",
            'sum by (tenant) (rate(meshgen_tokens_total{count="estimated"}[15m]))'
            " / sum by (tenant) (rate(meshgen_tokens_total[15m]))",
        ),
    ]
    slo = [
        _record(f"meshgen:slo_errors:ratio_rate{w}", _slo_error_ratio(s, w), slo=s.name)
        for s in gw.slos
        for w in _slo_windows()
    ]
    groups = [
        {"name": "meshgen.sli.gateway", "rules": gateway},
        {"name": "meshgen.sli.providers", "rules": provider_rules},
        {"name": "meshgen.sli.service", "rules": service},
    ]
    if slo:
        groups.append({"name": "meshgen.sli.slo", "rules": slo})
    return {"groups": groups}


def _alert(name: str, expr: str, *, severity: str, summary: str, for_: str = "", **labels: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **labels}
    rule["annotations"] = {"summary": summary}
    return rule


def slo_alerts(slo: Slo) -> list[dict[str, Any]]:
    budget = _error_budget(slo)
    alerts = []
    for long, short, share, hours in BURN_WINDOWS:
        factor = burn_factor(slo, share, hours)
        threshold = f"{factor:g} * {budget:g}"
        sel = f'{{slo="{slo.name}"}}'
        alerts.append(
            _alert(
                "MeshgenSloBurnRate",
                f"meshgen:slo_errors:ratio_rate{long}{sel} > ({threshold})"
                f" and meshgen:slo_errors:ratio_rate{short}{sel} > ({threshold})",
                severity="page",
                summary=f"SLO {slo.name} ({slo.objective:g} %) in {{{{ $labels.region }}}} burns its error budget "
                f"{factor:g}x too fast ({long}/{short}): {share:.0%} of it gone in {long}",
                slo=slo.name,
                window=long,
            )
        )
    return alerts


def provider_alert(c: ProviderCluster) -> dict[str, Any]:
    sel = f'job="{JOB_ENVOY}",envoy_cluster_name="{stat_name(c.name)}"'
    return _alert(
        "MeshgenProviderFailing",
        f"max by (region, envoy_cluster_name) (envoy_cluster_outlier_detection_ejections_active{{{sel}}}) > 0"
        f" or sum by (region, envoy_cluster_name) "
        f"(increase(envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx{{{sel}}}[5m])) > 0",
        severity="page",
        summary=f"{c.name} failed {c.outlier.consecutive_5xx} consecutive times in {{{{ $labels.region }}}} "
        f"and was ejected",
        provider=c.provider,
        cluster=c.name,
    )


def budget_alerts(t: Tenant) -> list[dict[str, Any]]:
    if t.limits.usd_per_day is None and t.limits.tpd is None:
        return []
    used = f'max by (tenant) (meshgen_budget_used_ratio{{tenant="{t.name}"}})'
    alerts = []
    for i, stage in enumerate(t.alerts_at):
        upper = t.alerts_at[i + 1] if i + 1 < len(t.alerts_at) else None
        expr = f"{used} >= {stage:g}" + (f" < {upper:g}" if upper is not None else "")
        alerts.append(
            _alert(
                "MeshgenBudgetStage",
                expr,
                severity="page" if stage >= 1 else "ticket",
                summary=f"tenant {t.name} has used {stage:.0%} of its daily budget",
                tenant=t.name,
                stage=f"{stage * 100:g}",
            )
        )
    return alerts


def hedge_alert(gw: Gateway, model: str) -> dict[str, Any]:
    chains = f'envoy_cluster_name=~"{stat_name(chain_cluster(model))}(_stream)?"'
    sent = f"sum(increase(envoy_cluster_upstream_rq_retry{{{chains}}}[1h]))"
    won = f'sum(increase(meshgen_hedge_wins_total{{model="{model}"}}[1h]))'
    return _alert(
        "MeshgenHedgingNotWinning",
        f"{sent} >= {HEDGES_MIN} and ({won} or vector(0)) / {sent} < 0.01",
        severity="ticket",
        for_="15m",
        summary=f"model {model}: hedges sent in the last hour win under 1 % (its hedge delay may be too short)",
        model=model,
    )


def service_alerts() -> list[dict[str, Any]]:
    return [
        _alert(
            "MeshgenServiceDown",
            f'up{{job="{JOB_SERVICE}"}} == 0',
            severity="page",
            for_="1m",
            summary="the data-plane service does not answer its /metrics (admission fails open or closed)",
        ),
        _alert(
            "MeshgenAdmissionErrors",
            f"sum by (region) (rate(envoy_http_ext_authz_error{{{GATEWAY}}}[5m])) > 0",
            severity="page",
            for_="2m",
            summary="Envoy in {{ $labels.region }} cannot reach the data-plane service's admission",
        ),
        _alert(
            "MeshgenEnvoyDown",
            f'up{{job="{JOB_ENVOY}"}} == 0',
            severity="page",
            for_="1m",
            summary="Envoy in {{ $labels.region }} does not answer on its admin port",
        ),
        _alert(
            "MeshgenAccountingEstimated",
            f"meshgen:tokens_estimated:ratio_rate15m > {ESTIMATED_SHARE:g}",
            severity="ticket",
            for_="15m",
            summary=f"tenant {{{{ $labels.tenant }}}}: over {ESTIMATED_SHARE:.0%} of tokens are billed at an estimate "
            "(providers' usage not reaching the service)",
        ),
    ]


def alert_rules(gw: Gateway) -> dict[str, Any]:
    groups = []
    if gw.slos:
        groups.append({"name": "meshgen.slo", "rules": [a for s in gw.slos for a in slo_alerts(s)]})
    groups.append({"name": "meshgen.providers", "rules": [provider_alert(c) for c in gw.clusters]})
    budgets = [a for t in gw.tenants for a in budget_alerts(t)]
    if budgets:
        groups.append({"name": "meshgen.budgets", "rules": budgets})
    hedges = [hedge_alert(gw, m.name) for m in gw.models if m.hedge]
    if hedges:
        groups.append({"name": "meshgen.hedging", "rules": hedges})
    groups.append({"name": "meshgen.service", "rules": service_alerts()})
    return {"groups": groups}
