"""The per-request line through a running gateway (tracing off, the default): a downgrade and a wait in the
queue are told by admission to Envoy's metadata and come back with the access log; no prompt, no key."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from meshgen.compile import compile_gateway
from tests.behaviour.conftest import POLICY, Running, chat, running_gateway
from tests.support.client import Reply

BUDGET_KEY = "sk-test-budget"  # tenant budgeted: $0.007 a day, budget-model ($0.0007 a request) → cheap-model
PATIENT_KEY = "sk-test-patient"  # tenant patient: tpm 100, x-priority: low waits up to 1.5 s
PROMPT = "OKAPI-PROMPT-3141-do-not-log"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_gateway(compile_gateway(POLICY), tmp_path_factory.mktemp("requestlog")) as running:
        yield running


def _line(running: Running, request_id: str) -> dict[str, Any]:
    assert running.service is not None
    found = running.service.wait_for_line(lambda line: '"event": "request"' in line and request_id in line)
    return dict(json.loads(found))


def _ask(model: str, **extra: Any) -> dict[str, Any]:
    return chat(model, **extra) | {"messages": [{"role": "user", "content": PROMPT}]}


def test_allowed_then_downgraded_lines(gateway: Running) -> None:
    replies = [gateway.post(_ask("budget-model"), key=BUDGET_KEY) for _ in range(11)]
    assert [r.status for r in replies] == [200] * 11
    first = _line(gateway, replies[0].headers["x-request-id"])
    assert (first["decision"], first["tenant"], first["model"], first["model_served"]) == (
        "allowed",
        "budgeted",
        "budget-model",
        "budget-model",
    )
    assert first["cost_usd"] == pytest.approx(first["input_tokens"] * 100 / 1e6)
    assert first["trace_id"] is None  # tracing is off
    assert replies[-1].headers["x-meshgen-downgraded-from"] == "budget-model"
    last = _line(gateway, replies[-1].headers["x-request-id"])
    assert (last["decision"], last["reason"], last["model"], last["model_served"], last["cost_usd"]) == (
        "downgraded",
        "budget-model",
        "budget-model",
        "cheap-model",
        0.0,
    )
    assert gateway.service is not None
    log = "\n".join(gateway.service.lines)
    assert PROMPT not in log and BUDGET_KEY not in log


def test_a_held_request_is_logged_as_queued(gateway: Running) -> None:
    if time.time() % 60 > 54:  # tokens per minute reset at the minute: stay inside one
        time.sleep(60 - time.time() % 60 + 0.1)
    replies: list[Reply] = []
    slow = threading.Thread(
        target=lambda: replies.append(
            gateway.post(_ask("dev-model", max_tokens=80), key=PATIENT_KEY, headers={"x-mock": "delay_ms=400"})
        )
    )
    slow.start()
    time.sleep(0.15)
    held = gateway.post(_ask("dev-model", max_tokens=10), key=PATIENT_KEY, headers={"x-priority": "low"})
    slow.join(10)
    assert held.status == 200 and replies[0].status == 200
    line = _line(gateway, held.headers["x-request-id"])
    assert (line["decision"], line["tenant"]) == ("queued", "patient")
    assert line["queued_ms"] >= 100
    assert _line(gateway, replies[0].headers["x-request-id"])["decision"] == "allowed"
