"""Alerts seen firing in the running lab: `meshgen lab up` (us-east only, on free ports) runs Prometheus with
generated/prometheus/local/ (5 s scrape and evaluation) and Alertmanager with generated/alertmanager/local/; a budget
spent and a provider failing reach Alertmanager's API within seconds of the fault being switched on.

Needs envoy, prometheus and prometheus-alertmanager (skipped without them, failed under CI=true).
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from meshgen.lab.providers.client import MockAdmin
from tests.lab.test_lab_supervised import RunningLab, lab_policy
from tests.observability.test_grafana_queries import exported_names
from tests.support.tools import find_binary, require_binary

ALERT_TIMEOUT = 60.0
"""5 s scrape + 5 s evaluation + Alertmanager's 1 s group wait, with room for a busy machine."""


def _require_alertmanager() -> None:
    if find_binary("prometheus-alertmanager") is None:
        require_binary("alertmanager")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    """policies/lab.yaml on free ports, tenant research's daily budget cut to $0.0000035: one short gpt-4o-mini
    answer (~$0.000003) spends 80 to 90 % of it."""
    require_binary("envoy")
    require_binary("prometheus")
    _require_alertmanager()
    tmp = tmp_path_factory.mktemp("alerts")
    policy = lab_policy(tmp, (r"(usd_per_day: )20\}", r"\g<1>0.0000035}"))
    running = RunningLab(policy, tmp / "generated", tmp / "run")
    code, out = running.cli("lab", "up", str(policy), "-g", str(running.generated), "-r", "us-east")
    assert code == 0, out
    yield running
    running.cli("lab", "down")


def _chat(info: dict[str, Any], tenant: str, model: str, **extra: Any) -> tuple[int, bytes]:
    port = int(info["regions"]["us-east"]["base_url"].split(":")[2].split("/")[0])
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"authorization": f"Bearer {info['tenants'][tenant]['api_key']}", "content-type": "application/json"}
        conn.request("POST", "/v1/chat/completions", body, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _wait_alert(info: dict[str, Any], alertname: str, **labels: str) -> dict[str, Any]:
    matchers = [f'alertname="{alertname}"', *(f'{k}="{v}"' for k, v in labels.items())]
    query = urllib.parse.urlencode([("filter", m) for m in matchers])
    url = f"{info['urls']['alertmanager']}/api/v2/alerts?{query}"
    deadline = time.monotonic() + ALERT_TIMEOUT
    while time.monotonic() < deadline:
        alerts: list[dict[str, Any]] = _get(url)
        if alerts:
            return alerts[0]
        time.sleep(1)
    pending = _get(f"{info['urls']['prometheus']}/api/v1/alerts")
    raise AssertionError(f"no {matchers} in Alertmanager within {ALERT_TIMEOUT:.0f} s; Prometheus has {pending}")


def test_lab_runs_prometheus_and_alertmanager_with_the_generated_config(lab: RunningLab) -> None:
    info = lab.status()
    assert {"prometheus", "alertmanager", "alert-sink"} <= set(info["processes"])
    rules = _get(f"{info['urls']['prometheus']}/api/v1/rules")["data"]["groups"]
    assert {"meshgen.budgets", "meshgen.providers", "meshgen.slo", "meshgen.sli.gateway"} <= {g["name"] for g in rules}
    deadline = time.monotonic() + 15
    while True:  # the static targets show after Prometheus' first discovery round
        targets = _get(f"{info['urls']['prometheus']}/api/v1/targets")["data"]["activeTargets"]
        if targets or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {(t["labels"]["job"], t["labels"].get("region")) for t in targets} == {
        ("envoy", "us-east"),
        ("meshgen-service", None),
        ("lab-supervisor", None),
    }
    assert _get(f"{info['urls']['alertmanager']}/api/v2/status")["cluster"]["status"] == "disabled"


def _text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text: str = resp.read().decode()
    return text


def test_budget_spent_reaches_alertmanager(lab: RunningLab) -> None:
    info = lab.status()
    status, body = _chat(info, "research", "gpt-4o-mini", max_tokens=1)
    assert status == 200, body
    used, deadline = 0.0, time.monotonic() + 10
    while used < 0.8 and time.monotonic() < deadline:  # settled from the access log, just after the answer
        time.sleep(0.2)
        with urllib.request.urlopen(info["urls"]["service"] + "/metrics", timeout=5) as resp:
            found = re.search(r'^meshgen_budget_used_ratio\{tenant="research"\} (\S+)$', resp.read().decode(), re.M)
        used = float(found.group(1)) if found else 0.0
    assert used >= 0.8, used
    stage = max(s for s in (0.8, 0.9, 1.0) if used >= s)
    alert = _wait_alert(info, "MeshgenBudgetStage", tenant="research")
    assert alert["labels"]["stage"] == f"{stage * 100:g}"
    assert alert["labels"]["severity"] == ("page" if stage >= 1 else "ticket")
    assert alert["status"]["state"] == "active"
    deadline = time.monotonic() + ALERT_TIMEOUT
    notified: list[dict[str, Any]] = []
    while not notified and time.monotonic() < deadline:  # Alertmanager's 1 s group wait in the lab
        notified = [
            n
            for n in _get(f"{info['urls']['alert_sink']}/notifications")
            if any(a["labels"].get("alertname") == "MeshgenBudgetStage" for a in n["alerts"])
        ]
        time.sleep(0.5)
    assert notified, "the lab's webhook receiver got no MeshgenBudgetStage notification"
    assert notified[0]["receiver"] == alert["labels"]["severity"] and notified[0]["status"] == "firing"


def test_provider_failing_three_times_reaches_alertmanager(lab: RunningLab) -> None:
    """openai answers 503 (the mocks' global fault): 3 consecutive 5xx eject it in us-east's Envoy."""
    info = lab.status()
    admin = MockAdmin(info["urls"]["mocks_admin"])
    admin.fault("provider.openai.*", "status=503")
    try:
        for _ in range(6):
            _chat(info, "platform", "gpt-4o-mini")
        alert = _wait_alert(info, "MeshgenProviderFailing", cluster="provider.openai.us-east")
    finally:
        admin.clear_faults()
    assert alert["labels"]["region"] == "us-east" and alert["labels"]["severity"] == "page"
    assert "failed 3 consecutive times" in alert["annotations"]["summary"]


def test_every_metric_the_rules_select_is_exported(lab: RunningLab) -> None:
    """(Last: Envoy makes some stats on a cluster's first answer.) Each metric name in a generated rule (recording
    rules' own `a:b:c` names aside) is one some process of the running lab exports: its Envoy's
    /stats/prometheus, the service's /metrics, or Prometheus' own `up`."""
    rules = yaml.safe_load((lab.generated / "prometheus" / "rules" / "alerts.yml").read_text())["groups"]
    rules += yaml.safe_load((lab.generated / "prometheus" / "rules" / "sli.yml").read_text())["groups"]
    selected = {
        name
        for group in rules
        for rule in group["rules"]
        for name in re.findall(r"([A-Za-z_:][\w:]*)\s*[{\[]", rule["expr"])
        if ":" not in name
    }
    info = lab.status()
    exported = {"up"} | exported_names(_text(info["regions"]["us-east"]["admin_url"] + "/stats/prometheus"))
    exported |= exported_names(_text(info["urls"]["service"] + "/metrics"))
    assert selected - exported == set(), sorted(selected - exported)
    assert len(selected) > 15
