"""Budgets through the real path: Envoy's ext_authz asks the service, which reserves against the tenant's daily USD
budget, emits each 80/90/100 % stage once, re-routes to the downgrade model once the budget is spent, and holds
low-priority requests while the tenant is over its tokens per minute."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.behaviour.conftest import Running, chat
from tests.support.client import Reply

BUDGET_KEY = "sk-test-budget"  # tenant budgeted: $0.007 a day, budget-model ($0.0007 a request) → cheap-model
PATIENT_KEY = "sk-test-patient"  # tenant patient: tpm 100, x-priority: low waits up to 1.5 s
IMPATIENT_KEY = "sk-test-impatient"  # tenant impatient: tpm 100, x-priority: low waits up to 0.4 s
LOW = {"x-priority": "low"}


def metrics(lab: Running) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert lab.service is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{lab.service.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(lab: Running, name: str, **labels: str) -> float:
    return metrics(lab).get((name, frozenset(labels.items())), 0.0)


def alerts(lab: Running, tenant: str) -> dict[str, float]:
    every = metrics(lab)
    return {
        stage: every.get(("meshgen_budget_alerts_total", frozenset({"tenant": tenant, "stage": stage}.items())), 0.0)
        for stage in ("0.8", "0.9", "1")
    }


def logged(lab: Running, event: str, tenant: str) -> list[dict[str, Any]]:
    assert lab.service is not None
    found = []
    for line in list(lab.service.lines):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == event and doc.get("tenant") == tenant:
            found.append(doc)
    return found


def test_each_budget_stage_is_alerted_once_then_the_downgrade_serves(lab: Running) -> None:
    stages: list[dict[str, float]] = []
    for _ in range(10):
        reply = lab.post(chat("budget-model"), key=BUDGET_KEY)
        assert reply.status == 200, reply.body
        assert reply.headers["x-served-by"] == "provider.pricey.us-east.ep0"
        assert "x-meshgen-downgraded-from" not in reply.headers
        stages.append(alerts(lab, "budgeted"))
    # requests 8, 9 and 10 bring the day's spend to 80, 90 and 100 % of $0.007
    assert stages[6] == {"0.8": 0, "0.9": 0, "1": 0}
    assert stages[7] == {"0.8": 1, "0.9": 0, "1": 0}
    assert stages[8] == {"0.8": 1, "0.9": 1, "1": 0}
    assert stages[9] == {"0.8": 1, "0.9": 1, "1": 1}
    events = logged(lab, "budget_alert", "budgeted")
    assert [(e["stage"], e["used_ratio"], e["limit"], e["budget"]) for e in events] == [
        (0.8, 0.8, 0.007, "usd_per_day"),
        (0.9, 0.9, 0.007, "usd_per_day"),
        (1.0, 1.0, 0.007, "usd_per_day"),
    ]
    assert metric(lab, "meshgen_budget_used_ratio", tenant="budgeted") == 1.0

    # The budget is spent: the next request is re-routed to the downgrade, on another provider.
    reply = lab.post(chat("budget-model"), key=BUDGET_KEY)
    assert reply.status == 200, reply.body
    assert reply.headers["x-served-by"] == "provider.thrifty.us-east.ep0"
    assert reply.headers["x-meshgen-downgraded-from"] == "budget-model"
    upstream = lab.upstream.requests()[-1]
    assert "x-meshgen-route" not in upstream.headers  # the route header stays inside the gateway
    assert metric(lab, "meshgen_downgrades_total", tenant="budgeted", model="budget-model") == 1
    assert alerts(lab, "budgeted") == {"0.8": 1, "0.9": 1, "1": 1}  # still once each
    assert len(logged(lab, "budget_alert", "budgeted")) == 3


def _away_from_a_minute_boundary() -> None:
    """Tokens per minute reset when the minute rolls over; keep a test's few seconds inside one minute."""
    if time.time() % 60 > 54:
        time.sleep(60 - time.time() % 60 + 0.1)


def _in_thread(
    lab: Running, key: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[threading.Thread, list[Reply]]:
    replies: list[Reply] = []
    thread = threading.Thread(target=lambda: replies.append(lab.post(body, key=key, headers=headers)))
    thread.start()
    return thread, replies


def test_a_low_priority_request_waits_and_is_served_when_tokens_free(lab: Running) -> None:
    _away_from_a_minute_boundary()
    # 87 of the 100 tokens per minute reserved until this answer (400 ms) is settled with its usage (10)
    slow, slow_reply = _in_thread(lab, PATIENT_KEY, chat("dev-model", max_tokens=80), {"x-mock": "delay_ms=400"})
    time.sleep(0.15)
    started = time.monotonic()
    reply = lab.post(chat("dev-model", max_tokens=10), key=PATIENT_KEY, headers=LOW)  # 17 more: held
    waited = time.monotonic() - started
    slow.join(10)
    assert slow_reply[0].status == 200
    assert reply.status == 200, reply.body
    assert 0.2 < waited < 1.5, waited
    assert metric(lab, "meshgen_queue_wait_seconds_count", tenant="patient") == 1
    assert metric(lab, "meshgen_queue_depth", tenant="patient") == 0
    assert metric(lab, "meshgen_refusals_total", tenant="patient", reason="tpm") == 0


def test_a_low_priority_request_is_refused_after_its_longest_wait(lab: Running) -> None:
    _away_from_a_minute_boundary()
    slow, slow_reply = _in_thread(lab, IMPATIENT_KEY, chat("dev-model", max_tokens=80), {"x-mock": "delay_ms=1500"})
    time.sleep(0.15)
    started = time.monotonic()
    reply = lab.post(chat("dev-model", max_tokens=10), key=IMPATIENT_KEY, headers=LOW)
    waited = time.monotonic() - started
    assert reply.status == 429, reply.body
    assert 0.4 <= waited < 1.2, waited
    error = reply.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in error["message"] and "Waited" in error["message"]
    assert "retry-after" in reply.headers
    assert metric(lab, "meshgen_refusals_total", tenant="impatient", reason="queue_timeout") == 1
    # a critical request over the limit is refused at once
    started = time.monotonic()
    assert lab.post(chat("dev-model", max_tokens=10), key=IMPATIENT_KEY).status == 429
    assert time.monotonic() - started < 0.3
    slow.join(10)
    assert slow_reply[0].status == 200


def _saturate(lab: Running, key: str, tenant: str, retry_after: int) -> None:
    """The provider of dev-model answers one request 429 with Retry-After; return once the service has read that
    request's access-log entry (its request line is logged after the queue saw it)."""
    before = len([d for d in logged(lab, "request", tenant) if d["status"] == 429])
    mock = f"status=429;retry_after={retry_after}"
    assert lab.post(chat("dev-model", max_tokens=10), key=key, headers={"x-mock": mock}).status == 429
    deadline = time.monotonic() + 5
    while len([d for d in logged(lab, "request", tenant) if d["status"] == 429]) == before:
        assert time.monotonic() < deadline, "the provider's 429 never reached the service's access log"
        time.sleep(0.02)


def test_a_low_priority_request_waits_out_a_saturated_provider_then_is_served(lab: Running) -> None:
    _away_from_a_minute_boundary()
    waits = metric(lab, "meshgen_queue_wait_seconds_count", tenant="patient")
    _saturate(lab, PATIENT_KEY, "patient", retry_after=1)
    started = time.monotonic()
    assert lab.post(chat("dev-model", max_tokens=10), key=PATIENT_KEY).status == 200  # critical: never held
    assert time.monotonic() - started < 0.3
    started = time.monotonic()
    reply = lab.post(chat("dev-model", max_tokens=10), key=PATIENT_KEY, headers=LOW)
    waited = time.monotonic() - started
    assert reply.status == 200, reply.body
    assert 0.3 < waited < 1.5, waited
    assert metric(lab, "meshgen_queue_wait_seconds_count", tenant="patient") == waits + 1


def test_a_low_priority_request_gets_503_when_the_provider_stays_saturated(lab: Running) -> None:
    _saturate(lab, IMPATIENT_KEY, "impatient", retry_after=5)
    started = time.monotonic()
    reply = lab.post(chat("dev-model", max_tokens=10), key=IMPATIENT_KEY, headers=LOW)
    waited = time.monotonic() - started
    assert reply.status == 503, reply.body
    assert 0.4 <= waited < 1.2, waited
    assert reply.json()["error"]["code"] == "provider_saturated"
    assert 1 <= int(reply.headers["retry-after"]) <= 5
    assert metric(lab, "meshgen_refusals_total", tenant="impatient", reason="provider_saturated") == 1
