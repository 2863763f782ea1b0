"""Redis stopped mid-run, then started again on the same port: no crash, behaviour as `service.ledger_down` says,
and recovery by itself. `count_locally` serves every request and, once Redis is back and the service has
reconciled, Redis counts the requests made during the outage exactly; `refuse` answers 503 `ledger_unavailable`
during the outage and 200 after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from ext_proc.store.base import Limit
from ext_proc.store.redis import RedisStore
from meshgen.compile import compile_gateway
from tests.behaviour.conftest import POLICY, Running, chat, running_gateway
from tests.support.redis import RedisServer

KEY = "sk-test-outage"
TENANT = "outage"
USAGE = 10  # the mock provider reports 7 prompt + 3 completion tokens for every request
N = 5
WAIT_S = 8.0  # bound of every wait below: the access log flushes every 0.5 s, the service reconciles every 1 s


def used(redis_url: str) -> dict[Limit, float]:
    async def read() -> dict[Limit, float]:
        store = RedisStore.from_url(redis_url)
        try:
            return await store.used(TENANT, time.time())
        finally:
            await store.close()

    return asyncio.run(read())


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT_S}s: {what}"
        time.sleep(0.1)


def send(lab: Running, n: int) -> list[int]:
    return [lab.post(chat("dev-model", max_tokens=20), key=KEY).status for _ in range(n)]


def events(lab: Running, name: str) -> list[str]:
    assert lab.service is not None
    return [line for line in lab.service.lines if f'"event": "{name}"' in line]


def test_count_locally_serves_through_the_outage_and_reconciles_exactly(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"
        gw = compile_gateway(POLICY)
        service = gw.service.model_copy(update={"store": "redis", "redis_url": url, "ledger_down": "count_locally"})
        with running_gateway(gw.model_copy(update={"service": service}), tmp_path / "gw") as lab:
            assert send(lab, N) == [200] * N
            wait_for("the requests before the outage counted", lambda: used(url)[Limit.TPD] == N * USAGE)

            redis.stop(save=True)  # its data survives the restart below, as a production Redis's would
            assert send(lab, N) == [200] * N, "count_locally: served while Redis is down"
            wait_for("degraded mode logged", lambda: len(events(lab, "ledger_degraded")) == 1)
            time.sleep(1.0)  # the access log's usage of those requests reaches the service (local settles)

            redis.start()
            wait_for("reconciled after Redis returned", lambda: len(events(lab, "ledger_recovered")) == 1)
            wait_for("the outage's requests counted exactly", lambda: used(url)[Limit.TPD] == 2 * N * USAGE)

            assert send(lab, N) == [200] * N
            wait_for("the requests after counted", lambda: used(url)[Limit.TPD] == 3 * N * USAGE)
            assert len(events(lab, "ledger_degraded")) == 1 and len(events(lab, "ledger_recovered")) == 1
            assert lab.service is not None and lab.service.running, "the service never crashed"


def test_refuse_answers_503_during_the_outage_and_200_after(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"
        gw = compile_gateway(POLICY)
        service = gw.service.model_copy(update={"store": "redis", "redis_url": url, "ledger_down": "refuse"})
        with running_gateway(gw.model_copy(update={"service": service}), tmp_path / "gw") as lab:
            assert send(lab, 2) == [200, 200]

            redis.stop()
            for _ in range(3):
                reply = lab.post(chat("dev-model", max_tokens=20), key=KEY)
                assert reply.status == 503, reply.body
                assert reply.headers["content-type"] == "application/json"
                error = reply.json()["error"]
                assert (error["code"], error["type"]) == ("ledger_unavailable", "server_error")
            assert lab.upstream.count() == 2, "nothing reached a provider uncounted"

            redis.start()
            wait_for("admitted again after Redis returned", lambda: send(lab, 1) == [200])
            assert len(events(lab, "ledger_recovered")) == 1
            assert lab.service is not None and lab.service.running
