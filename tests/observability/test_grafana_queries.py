"""Every PromQL expression in a dashboard parses (promtool, and the lab's real Prometheus) and selects only metrics
that some running component exports: the lab on free ports gets a JSON request, a stream and a refusal, then each
process's metrics endpoint is read (every Envoy's admin /stats/prometheus, the data-plane service's /metrics, the
lab supervisor's /metrics; the mock providers export none) and every metric name in the dashboards must be there."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lab.test_lab_supervised import RunningLab, lab_policy
from tests.observability.grafana_kit import (
    GENERATED,
    dashboard_files,
    expressions,
    interpolate,
    label,
    metric_names,
)
from tests.support import require_binary

DASHBOARDS = dashboard_files()
TIMEOUT = 30.0


def _all_expressions() -> dict[str, set[str]]:
    """Interpolated expression → the dashboards (and panels) that use it."""
    found: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        for title, expr in expressions(json.loads(path.read_text())):
            found.setdefault(interpolate(expr), set()).add(f"{label(path)}: {title}")
    return found


EXPRESSIONS = _all_expressions()
GENERATED_EXPRESSIONS = sorted(
    {
        interpolate(e)
        for p in GENERATED.glob("grafana/dashboards/*.json")
        for _, e in expressions(json.loads(p.read_text()))
    }
)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum(rate(a_total{x=~"y|z"}[1m])) / sum(rate(b_total[1m]))', {"a_total", "b_total"}),
        ('histogram_quantile(0.95, sum by (le, tenant) (rate(h_bucket{tenant=~".*"}[1m])))', {"h_bucket"}),
        ("max(meshgen_ledger_degraded)", {"meshgen_ledger_degraded"}),
        ('1 - (sum(increase(a{le="1000"}[30d])) / sum(increase(b[30d]))) / 0.005', {"a", "b"}),
        ("sum by (model) (rate(c[1m])) * 3600", {"c"}),
    ],
    ids=["ratio", "quantile", "bare", "budget", "scaled"],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_no_grafana_variable_is_left_unreplaced() -> None:
    assert EXPRESSIONS
    assert not [e for e in EXPRESSIONS if "$" in e]


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    """One recording rule per expression; `promtool check rules` parses each with Prometheus's own parser."""
    promtool = require_binary("promtool")
    exprs = sorted(EXPRESSIONS)
    rules = {
        "groups": [
            {"name": "grafana", "rules": [{"record": f"grafana:expr{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout, result.stdout


# ---- against a running lab ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    require_binary("envoy")
    tmp = tmp_path_factory.mktemp("grafana-lab")
    running = RunningLab(lab_policy(tmp), tmp / "generated", tmp / "run")
    code, out = running.up()
    assert code == 0, out
    try:
        _traffic(running)
        yield running
    finally:
        running.cli("lab", "down")


def _post(port: int, key: str, body: dict[str, Any]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _traffic(lab: RunningLab) -> None:
    """A JSON answer, a stream and a refusal, so the lazily created series exist."""
    info = lab.status()
    port = int(urllib.parse.urlsplit(info["regions"]["us-east"]["base_url"]).port or 0)
    messages = [{"role": "user", "content": "hi"}]
    platform, dev = info["tenants"]["platform"]["api_key"], info["tenants"]["dev-team"]["api_key"]
    assert _post(port, platform, {"model": "gpt-4o-mini", "messages": messages}) == 200
    assert _post(port, platform, {"model": "gpt-4o", "messages": messages, "stream": True}) == 200
    assert _post(port, dev, {"model": "gpt-4o", "messages": messages}) == 403


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        text: str = response.read().decode()
        return text


_SUFFIXES = {"counter": ("",), "gauge": ("",), "untyped": ("",), "summary": ("", "_sum", "_count")}
_SUFFIXES["histogram"] = ("_bucket", "_sum", "_count")


def exported_names(text: str) -> set[str]:
    """Metric names in a text exposition: every sample's, and every declared family's (`# TYPE`), so a counter
    whose labelled series appear only once its event happens (a downgrade, a budget stage) still counts."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names.update(family + suffix for suffix in _SUFFIXES.get(kind.strip(), ("",)))
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


@pytest.fixture(scope="module")
def exported(lab: RunningLab) -> dict[str, set[str]]:
    """Metric names by process, read from each process's own metrics endpoint."""
    info = lab.status()
    found = {
        f"envoy-{r}": exported_names(_get(v["admin_url"] + "/stats/prometheus")) for r, v in info["regions"].items()
    }
    found["service"] = exported_names(_get(info["urls"]["service"] + "/metrics"))
    found["supervisor"] = exported_names(_get(info["supervisor"]["metrics_url"]))
    return found


def test_mock_providers_export_no_metrics(lab: RunningLab) -> None:
    with pytest.raises(urllib.error.HTTPError) as raised:
        _get(lab.status()["urls"]["mocks_admin"] + "/metrics")
    with raised.value as error:
        assert error.code == 404


def test_every_metric_in_a_dashboard_is_exported(exported: dict[str, set[str]]) -> None:
    every = set().union(*exported.values())
    assert {"envoy_http_downstream_rq_xx", "meshgen_tokens_total", "meshgen_ttft_seconds_bucket"} <= every
    used: dict[str, set[str]] = {}
    for expr, where in EXPRESSIONS.items():
        for name in metric_names(expr):
            used.setdefault(name, set()).update(where)
    assert used
    missing = {name: sorted(where)[:3] for name, where in used.items() if name not in every}
    assert not missing, f"metrics no lab process exports: {missing}"


def _query(prometheus: str, expr: str) -> dict[str, Any]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        body: dict[str, Any] = json.loads(_get(url))
    except urllib.error.HTTPError as error:
        with error:
            body = json.loads(error.read().decode())
    return body


def _lab_prometheus(lab: RunningLab) -> str:
    url: str | None = lab.status()["urls"].get("prometheus")
    if url is None:
        require_binary("prometheus")  # not installed: skip (fail in CI)
        pytest.fail("prometheus is installed but the lab runs without it")
    return url


def test_every_expression_runs_on_the_labs_prometheus(lab: RunningLab) -> None:
    """The lab's real Prometheus evaluates each expression of generated/grafana/ (parse and type errors fail)."""
    prometheus = _lab_prometheus(lab)
    failed = {}
    for expr in GENERATED_EXPRESSIONS:
        answer = _query(prometheus, expr)
        if answer.get("status") != "success":
            failed[expr] = answer.get("error")
    assert not failed, failed


def test_panels_show_the_labs_traffic(lab: RunningLab) -> None:
    """After the scrapes, the overview's traffic, tokens and provider panels hold data from the lab's requests."""
    prometheus = _lab_prometheus(lab)
    overview = json.loads((GENERATED / "grafana/dashboards/meshgen-overview.json").read_text())
    by_title = {title: interpolate(expr) for title, expr in expressions(overview)}
    wanted = ["Requests by status class", "Tokens per tenant", "Requests per provider cluster"]
    deadline = time.monotonic() + 60
    empty = wanted
    while empty and time.monotonic() < deadline:
        # rate() needs two scrapes (5 s apart in the lab) inside its window
        empty = [t for t in wanted if not _query(prometheus, by_title[t].replace("[1m]", "[5m]"))["data"]["result"]]
        if empty:
            time.sleep(2)
    assert not empty, f"panels with no data: {empty}"
