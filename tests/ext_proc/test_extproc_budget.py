"""Budget stages, downgrade, the queue of non-critical requests and /metrics — on a real SQLite ledger, a fake clock.

Prices make every request count the same: "hi" in one message is 7 prompt tokens by the tokenizer (and by the mock
provider's usage), output is free, `big` costs $100 per million input tokens — $0.0007 a request — and tenant
`spender` has $0.007 a day: ten requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ext_proc.accesslog import UsageRecord
from ext_proc.config import ServiceConfig
from ext_proc.errors import BudgetExceeded, LimitExceeded
from ext_proc.ledger import Ledger, Reserved
from ext_proc.main import stream_settle
from ext_proc.metrics import Metrics
from ext_proc.queueing import HoldQueue
from ext_proc.server import Server
from ext_proc.store.base import DAY_S, Limit
from ext_proc.store.sqlite import SqliteStore
from tests.ext_proc.kit import capture_log, sha256_hex
from tests.support import free_ports

DAY0 = 19_675 * DAY_S
T = DAY0 + 3600 + 15.5  # 15.5 s into a minute: no test here lasts until the minute rolls over
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
KEYS = {"spender": "sk-spender", "counter": "sk-counter", "patient": "sk-patient", "plain": "sk-plain"}


def config(**service: Any) -> ServiceConfig:
    def tenant(name: str, models: list[str], **extra: Any) -> dict[str, Any]:
        return {"key_hashes": [sha256_hex(KEYS[name])], "models": models, "alerts_at": [0.8, 0.9, 1.0], **extra}

    priced = {"input_per_mtok": 100.0, "output_per_mtok": 0.0}
    return ServiceConfig.model_validate(
        {
            "schema_version": 1,
            "policy": "budgets",
            "failure_mode": "closed",
            "models": {
                "big": {
                    "provider": "a",
                    "upstream_name": "big-v1",
                    "downgrade": "small",
                    "max_tokens_default": 9,
                    "price": priced,
                },
                "small": {"provider": "b", "upstream_name": "small-v1", "max_tokens_default": 9},
                "solo": {"provider": "a", "upstream_name": "solo", "max_tokens_default": 9, "price": priced},
            },
            "tenants": {
                # may ask for big and solo; small only as big's downgrade
                "spender": tenant("spender", ["big", "solo"], limits={"usd_per_day": 0.007}),
                "counter": tenant("counter", ["big"], limits={"tpd": 120}),  # 12 tokens a request
                "patient": tenant(
                    "patient",
                    ["small"],
                    limits={"tpm": 20},
                    non_critical={"header": "x-priority", "value": "low", "queue_max_wait_ms": 400},
                ),
                "plain": tenant("plain", ["small"]),
            },
            **service,
        }
    )


class Clock:
    def __init__(self, now: float = T) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(tmp_path: Path, scenario: Callable[[Callable[..., Ledger]], Awaitable[None]]) -> None:
    """`scenario(make)`: make(clock=..., cfg=...) opens a Ledger on the test's one SQLite file."""

    async def main() -> None:
        stores: list[SqliteStore] = []

        def make(
            clock: Clock | None = None, cfg: ServiceConfig | None = None, log: logging.Logger | None = None
        ) -> Ledger:
            store = SqliteStore.open(tmp_path / "ledger.sqlite")
            stores.append(store)
            return Ledger(cfg or config(), store, clock=clock or Clock(), logger=log)

        try:
            await scenario(make)
        finally:
            for store in stores:
                await store.close()

    asyncio.run(main())


def alerts(ledger: Ledger, tenant: str) -> dict[str, float]:
    sample = ledger.metrics.registry.get_sample_value
    return {
        stage: sample("meshgen_budget_alerts_total", {"tenant": tenant, "stage": stage}) or 0.0
        for stage in ("0.8", "0.9", "1")
    }


def ask(model: str) -> dict[str, Any]:
    return {"model": model, **HI}


# ---- stages -----------------------------------------------------------------------------------------------------


def test_each_stage_is_emitted_once_as_the_usd_budget_fills(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        log, lines = capture_log()
        ledger = make(log=log)
        for _ in range(7):
            await ledger.reserve("spender", "big", ask("big"))
        assert alerts(ledger, "spender") == {"0.8": 0, "0.9": 0, "1": 0}
        assert ledger.metrics.registry.get_sample_value("meshgen_budget_used_ratio", {"tenant": "spender"}) == (
            pytest.approx(0.7)
        )
        expected = [{"0.8": 1, "0.9": 0, "1": 0}, {"0.8": 1, "0.9": 1, "1": 0}, {"0.8": 1, "0.9": 1, "1": 1}]
        for want in expected:
            await ledger.reserve("spender", "big", ask("big"))
            assert alerts(ledger, "spender") == want
        events = lines.of("budget_alert")
        assert [(e["tenant"], e["stage"], e["used_ratio"], e["limit"]) for e in events] == [
            ("spender", 0.8, 0.8, 0.007),
            ("spender", 0.9, 0.9, 0.007),
            ("spender", 1.0, 1.0, 0.007),
        ]
        assert {e["budget"] for e in events} == {"usd_per_day"}
        # past 100 %: downgraded requests (free) keep the ratio at 1.0; nothing is emitted again
        for _ in range(3):
            await ledger.reserve("spender", "big", ask("big"))
        assert alerts(ledger, "spender") == {"0.8": 1, "0.9": 1, "1": 1}
        assert len(lines.of("budget_alert")) == 3

    run(tmp_path, scenario)


def test_stages_crossed_at_once_are_each_emitted(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        ledger = make()
        reserved = await ledger.reserve("spender", "big", ask("big"))
        # the provider reports far more prompt than estimated: the settle carries the tenant to 100 %
        await ledger.settle(UsageRecord(reserved.reservation, "spender", "big", "big-v1", 70, 3, 200, True))
        assert alerts(ledger, "spender") == {"0.8": 1, "0.9": 1, "1": 1}
        tokens = ledger.metrics.registry.get_sample_value
        labels = {"tenant": "spender", "model": "big", "count": "exact"}
        assert tokens("meshgen_tokens_total", {**labels, "type": "input"}) == 70
        assert tokens("meshgen_tokens_total", {**labels, "type": "output"}) == 3
        assert tokens("meshgen_cost_usd_total", labels) == pytest.approx(0.007)
        assert tokens("meshgen_settled_requests_total", labels) == 1

    run(tmp_path, scenario)


def test_replicas_share_the_once(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        a, b = make(), make()  # two processes' ledgers on one store
        for _ in range(8):
            await a.reserve("spender", "big", ask("big"))
        await b.reserve("spender", "big", ask("big"))  # b sees 0.9: it emits 0.9, and 0.8 is a's
        assert alerts(a, "spender") == {"0.8": 1, "0.9": 0, "1": 0}
        assert alerts(b, "spender") == {"0.8": 0, "0.9": 1, "1": 0}
        await a.reserve("spender", "big", ask("big"))  # a sees 1.0: 0.9 was b's
        assert alerts(a, "spender") == {"0.8": 1, "0.9": 0, "1": 1}

    run(tmp_path, scenario)


def test_a_new_day_has_its_stages_again(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        clock = Clock()
        ledger = make(clock=clock)
        for _ in range(8):
            await ledger.reserve("spender", "big", ask("big"))
        clock.now += DAY_S
        for _ in range(8):
            await ledger.reserve("spender", "big", ask("big"))
        assert alerts(ledger, "spender")["0.8"] == 2

    run(tmp_path, scenario)


def test_tokens_per_day_is_the_budget_without_usd(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        log, lines = capture_log()
        ledger = make(log=log)
        for _ in range(8):  # 7 prompt + 5 max_tokens = 12 tokens of 120
            await ledger.reserve("counter", "big", ask("big"))
        assert [(e["stage"], e["budget"], e["limit"]) for e in lines.of("budget_alert")] == [(0.8, "tpd", 120)]

    run(tmp_path, scenario)


def test_no_budget_no_stages(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        ledger = make()
        await ledger.reserve("plain", "small", ask("small"))
        assert not ledger.alerts.has_budget("plain")
        assert ledger.metrics.registry.get_sample_value("meshgen_budget_used_ratio", {"tenant": "plain"}) is None

    run(tmp_path, scenario)


# ---- the webhook ------------------------------------------------------------------------------------------------


@contextmanager
def webhook(status: int = 204) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    finally:
        server.shutdown()
        server.server_close()


def test_the_webhook_gets_each_alert(tmp_path: Path) -> None:
    with webhook() as (url, received):

        async def scenario(make: Callable[..., Ledger]) -> None:
            ledger = make(cfg=config(alert_webhook=url))
            for _ in range(10):
                await ledger.reserve("spender", "big", ask("big"))
            await ledger.alerts.drain()
            # Each POST goes out on its own worker thread: they may arrive in any order.
            assert sorted((r["event"], r["tenant"], r["stage"]) for r in received) == [
                ("budget_alert", "spender", 0.8),
                ("budget_alert", "spender", 0.9),
                ("budget_alert", "spender", 1.0),
            ]
            assert ledger.metrics.registry.get_sample_value("meshgen_alert_webhook_failures_total") == 0

        run(tmp_path, scenario)


@pytest.mark.parametrize("where", ["nobody listens", "answers 500"])
def test_a_failing_webhook_is_counted_not_raised(tmp_path: Path, where: str) -> None:
    with webhook(500) as (url, _):
        if where == "nobody listens":
            url = f"http://127.0.0.1:{free_ports(1)[0]}/alerts"

        async def scenario(make: Callable[..., Ledger]) -> None:
            log, lines = capture_log()
            ledger = make(cfg=config(alert_webhook=url), log=log)
            for _ in range(8):
                assert isinstance(await ledger.reserve("spender", "big", ask("big")), Reserved)
            await ledger.alerts.drain()
            assert ledger.metrics.registry.get_sample_value("meshgen_alert_webhook_failures_total") == 1
            assert len(lines.of("alert_webhook_failed")) == 1

        run(tmp_path, scenario)


# ---- downgrade --------------------------------------------------------------------------------------------------


def test_a_spent_budget_moves_the_request_to_the_downgrade(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        ledger = make()
        for _ in range(10):
            assert (await ledger.reserve("spender", "big", ask("big"))).downgraded_from is None
        reserved = await ledger.reserve("spender", "big", ask("big"))
        # `small` is not among spender's models: the downgrade is the operator's policy
        assert (reserved.model, reserved.downgraded_from) == ("small", "big")
        assert reserved.verdict.used[Limit.USD_PER_DAY] == pytest.approx(0.007)
        sample = ledger.metrics.registry.get_sample_value
        assert sample("meshgen_downgrades_total", {"tenant": "spender", "model": "big"}) == 1

    run(tmp_path, scenario)


def test_without_a_downgrade_a_spent_budget_refuses(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        ledger = make()
        for _ in range(10):
            await ledger.reserve("spender", "solo", ask("solo"))
        with pytest.raises(BudgetExceeded) as refused:
            await ledger.reserve("spender", "solo", ask("solo"))
        assert refused.value.code == "insufficient_quota" and refused.value.limit == "usd_per_day"

    run(tmp_path, scenario)


def test_a_downgrade_that_does_not_fit_either_refuses(tmp_path: Path) -> None:
    doc = config().model_dump(mode="json")
    doc["models"]["small"]["price"] = {"input_per_mtok": 10.0, "output_per_mtok": 0.0}

    async def scenario(make: Callable[..., Ledger]) -> None:
        ledger = make(cfg=ServiceConfig.model_validate(doc))
        for _ in range(10):
            await ledger.reserve("spender", "big", ask("big"))
        with pytest.raises(BudgetExceeded) as refused:
            await ledger.reserve("spender", "big", ask("big"))
        assert refused.value.model == "big"

    run(tmp_path, scenario)


# ---- the queue of non-critical requests, through the HTTP server --------------------------------------------------


def authz(tenant: str, model: str, *, low: bool, max_tokens: int = 5) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})
    lines = [
        "POST /authz/v1/chat/completions HTTP/1.1",
        "host: ext-authz",
        "content-type: application/json",
        f"authorization: Bearer {KEYS[tenant]}",
        f"content-length: {len(body)}",
    ]
    if low:
        lines.append("X-Priority: low")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        body = await reader.readexactly(int(headers["content-length"]))
        return int(head[0].split()[1]), headers, body
    finally:
        writer.close()


def serve(tmp_path: Path, scenario: Callable[[Server, Ledger, int], Awaitable[None]], *, max_waiting: int = 64) -> None:
    async def main(make: Callable[..., Ledger]) -> None:
        ledger = make()
        server = Server(ledger._config, ledger=ledger)
        server.queue.max_waiting = max_waiting
        _, port = await server.start("127.0.0.1", 0)
        try:
            await scenario(server, ledger, port)
        finally:
            await server.close()

    run(tmp_path, main)


def test_a_held_request_is_served_when_capacity_frees(tmp_path: Path) -> None:
    async def scenario(server: Server, ledger: Ledger, port: int) -> None:
        status, headers, _ = await exchange(port, authz("patient", "small", low=False, max_tokens=8))  # 15 of 20
        assert status == 200
        held = asyncio.ensure_future(exchange(port, authz("patient", "small", low=True)))  # 12 more: held
        await asyncio.sleep(0.1)
        assert not held.done() and server.queue.waiting("patient") == 1
        sample = ledger.metrics.registry.get_sample_value
        assert sample("meshgen_queue_depth", {"tenant": "patient"}) == 1
        first = headers["x-meshgen-reservation"]
        await ledger.settle(UsageRecord(first, "patient", "small", "small-v1", 4, 1, 200, True))  # 15 → 5
        status, _, _ = await held
        assert status == 200
        assert sample("meshgen_queue_depth", {"tenant": "patient"}) == 0
        assert sample("meshgen_queue_wait_seconds_count", {"tenant": "patient"}) == 1

    serve(tmp_path, scenario)


def test_a_held_request_is_refused_after_the_longest_wait(tmp_path: Path) -> None:
    async def scenario(server: Server, ledger: Ledger, port: int) -> None:
        assert (await exchange(port, authz("patient", "small", low=False, max_tokens=8)))[0] == 200
        started = time.monotonic()
        status, headers, body = await exchange(port, authz("patient", "small", low=True))
        waited = time.monotonic() - started
        assert status == 429 and 0.4 <= waited < 1.5
        assert "retry-after" in headers and "Waited" in json.loads(body)["error"]["message"]
        sample = ledger.metrics.registry.get_sample_value
        assert sample("meshgen_refusals_total", {"tenant": "patient", "reason": "queue_timeout"}) == 1

    serve(tmp_path, scenario)


def test_a_critical_request_is_refused_at_once(tmp_path: Path) -> None:
    async def scenario(server: Server, ledger: Ledger, port: int) -> None:
        assert (await exchange(port, authz("patient", "small", low=False, max_tokens=8)))[0] == 200
        started = time.monotonic()
        assert (await exchange(port, authz("patient", "small", low=False)))[0] == 429
        assert time.monotonic() - started < 0.2
        sample = ledger.metrics.registry.get_sample_value
        assert sample("meshgen_refusals_total", {"tenant": "patient", "reason": "tpm"}) == 1

    serve(tmp_path, scenario)


def test_a_full_queue_refuses_at_once(tmp_path: Path) -> None:
    async def scenario(server: Server, ledger: Ledger, port: int) -> None:
        assert (await exchange(port, authz("patient", "small", low=False, max_tokens=8)))[0] == 200
        held = asyncio.ensure_future(exchange(port, authz("patient", "small", low=True)))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        status, _, body = await exchange(port, authz("patient", "small", low=True))
        assert status == 429 and time.monotonic() - started < 0.2
        assert "queue of non-critical requests is full" in json.loads(body)["error"]["message"]
        sample = ledger.metrics.registry.get_sample_value
        assert sample("meshgen_refusals_total", {"tenant": "patient", "reason": "queue_full"}) == 1
        assert (await held)[0] == 429

    serve(tmp_path, scenario, max_waiting=1)


def test_the_downgrade_answer_routes_and_names_the_model_asked_for(tmp_path: Path) -> None:
    async def scenario(server: Server, ledger: Ledger, port: int) -> None:
        for _ in range(10):
            status, headers, _ = await exchange(port, authz("spender", "big", low=False))
            assert status == 200 and "x-meshgen-route" not in headers
        status, headers, _ = await exchange(port, authz("spender", "big", low=False))
        assert status == 200
        assert headers["x-meshgen-route"] == "small"
        assert headers["x-meshgen-downgraded-from"] == "big"
        assert headers["x-meshgen-tenant"] == "spender" and headers["x-meshgen-reservation"]

    serve(tmp_path, scenario)


# ---- /metrics ---------------------------------------------------------------------------------------------------


def test_metrics_are_served_with_config_labels_only(tmp_path: Path) -> None:
    async def scenario(server: Server, ledger: Ledger, port: int) -> None:
        bad_key = authz("plain", "small", low=False).replace(KEYS["plain"].encode(), b"sk-nobody!")
        assert (await exchange(port, bad_key))[0] == 401
        status, headers, body = await exchange(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        text = body.decode()
        assert 'meshgen_refusals_total{reason="invalid_api_key",tenant="other"} 1.0' in text
        assert "sk-nobody" not in text
        assert (await exchange(port, b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"))[0] == 405

    serve(tmp_path, scenario)


def test_every_server_has_its_own_registry(tmp_path: Path) -> None:
    a, b = Server(config()), Server(config())
    a.metrics.refused("spender", "tpm")
    assert b.metrics.registry.get_sample_value("meshgen_refusals_total", {"tenant": "spender", "reason": "tpm"}) is None


def test_unknown_refusal_exists_for_limit_exceeded_defaults() -> None:
    err = LimitExceeded("x", tenant="t", limit="tpm")
    assert (err.limit, err.reason) == ("tpm", "tpm")
    assert LimitExceeded().reason == "rate_limit_exceeded"


def test_streams_ending_together_settle_in_one_ledger_call_each_with_its_own_count(tmp_path: Path) -> None:
    async def scenario(make: Callable[..., Ledger]) -> None:
        ledger = make()
        calls: list[int] = []
        settle_many = ledger.settle_many

        async def counted(usages: Any) -> Any:
            calls.append(len(usages))
            return await settle_many(usages)

        ledger.settle_many = counted  # type: ignore[method-assign]
        reserved = [await ledger.reserve("counter", "big", ask("big")) for _ in range(3)]
        settle = stream_settle(ledger)
        results = await asyncio.gather(
            *(settle(r.reservation, None, 1, n, False) for n, r in enumerate(reserved, start=1)),
            settle("no-such-reservation", None, 1, 1, False),
        )
        assert calls == [4]
        assert [(s.cost.tokens if s else None) for s in results] == [2, 3, 4, None]  # type: ignore[attr-defined]
        assert (await ledger._store.used("counter", T))[Limit.TPD] == 2 + 3 + 4  # each its own count, no estimate

    run(tmp_path, scenario)


def test_only_a_provider_out_of_room_is_saturated_and_only_for_its_retry_after() -> None:
    cfg = config()
    clock = Clock()
    queue = HoldQueue(cfg, Metrics(cfg), clock=clock)

    def entry(status: int, **extra: Any) -> UsageRecord:
        return UsageRecord("r", "patient", "small", None, 0, 0, status, False, **extra)

    queue.saw([entry(503), entry(429), entry(500, served_by="b"), entry(200, served_by="b")])
    assert queue.saturated_for("small") == 0  # Envoy's own answers, and answers that are not "no room"
    queue.saw([entry(503, overflow=True)])  # Envoy's circuit breaker to the model's provider overflowed
    assert queue.saturated_for("small") == pytest.approx(1.0)
    queue.saw([entry(429, served_by="b", retry_after_s=7.0), entry(529, served_by="a")])
    assert (queue.saturated_for("small"), queue.saturated_for("big")) == (pytest.approx(7.0), pytest.approx(1.0))
    clock.now += 7.5
    assert (queue.saturated_for("small"), queue.saturated_for("big")) == (0, 0)
