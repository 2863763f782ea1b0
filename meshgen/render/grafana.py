"""Grafana, as code: one overview dashboard plus one per region, and the provisioning files that load them.

Dashboards are built with the `grafana-foundation-sdk` builders (its 11.x line, the schema Grafana 11 reads), from
the IR only: the tenants and models of the variables, the SLO panels, the provider clusters and the stages of the
budget gauges all come from the policy, so a panel names the policy line behind it.

Metric names are the ones the components export, as Prometheus scrapes them:

- every Envoy's admin ``/stats/prometheus``: the gateway listener's ``envoy_http_downstream_*`` with
  ``envoy_http_conn_manager_prefix="gateway_<region>"``, and ``envoy_cluster_*`` with
  ``envoy_cluster_name="provider_<provider>_<region>"`` or ``"model_<model>_chain[_stream]"`` (our dots are ``_``);
  per-region cluster panels use the ``region`` label the scrape config sets on each Envoy's target;
- the data-plane service's ``/metrics`` (``meshgen_*``, ext_proc/metrics.py): one service serves every region, so its
  panels are the same on every dashboard.

Pure: IR → documents, no clock; the same IR gives byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, Final

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BarGaugeDisplayMode, VizOrientation
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
)

from meshgen.ir.model import Gateway, Region, Slo
from meshgen.render.document import Document

__all__ = [
    "DASHBOARDS_DIR",
    "DATASOURCE_UID",
    "ENVOY_TIME_BUCKETS_MS",
    "dashboard_uid",
    "render_grafana",
]

DATASOURCE_UID: Final = "meshgen-prometheus"
DASHBOARDS_DIR: Final = "/var/lib/grafana/dashboards/meshgen"
"""Where the Compose Grafana container mounts generated/grafana/dashboards/."""
PROMETHEUS_URL: Final = "http://prometheus:9090"
"""The Compose service name of Prometheus."""

ENVOY_TIME_BUCKETS_MS: Final = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
"""Envoy's default histogram buckets (``*_rq_time``, in ms): a latency SLO counts requests under the largest one
that does not pass its threshold."""

_DS: Final = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
_RATE: Final = "$__rate_interval"


def stat_name(name: str) -> str:
    """Envoy's stat spelling of a generated name (the renderers write dots as `_`)."""
    return name.replace(".", "_")


def dashboard_uid(region: Region | None) -> str:
    return "meshgen-overview" if region is None else f"meshgen-region-{region.name}"


# ---- selectors --------------------------------------------------------------------------------------------------


class _Scope:
    """Label matchers for one dashboard: every region (overview) or one."""

    def __init__(self, gw: Gateway, region: Region | None) -> None:
        regions = [region] if region else list(gw.regions)
        self.region = region
        self.gateway = _regex("envoy_http_conn_manager_prefix", [stat_name(f"gateway.{r.name}") for r in regions])
        providers = _regex("envoy_cluster_name", [stat_name(c.name) for c in gw.clusters])
        self.providers = f'{providers},region="{region.name}"' if region else providers
        chains = 'envoy_cluster_name=~"model_${model}_chain(_stream)?"'
        self.chains = f'{chains},region="{region.name}"' if region else chains
        self.service_cluster = 'envoy_cluster_name="meshgen_service"' + (f',region="{region.name}"' if region else "")


def _regex(label: str, values: Sequence[str]) -> str:
    if len(values) == 1:
        return f'{label}="{values[0]}"'
    return f'{label}=~"{"|".join(values)}"'


_TENANT: Final = 'tenant=~"$tenant"'
_MODEL: Final = 'model=~"$model"'


def _rate(metric: str, sel: str, by: str = "", fn: str = "rate", window: str = _RATE) -> str:
    """`sum by (by) (fn(metric{sel}[window]))`."""
    grouping = f" by ({by})" if by else ""
    selector = f"{{{sel}}}" if sel else ""
    return f"sum{grouping} ({fn}({metric}{selector}[{window}]))"


def _quantile(q: float, bucket: str, sel: str, by: str = "") -> str:
    return f"histogram_quantile({q:g}, {_rate(bucket, sel, ', '.join(filter(None, ('le', by))))})"


# ---- panels -----------------------------------------------------------------------------------------------------


def _query(expr: str, legend: str, ref: str, *, instant: bool = False) -> prom.Dataquery:
    q = prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
    return q.instant() if instant else q


def _targets(queries: Sequence[tuple[str, str]], *, instant: bool = False) -> list[prom.Dataquery]:
    return [_query(expr, legend, chr(ord("A") + i), instant=instant) for i, (expr, legend) in enumerate(queries)]


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(v, c) for v, c in steps])


def _timeseries(
    title: str, description: str, unit: str, queries: Sequence[tuple[str, str]], *, span: int = 12
) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).datasource(_DS).unit(unit)
    panel = panel.height(8).span(span)
    for target in _targets(queries):
        panel = panel.with_target(target)
    return panel


def _stat(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[tuple[str, str]],
    steps: Sequence[tuple[float | None, str]],
    *,
    span: int = 6,
) -> stat.Panel:
    panel = stat.Panel().title(title).description(description).datasource(_DS).unit(unit).height(5).span(span)
    panel = panel.thresholds(_thresholds(steps))
    for target in _targets(queries, instant=True):
        panel = panel.with_target(target)
    return panel


def _gauge(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[tuple[str, str]],
    steps: Sequence[tuple[float | None, str]],
    *,
    maximum: float | None = None,
    span: int = 12,
) -> bargauge.Panel:
    panel = bargauge.Panel().title(title).description(description).datasource(_DS).unit(unit).height(8).span(span)
    panel = panel.thresholds(_thresholds(steps)).display_mode(BarGaugeDisplayMode.GRADIENT)
    panel = panel.orientation(VizOrientation.HORIZONTAL).min(0)
    if maximum is not None:
        panel = panel.max(maximum)
    for target in _targets(queries, instant=True):
        panel = panel.with_target(target)
    return panel


_OK: Final = (None, "green")


# ---- rows -------------------------------------------------------------------------------------------------------

Panels = Iterator[db.Row | timeseries.Panel | stat.Panel | bargauge.Panel]


def _golden_signals(s: _Scope) -> Panels:
    where = "every region's" if s.region is None else f"the {s.region.name}"
    yield db.Row("Golden signals")
    yield _timeseries(
        "Requests by status class",
        f"Requests answered by {where} gateway listener, per second, by HTTP status class.",
        "reqps",
        [
            (
                _rate("envoy_http_downstream_rq_xx", s.gateway, "envoy_response_code_class"),
                "{{envoy_response_code_class}}xx",
            )
        ],
    )
    yield _timeseries(
        "Errors",
        "Share of answers that were 5xx (the availability SLI) and 4xx (refusals: keys, models, budgets, limits).",
        "percentunit",
        [
            (
                _ratio(
                    f'envoy_http_downstream_rq_xx{{{s.gateway},envoy_response_code_class="{c}"}}',
                    f"envoy_http_downstream_rq_completed{{{s.gateway}}}",
                    _RATE,
                ),
                f"{c}xx",
            )
            for c in ("5", "4")
        ],
    )
    yield _timeseries(
        "Latency",
        "Whole request at the gateway listener (a stream: until its last chunk), from Envoy's histogram.",
        "ms",
        [
            (
                _quantile(q, "envoy_http_downstream_rq_time_bucket", s.gateway),
                f"p{round(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
    )
    yield _timeseries(
        "Time to first token (streams)",
        "From the request reaching the gateway's ext_proc to the first response chunk (meshgen_ttft_seconds; the "
        "data-plane service serves every region).",
        "s",
        [(_quantile(q, "meshgen_ttft_seconds_bucket", ""), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)],
    )
    yield _timeseries(
        "Saturation",
        "Requests in flight at the gateway, requests waiting for a provider connection, and non-critical requests "
        "held in the data-plane service's queue.",
        "short",
        [
            (f"sum(envoy_http_downstream_rq_active{{{s.gateway}}})", "in flight"),
            (f"sum(envoy_cluster_upstream_rq_pending_active{{{s.providers}}})", "pending on providers"),
            (f"sum(meshgen_queue_depth{{{_TENANT}}})", "queued (non-critical)"),
        ],
        span=24,
    )


def _ratio(bad: str, total: str, window: str) -> str:
    return f"sum(rate({bad}[{window}])) / sum(rate({total}[{window}]))"


def _duration(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _latency_bucket(threshold_ms: int) -> float:
    return max((b for b in ENVOY_TIME_BUCKETS_MS if b <= threshold_ms), default=ENVOY_TIME_BUCKETS_MS[0])


def _bucket_label(bucket: float) -> str:
    return str(int(bucket)) if float(bucket).is_integer() else str(bucket)


def _slo_bad_ratio(slo: Slo, s: _Scope, window: str) -> str:
    """The share of requests that missed the SLO over ``window``."""
    total = f"sum(increase(envoy_http_downstream_rq_completed{{{s.gateway}}}[{window}]))"
    if slo.threshold_ms is None:
        bad = f'sum(increase(envoy_http_downstream_rq_xx{{{s.gateway},envoy_response_code_class="5"}}[{window}]))'
        return f"({bad} / {total})"
    le = _bucket_label(_latency_bucket(slo.threshold_ms))
    good = f'sum(increase(envoy_http_downstream_rq_time_bucket{{{s.gateway},le="{le}"}}[{window}]))'
    count = f"sum(increase(envoy_http_downstream_rq_time_count{{{s.gateway}}}[{window}]))"
    return f"(1 - {good} / {count})"


def _slos(gw: Gateway, s: _Scope) -> Panels:
    if not gw.slos:
        return
    yield db.Row("SLOs and error budgets")
    for slo in gw.slos:
        budget = 1 - slo.objective / 100
        window = _duration(slo.window_ms)
        if slo.threshold_ms is None:
            what = "answers that are not 5xx"
        else:
            bucket = _latency_bucket(slo.threshold_ms)
            what = f"requests answered within {_duration(slo.threshold_ms)}"
            if bucket != slo.threshold_ms:
                what += (
                    f" (Envoy's histogram has no bucket at {slo.threshold_ms} ms: counted within "
                    f"{_bucket_label(bucket)} ms, the stricter side)"
                )
        source = f"slos.{slo.name}: objective {slo.objective:g} % over {window}; the SLI is the share of {what}."
        yield _stat(
            f"{slo.name}: SLI over {window}",
            source,
            "percentunit",
            [(f"1 - {_slo_bad_ratio(slo, s, window)}", slo.name)],
            [(None, "red"), (slo.objective / 100, "green")],
        )
        yield _stat(
            f"{slo.name}: error budget remaining",
            f"{source} Share of the {window} error budget ({budget * 100:g} % of requests) not yet spent.",
            "percentunit",
            [(f"1 - {_slo_bad_ratio(slo, s, window)} / {budget:g}", "remaining")],
            [(None, "red"), (0.25, "orange"), (0.5, "green")],
        )
        yield _timeseries(
            f"{slo.name}: burn rate",
            f"{source} How fast the error budget burns (1 = spent exactly at the end of the window); the Google SRE "
            "workbook pages at 14.4 over 1h and 6 over 6h.",
            "short",
            [(f"{_slo_bad_ratio(slo, s, w)} / {budget:g}", w) for w in ("5m", "1h", "6h")],
        )


def _tokens_and_cost(gw: Gateway) -> Panels:
    sel = f"{_TENANT},{_MODEL}"
    yield db.Row("Tokens and cost")
    yield _timeseries(
        "Tokens per tenant",
        "Tokens settled per second (the provider's counts, or the estimate when none arrived).",
        "short",
        [(_rate("meshgen_tokens_total", sel, "tenant"), "{{tenant}}")],
    )
    yield _timeseries(
        "Tokens by model and type",
        "input/output from the provider's usage; total: settled at the estimate (the split is unknown).",
        "short",
        [(_rate("meshgen_tokens_total", sel, "model, type"), "{{model}} {{type}}")],
    )
    yield _gauge(
        "Cost per tenant (time range)",
        "Dollars settled over the dashboard's time range, at the policy's prices per model.",
        "currencyUSD",
        [(f"sum by (tenant) (increase(meshgen_cost_usd_total{{{sel}}}[$__range]))", "{{tenant}}")],
        [_OK],
    )
    yield _timeseries(
        "Cost per model",
        "Dollars per hour at the current rate.",
        "currencyUSD",
        [(f"{_rate('meshgen_cost_usd_total', sel, 'model')} * 3600", "{{model}}")],
    )
    yield _timeseries(
        "Requests settled at an estimate",
        "Share of requests billed without the provider's usage (a lost access-log batch, a cut stream): the "
        "accounting runs on estimates when this stays up.",
        "percentunit",
        [
            (
                f'sum(rate(meshgen_settled_requests_total{{{sel},count="estimated"}}[{_RATE}])) / '
                f"sum(rate(meshgen_settled_requests_total{{{sel}}}[{_RATE}]))",
                "estimated",
            )
        ],
        span=24,
    )


def _budgets(gw: Gateway) -> Panels:
    stages = sorted({stage for t in gw.tenants for stage in t.alerts_at})
    colors = ("yellow", "orange", "red", "dark-red")
    steps: list[tuple[float | None, str]] = [_OK, *((st, colors[min(i, 3)]) for i, st in enumerate(stages))]
    staged = ", ".join(
        f"{t.name} at {'/'.join(f'{a * 100:g}' for a in t.alerts_at)} %" for t in gw.tenants if t.alerts_at
    )
    yield db.Row("Budgets")
    yield _gauge(
        "Daily budget used",
        "Used share of each tenant's daily budget (USD, else tokens per day). "
        f"Stages (tenants.*.alerts_at): {staged or 'none'}.",
        "percentunit",
        [(f"max by (tenant) (meshgen_budget_used_ratio{{{_TENANT}}})", "{{tenant}}")],
        steps,
        maximum=1,
    )
    yield _timeseries(
        "Budget stages crossed",
        "Each tenant's budget stage crossings (once per tenant, stage and UTC day).",
        "short",
        [
            (
                _rate("meshgen_budget_alerts_total", _TENANT, "tenant, stage", "increase"),
                "{{tenant}} {{stage}}",
            )
        ],
    )
    yield _timeseries(
        "Refusals by reason",
        "Requests the data-plane service refused, per second: a limit (rpm, tpm, tpd, usd_per_day), the queue, or "
        "an error code.",
        "reqps",
        [(_rate("meshgen_refusals_total", _TENANT, "tenant, reason"), "{{tenant}} {{reason}}")],
    )
    yield _timeseries(
        "Queue wait (non-critical requests)",
        "How long held non-critical requests waited before being served or refused (p95).",
        "s",
        [
            (
                _quantile(0.95, "meshgen_queue_wait_seconds_bucket", _TENANT, "tenant"),
                "{{tenant}}",
            )
        ],
    )


def _events(gw: Gateway, s: _Scope) -> Panels:
    yield db.Row("Failover, hedging and downgrades")
    yield _timeseries(
        "Requests per provider cluster",
        "Where traffic lands: a failover shows as traffic moving from a model's own provider to the next in its "
        "chain (models.*.failover).",
        "reqps",
        [
            (
                _rate("envoy_cluster_upstream_rq_total", s.providers, "envoy_cluster_name"),
                "{{envoy_cluster_name}}",
            )
        ],
    )
    yield _timeseries(
        "Retries and hedges sent",
        "Further attempts per model chain (retries, failover to the next priority and hedges: upstream_rq_retry) and "
        "those that succeeded.",
        "reqps",
        [
            (
                _rate("envoy_cluster_upstream_rq_retry", s.chains, "envoy_cluster_name"),
                "{{envoy_cluster_name}} sent",
            ),
            (
                _rate("envoy_cluster_upstream_rq_retry_success", s.chains, "envoy_cluster_name"),
                "{{envoy_cluster_name}} succeeded",
            ),
        ],
    )
    hedged = ", ".join(m.name for m in gw.models if m.hedge) or "none"
    yield _timeseries(
        "Hedges won",
        f"Requests of a hedged model (models.*.hedge: {hedged}) answered by a later attempt on another provider.",
        "reqps",
        [
            (
                _rate("meshgen_hedge_wins_total", _MODEL, "model, provider"),
                "{{model}} by {{provider}}",
            )
        ],
    )
    downgrades = ", ".join(f"{m.name} → {m.downgrade}" for m in gw.models if m.downgrade) or "none"
    yield _timeseries(
        "Downgrades",
        "Requests re-routed to the cheaper model when the tenant's budget is spent "
        f"(models.*.downgrade: {downgrades}).",
        "reqps",
        [
            (
                f"sum by (tenant, model) (rate(meshgen_downgrades_total{{{_TENANT},{_MODEL}}}[{_RATE}]))",
                "{{tenant}} {{model}}",
            )
        ],
    )


def _provider_health(s: _Scope) -> Panels:
    yield db.Row("Provider health")
    yield _timeseries(
        "Ejected endpoints",
        "Endpoints outlier detection has ejected now (provider_defaults.outlier / providers.*.outlier).",
        "short",
        [
            (
                f"sum by (envoy_cluster_name) (envoy_cluster_outlier_detection_ejections_active{{{s.providers}}})",
                "{{envoy_cluster_name}}",
            )
        ],
    )
    yield _timeseries(
        "Ejections",
        "Ejections enforced (consecutive 5xx and others), per interval.",
        "short",
        [
            (
                _rate(
                    "envoy_cluster_outlier_detection_ejections_enforced_total",
                    s.providers,
                    "envoy_cluster_name",
                    "increase",
                ),
                "{{envoy_cluster_name}}",
            )
        ],
    )
    yield _timeseries(
        "Provider errors",
        "Share of attempts a provider answered 5xx (chaos faults included), per provider cluster.",
        "percentunit",
        [
            (
                _rate(
                    "envoy_cluster_upstream_rq_xx", f'{s.providers},envoy_response_code_class="5"', "envoy_cluster_name"
                )
                + " / "
                + _rate("envoy_cluster_upstream_rq_completed", s.providers, "envoy_cluster_name"),
                "{{envoy_cluster_name}}",
            )
        ],
    )
    yield _timeseries(
        "Provider latency p95",
        "Per attempt, from Envoy's upstream histogram.",
        "ms",
        [
            (
                _quantile(0.95, "envoy_cluster_upstream_rq_time_bucket", s.providers, "envoy_cluster_name"),
                "{{envoy_cluster_name}}",
            )
        ],
    )
    yield _timeseries(
        "Healthy endpoints",
        "Endpoints each provider cluster may send to.",
        "short",
        [
            (
                f"sum by (envoy_cluster_name) (envoy_cluster_membership_healthy{{{s.providers}}})",
                "{{envoy_cluster_name}}",
            )
        ],
    )
    yield _timeseries(
        "Timeouts and open circuit breakers",
        "Attempts that timed out, and clusters whose pending-request breaker is open.",
        "short",
        [
            (
                _rate("envoy_cluster_upstream_rq_timeout", s.providers, "envoy_cluster_name"),
                "{{envoy_cluster_name}} timeouts/s",
            ),
            (
                "sum by (envoy_cluster_name) "
                f"(envoy_cluster_circuit_breakers_default_rq_pending_open{{{s.providers}}})",
                "{{envoy_cluster_name}} breaker open",
            ),
        ],
    )
    yield _timeseries(
        "Data-plane service",
        "Admission calls from the gateway by status class, and whether the ledger's store is down "
        "(meshgen_ledger_degraded: counting in memory or refusing).",
        "short",
        [
            (
                _rate("envoy_cluster_upstream_rq_xx", s.service_cluster, "envoy_response_code_class"),
                "admission {{envoy_response_code_class}}xx/s",
            ),
            ("max(meshgen_ledger_degraded)", "ledger degraded"),
        ],
        span=24,
    )


# ---- dashboards -------------------------------------------------------------------------------------------------


def _variables(gw: Gateway) -> list[db.CustomVariable]:
    def choice(name: str, label: str, values: Sequence[str]) -> db.CustomVariable:
        return (
            db.CustomVariable(name)
            .label(label)
            .values(",".join(values))
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .allow_custom_value(False)
        )

    return [
        choice("tenant", "Tenant", [t.name for t in gw.tenants]),
        choice("model", "Model", [m.name for m in gw.models]),
    ]


def _dashboard(gw: Gateway, region: Region | None) -> dict[str, Any]:
    s = _Scope(gw, region)
    title = f"meshgen {gw.name}: " + ("overview" if region is None else f"region {region.name}")
    builder = (
        db.Dashboard(title)
        .uid(dashboard_uid(region))
        .tags(["meshgen", gw.name, "overview" if region is None else f"region:{region.name}"])
        .timezone("utc")
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .readonly()
    )
    for variable in _variables(gw):
        builder = builder.with_variable(variable)
    others = [r for r in gw.regions if r != region]
    for other in ([None] if region else []) + others:
        name = "overview" if other is None else f"region {other.name}"
        url = f"/d/{dashboard_uid(other)}"
        link = db.DashboardLink(name).type(DashboardLinkType.LINK).url(url)
        builder = builder.link(link.include_vars(True).keep_time(True))
    sections = (
        _golden_signals(s),
        _slos(gw, s),
        _tokens_and_cost(gw),
        _budgets(gw),
        _events(gw, s),
        _provider_health(s),
    )
    panel_id = 0
    for section in sections:
        for item in section:
            panel_id += 1
            if isinstance(item, db.Row):
                builder = builder.with_row(item.id(panel_id))
            else:
                builder = builder.with_panel(item.id(panel_id))
    data: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    for variable in data["templating"]["list"]:
        # The SDK writes an interval variable's fields on every variable; Grafana's schema has them on none.
        for key in _INTERVAL_ONLY:
            variable.pop(key, None)
    return data


_INTERVAL_ONLY: Final = ("auto", "auto_min", "auto_count")


def _provisioning() -> list[Document]:
    datasource = {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "uid": DATASOURCE_UID,
                "type": "prometheus",
                "access": "proxy",
                "url": PROMETHEUS_URL,
                "isDefault": True,
                "editable": False,
            }
        ],
    }
    provider = {
        "apiVersion": 1,
        "providers": [
            {
                "name": "meshgen",
                "folder": "meshgen",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {"path": DASHBOARDS_DIR, "foldersFromFilesStructure": False},
            }
        ],
    }
    return [
        Document("grafana/provisioning/datasources/meshgen.yaml", datasource),
        Document("grafana/provisioning/dashboards/meshgen.yaml", provider),
    ]


def dashboards(gw: Gateway, regions: tuple[Region, ...] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(uid, dashboard) of the overview and of each region (all, or ``regions``)."""
    return [(dashboard_uid(r), _dashboard(gw, r)) for r in (None, *(gw.regions if regions is None else regions))]


def render_grafana(gw: Gateway) -> list[Document]:
    """generated/grafana/: provisioning (datasource + dashboard provider) and one dashboard JSON per scope."""
    dashboards = [
        Document(f"grafana/dashboards/{dashboard_uid(r)}.json", _dashboard(gw, r), header_key="description")
        for r in (None, *gw.regions)
    ]
    return [*_provisioning(), *dashboards]
