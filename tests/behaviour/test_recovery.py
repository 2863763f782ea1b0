"""Circuit breaking with recovery: a provider that fails is ejected (its traffic fails over, no client sees an
error), and once it is healthy again it gets traffic back within its ejection time plus one detection interval."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from meshgen.compile import compile_gateway
from meshgen.ir.model import Gateway, Outlier
from tests.behaviour.conftest import POLICY, Running, chat, running_gateway

PRIMARY = "provider.primary.us-east.ep0"
BACKUP = "provider.backup.us-east.ep0"
EJECTIONS = "cluster.provider_primary_us-east.outlier_detection.ejections_enforced_consecutive_5xx"
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
