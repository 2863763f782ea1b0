"""The generated Prometheus files pass promtool, and each alert fires, and stays quiet, on crafted series.

The rules are rendered from policies/lab.yaml (two SLOs, tenants with 80/90/100 % stages, a hedged model, providers
ejected after 3 consecutive 5xx) and run by ``promtool test rules`` with series written here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshgen import output
from meshgen.compile import compile_gateway
from meshgen.ir.model import Gateway
from meshgen.render.prometheus import render_prometheus
from tests.support.tools import require_binary

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "lab.yaml"
GOLDEN = ROOT / "tests" / "golden" / "expected"
TREES = [ROOT / "generated", *sorted(p for p in GOLDEN.iterdir() if p.is_dir())]


def _promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.parametrize("tree", TREES, ids=[p.name for p in TREES])
def test_promtool_checks_every_generated_file(tree: Path) -> None:
    configs = sorted((tree / "prometheus").glob("*/prometheus.yml"))
    rules = sorted((tree / "prometheus" / "rules").glob("*.yml"))
    assert [c.parent.name for c in configs] == ["compose", "istio", "local"] and len(rules) == 2, tree
    checked = _promtool("check", "config", *configs)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = _promtool("check", "rules", *rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def gateway() -> Gateway:
    return compile_gateway(POLICY)


@pytest.fixture(scope="module")
def rules_dir(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prometheus")
    docs = [d for d in render_prometheus(gateway) if d.path.startswith("prometheus/rules/")]
    for path, text in output.serialize(docs, source=str(POLICY), version="test").items():
        (out / Path(path).name).write_text(text)
    return out


def _annotations(gateway: Gateway, labels: dict[str, str]) -> dict[str, str]:
    """The summary the rendered rule carries for an alert with these labels, its templates filled in."""
    rules = yaml.safe_load(render_alerts_text(gateway))
    for group in rules["groups"]:
        for rule in group["rules"]:
            own = dict(rule["labels"])
            if rule["alert"] == labels["alertname"] and all(labels.get(k) == v for k, v in own.items()):
                return {
                    k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], v)
                    for k, v in rule["annotations"].items()
                }
    raise AssertionError(f"no rule for {labels}")


def render_alerts_text(gateway: Gateway) -> str:
    (doc,) = [d for d in render_prometheus(gateway) if d.path == "prometheus/rules/alerts.yml"]
    return yaml.safe_dump(doc.data)


def _alert_test(gateway: Gateway, alertname: str, at: str, firing: list[dict[str, str]]) -> dict[str, Any]:
    exp = []
    for labels in firing:
        full = {"alertname": alertname, **labels}
        exp.append({"exp_labels": labels, "exp_annotations": _annotations(gateway, full)})
    return {"eval_time": at, "alertname": alertname, "exp_alerts": exp}


def _run_tests(rules_dir: Path, name: str, series: dict[str, str], alerts: list[dict[str, Any]]) -> None:
    spec = {
        "rule_files": ["sli.yml", "alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": alerts,
            }
        ],
    }
    path = rules_dir / f"{name}.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    ran = _promtool("test", "rules", path.name, cwd=rules_dir)
    assert ran.returncode == 0, ran.stdout + ran.stderr


GW_EAST = 'envoy_http_conn_manager_prefix="gateway_us-east",job="envoy",region="us-east"'
REQS = f"envoy_http_downstream_rq_completed{{{GW_EAST}}}"
ERRS = f'envoy_http_downstream_rq_xx{{{GW_EAST},envoy_response_code_class="5"}}'
BURN = {"severity": "page", "slo": "chat-availability", "region": "us-east"}


def test_burn_rate_fast_window_fires_and_slow_stays_quiet(gateway: Gateway, rules_dir: Path) -> None:
    """6 h clean, then 10 min of errors only: 1h/5m burn far over 14.4x; over 6 h only 2.8 % (< 6 x 0.5 %)."""
    series = {REQS: "0+100x370", ERRS: "0x360 100+100x9"}
    fast = {**BURN, "window": "1h"}
    _run_tests(
        rules_dir,
        "burn-fast",
        series,
        [
            _alert_test(gateway, "MeshgenSloBurnRate", "350m", []),
            _alert_test(gateway, "MeshgenSloBurnRate", "370m", [fast]),
        ],
    )


def test_burn_rate_slow_window_fires_and_fast_stays_quiet(gateway: Gateway, rules_dir: Path) -> None:
    """4 % errors for 6 h: over 6 x 0.5 % on 6h/30m, under 14.4 x 0.5 % on 1h/5m."""
    series = {REQS: "0+100x370", ERRS: "0+4x370"}
    _run_tests(
        rules_dir,
        "burn-slow",
        series,
        [_alert_test(gateway, "MeshgenSloBurnRate", "370m", [{**BURN, "window": "6h"}])],
    )


def test_burn_rate_short_window_silences_a_burst_that_ended(gateway: Gateway, rules_dir: Path) -> None:
    """15 % errors for 50 min, then 10 min clean: the 1h window is still over 7.2 % but the 5m one is not, so only
    the slow pair (its 30m window still over 3 %) pages; 0.2 % errors (inside the 0.5 % budget) never alert."""
    _run_tests(
        rules_dir,
        "burn-ended",
        {REQS: "0+100x120", ERRS: "0x60 15+15x49 750x10"},
        [
            _alert_test(gateway, "MeshgenSloBurnRate", "100m", [{**BURN, "window": "1h"}, {**BURN, "window": "6h"}]),
            _alert_test(gateway, "MeshgenSloBurnRate", "120m", [{**BURN, "window": "6h"}]),
        ],
    )
    _run_tests(
        rules_dir,
        "burn-within-budget",
        {REQS: "0+1000x400", ERRS: "0+2x400"},
        [_alert_test(gateway, "MeshgenSloBurnRate", t, []) for t in ("10m", "70m", "400m")],
    )


EJECTED = 'job="envoy",envoy_cluster_name="provider_openai_us-east",region="us-east"'


def test_provider_failing_three_consecutive_times(gateway: Gateway, rules_dir: Path) -> None:
    """The lab ejects a provider after 3 consecutive 5xx (Envoy's outlier detection counts them); the ejection
    alerts while it lasts and for 5 min after; a provider never ejected stays quiet."""
    assert gateway.cluster("provider.openai.us-east").outlier.consecutive_5xx == 3
    series = {
        f"envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx{{{EJECTED}}}": "0x10 1x20",
        f"envoy_cluster_outlier_detection_ejections_active{{{EJECTED}}}": "0x10 1 0x19",
        'envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx{job="envoy",'
        'envoy_cluster_name="provider_anthropic_global",region="us-east"}': "0x30",
        'envoy_cluster_outlier_detection_ejections_active{job="envoy",'
        'envoy_cluster_name="provider_anthropic_global",region="us-east"}': "0x30",
    }
    firing = {
        "severity": "page",
        "provider": "openai",
        "cluster": "provider.openai.us-east",
        "envoy_cluster_name": "provider_openai_us-east",
        "region": "us-east",
    }
    _run_tests(
        rules_dir,
        "provider",
        series,
        [
            _alert_test(gateway, "MeshgenProviderFailing", "9m", []),
            _alert_test(gateway, "MeshgenProviderFailing", "11m", [firing]),
            _alert_test(gateway, "MeshgenProviderFailing", "14m", [firing]),
            _alert_test(gateway, "MeshgenProviderFailing", "25m", []),
        ],
    )


@pytest.mark.parametrize(
    ("used", "stage"),
    [
        ("0.5", None),
        ("0.79", None),
        ("0.8", "80"),
        ("0.85", "80"),
        ("0.9", "90"),
        ("0.97", "90"),
        ("1", "100"),
        ("1.4", "100"),
    ],
    ids=lambda v: str(v),
)
def test_budget_stages(gateway: Gateway, rules_dir: Path, used: str, stage: str | None) -> None:
    """Exactly one stage of the tenant's `alerts_at` [0.8, 0.9, 1.0] fires: the highest one its use has reached."""
    assert gateway.tenants[0].name == "dev-team" and gateway.tenants[1].alerts_at == (0.8, 0.9, 1.0)
    series = {
        'meshgen_budget_used_ratio{job="meshgen-service",tenant="platform"}': f"{used}x5",
        'meshgen_budget_used_ratio{job="meshgen-service",tenant="research"}': "0.1x5",
    }
    firing = (
        [{"severity": "page" if stage == "100" else "ticket", "tenant": "platform", "stage": stage}] if stage else []
    )
    _run_tests(rules_dir, f"budget-{used}", series, [_alert_test(gateway, "MeshgenBudgetStage", "2m", firing)])


def test_service_down_and_estimated_accounting(gateway: Gateway, rules_dir: Path) -> None:
    series = {
        'up{job="meshgen-service",instance="svc"}': "1x5 0x10",
        'meshgen_tokens_total{tenant="platform",model="gpt-4o",type="total",count="estimated"}': "0+50x60",
        'meshgen_tokens_total{tenant="platform",model="gpt-4o",type="input",count="exact"}': "0+100x60",
        'meshgen_tokens_total{tenant="research",model="gpt-4o",type="input",count="exact"}': "0+100x60",
    }
    _run_tests(
        rules_dir,
        "service",
        series,
        [
            _alert_test(gateway, "MeshgenServiceDown", "5m", []),
            _alert_test(
                gateway, "MeshgenServiceDown", "8m", [{"severity": "page", "job": "meshgen-service", "instance": "svc"}]
            ),
            _alert_test(gateway, "MeshgenAccountingEstimated", "40m", [{"severity": "ticket", "tenant": "platform"}]),
        ],
    )


def test_hedging_that_stops_winning(gateway: Gateway, rules_dir: Path) -> None:
    """gpt-4o hedges: 1 hedge a minute sent, none won for an hour → ticket; winning 1 in 5 → quiet."""
    chain = 'envoy_cluster_upstream_rq_retry{job="envoy",envoy_cluster_name="model_gpt-4o_chain",region="us-east"}'
    wins = 'meshgen_hedge_wins_total{job="meshgen-service",model="gpt-4o",provider="anthropic"}'
    firing = [{"severity": "ticket", "model": "gpt-4o"}]
    _run_tests(
        rules_dir,
        "hedge-losing",
        {chain: "0+1x120", wins: "0x120"},
        [_alert_test(gateway, "MeshgenHedgingNotWinning", "100m", firing)],
    )
    _run_tests(
        rules_dir,
        "hedge-winning",
        {chain: "0+5x120", wins: "0+1x120"},
        [_alert_test(gateway, "MeshgenHedgingNotWinning", "100m", [])],
    )
