"""`kill -9` of the data-plane service under load, then a restart: no request the client saw complete goes
uncounted. Its usage is counted exactly, or — when the access-log batch died with the process — settled at its
reservation and marked estimated, which is never below what the provider reported."""

from __future__ import annotations

import asyncio
import http.client
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from ext_proc.store.base import Limit, Store
from ext_proc.store.redis import RedisStore
from ext_proc.store.sqlite import SqliteStore
from meshgen.compile import compile_gateway
from meshgen.lab.service import ServiceProcess
from tests.behaviour.conftest import POLICY, Running, chat, running_gateway
from tests.support.redis import redis_server

KEY = "sk-test-crash"
USAGE = 10  # the mock provider reports 7 prompt + 3 completion tokens for every request
SETTLE_AFTER_MS = 1500
LOAD_S = 3.0


def _store(kind: str, lab: Running, redis_url: str) -> Store:
    return RedisStore.from_url(redis_url) if kind == "redis" else SqliteStore.open(lab.ledger)


def tokens_today(kind: str, lab: Running, redis_url: str) -> float:
    async def read() -> float:
        store = _store(kind, lab, redis_url)
        try:
            return (await store.used("crash", time.time()))[Limit.TPD]
        finally:
            await store.close()

    return asyncio.run(read())


def still_open(kind: str, lab: Running, redis_url: str) -> int:
    """Reservations nobody settled yet (settling them here, which a test may do: it only reads the count)."""

    async def read() -> int:
        store = _store(kind, lab, redis_url)
        try:
            return len(await store.expire(time.time() + 1, time.time()))
        finally:
            await store.close()

    return asyncio.run(read())


@contextmanager
def load(lab: Running, threads: int = 4) -> Iterator[list[int]]:
    """Clients sending requests until the block ends; yields the list of statuses they saw, growing."""
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", lab.port, timeout=10)
        try:
            while not stop.is_set():
                try:
                    statuses.append(lab.post(chat("dev-model", max_tokens=20), key=KEY, conn=conn).status)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", lab.port, timeout=10)
        finally:
            conn.close()

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield statuses
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=15)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_kill_9_under_load_loses_no_completed_request(tmp_path: Path, kind: str) -> None:
    with ExitStack() as stack:
        redis_url = f"redis://127.0.0.1:{stack.enter_context(redis_server(tmp_path))}/0" if kind == "redis" else ""
        gw = compile_gateway(POLICY)
        service = gw.service.model_copy(
            update={"settle_after_ms": SETTLE_AFTER_MS, "store": kind, "redis_url": redis_url or gw.service.redis_url}
        )
        lab = stack.enter_context(running_gateway(gw.model_copy(update={"service": service}), tmp_path / "gw"))
        assert lab.service is not None
        with load(lab) as statuses:
            time.sleep(LOAD_S / 3)
            assert lab.service.signal(signal.SIGKILL) == -signal.SIGKILL
            killed_at = len(statuses)
            time.sleep(LOAD_S / 3)
            restarted = ServiceProcess(lab.config, port=lab.service.port, grpc_port=lab.grpc_port, ledger=lab.ledger)
            stack.enter_context(restarted)
            time.sleep(LOAD_S / 3)
        completed = statuses.count(200)
        assert completed > 0 and killed_at > 0
        assert set(statuses) <= {200, 503}, "while the service is down, failure_mode: closed answers 503"
        counted = tokens_today(kind, lab, redis_url)
        assert counted >= completed * USAGE, f"{counted} tokens counted for {completed} completed requests"
        # Every reservation is settled within the bound: exactly (access log) or at its estimate (the sweep of
        # the restarted service takes those whose access-log batch died with the killed process).
        time.sleep(SETTLE_AFTER_MS / 1000 + 1.0)
        assert still_open(kind, lab, redis_url) == 0
        assert tokens_today(kind, lab, redis_url) >= completed * USAGE
