"""Circuit breaking with recovery: a provider that fails is ejected (its traffic fails over, no client sees an
error), and once it is healthy again it gets traffic back within its ejection time plus one detection interval."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from meshgen.compile import compile_gateway
from meshgen.ir.model import Gateway, Outlier
from tests.behaviour.conftest import POLICY, Running, chat, running_gateway

PRIMARY = "provider.primary.us-east.ep0"
BACKUP = "provider.backup.us-east.ep0"
EJECTIONS = "cluster.provider_primary_us-east.outlier_detection.ejections_enforced_consecutive_5xx"
HEALTHY = "cluster.provider_primary_us-east.membership_healthy"
OUTLIER = Outlier(consecutive_5xx=3, interval_ms=500, ejection_ms=2_000, max_ejection_percent=100)


def quick_to_recover(gw: Gateway) -> Gateway:
    clusters = tuple(
        c.model_copy(update={"outlier": OUTLIER}) if c.name == "provider.primary.us-east" else c for c in gw.clusters
    )
    return gw.model_copy(update={"clusters": clusters})


@pytest.fixture(scope="module")
def recovering(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    gw = quick_to_recover(compile_gateway(POLICY))
    with running_gateway(gw, tmp_path_factory.mktemp("recovery")) as running:
        yield running


def test_an_ejected_provider_gets_traffic_back_within_its_ejection_time(recovering: Running) -> None:
    lab = recovering
    assert lab.post(chat("failover-model")).headers["x-served-by"] == PRIMARY
    lab.upstream.set("provider.primary.*", status=500)
    for _ in range(OUTLIER.consecutive_5xx):
        reply = lab.post(chat("failover-model"))
        assert (reply.status, reply.headers["x-served-by"]) == (200, BACKUP)  # the client never sees the 500
    lab.envoy.wait_stat(EJECTIONS, 1)
    ejected_at = time.monotonic()

    lab.upstream.reset()  # the provider is healthy again, but ejected: traffic stays on the backup for now
    lab.upstream.clear()
    assert lab.post(chat("failover-model")).headers["x-served-by"] == BACKUP
    assert lab.upstream.count(PRIMARY) == 0

    bound_s = (OUTLIER.ejection_ms + OUTLIER.interval_ms) / 1000 + 0.5
    while (served := lab.post(chat("failover-model")).headers["x-served-by"]) != PRIMARY:
        assert served == BACKUP
        assert time.monotonic() - ejected_at < bound_s, "the recovered provider got no traffic back"
        time.sleep(0.1)
    recovered_after = time.monotonic() - ejected_at
    assert recovered_after >= OUTLIER.ejection_ms / 1000 - 0.5, "traffic came back before the ejection ended"


def test_an_outage_under_load_costs_clients_nothing(recovering: Running) -> None:
    """A bounded load runs while the primary answers 500, then resets connections, then recovers: every client
    gets a 200. Each fault starts with the primary back in rotation, so the primary really sees it."""
    lab = recovering
    phases = [("healthy", None), ("500", {"status": 500}), ("reset", {"drop": True}), ("recovered", None)]
    served: dict[str, Counter[str]] = {}
    reached: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for phase, fault in phases:
            lab.upstream.reset()
            lab.upstream.clear()
            lab.envoy.wait_stat(HEALTHY, 1, timeout=30)  # a previous phase's (or test's) ejection has ended
            if fault:
                lab.upstream.set("provider.primary.*", **fault)
            replies = list(pool.map(lambda _: lab.post(chat("failover-model")), range(24)))
            assert [r.status for r in replies] == [200] * len(replies), (phase, [r.body for r in replies])
            served[phase] = Counter(r.headers["x-served-by"] for r in replies)
            reached[phase] = lab.upstream.count(PRIMARY)
    assert served["healthy"] == {PRIMARY: 24}
    assert served["500"] == {BACKUP: 24} and served["reset"] == {BACKUP: 24}
    assert reached["500"] >= OUTLIER.consecutive_5xx and reached["reset"] >= OUTLIER.consecutive_5xx, reached
    assert served["recovered"] == {PRIMARY: 24}
