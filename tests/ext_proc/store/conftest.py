"""Fixtures for the ledger stores: each conformance test runs on SQLite, on a real Redis and in memory.

``open_store`` is a factory of async context managers — ``async with open_store() as store:`` — so a test can
open several stores on the same ledger (the same SQLite file, the same Redis database; for the memory store,
which cannot share a ledger between objects, the same instance each time). Tests drive their
coroutines with ``asyncio.run`` (no pytest-asyncio here), so each store and client lives in that one loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from ext_proc.store.base import Store
from ext_proc.store.memory import MemoryStore
from ext_proc.store.redis import RedisStore
from ext_proc.store.sqlite import SqliteStore
from tests.ext_proc.store.kit import OpenStore
from tests.support.redis import redis_server


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server on 127.0.0.1 for the whole session (no persistence), killed at the end."""
    with redis_server(tmp_path_factory.mktemp("redis")) as port:
        yield port


@pytest.fixture(params=["sqlite", "redis", "memory"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
    """Factory of stores on one fresh ledger (a new SQLite file, the flushed Redis database, a new memory store)."""
    if backend == "memory":
        shared = MemoryStore()

        @asynccontextmanager
        async def open_memory() -> AsyncIterator[Store]:
            yield shared  # one process's memory: every "store on the ledger" is this one

        return open_memory

    if backend == "sqlite":
        path = tmp_path / "ledger.sqlite3"

        @asynccontextmanager
        async def open_sqlite() -> AsyncIterator[Store]:
            store = SqliteStore.open(path)
            try:
                yield store
            finally:
                await store.close()

        return open_sqlite

    port: int = request.getfixturevalue("redis_port")
    with redis.Redis(host="127.0.0.1", port=port) as sync_client:
        sync_client.flushdb()

    @asynccontextmanager
    async def open_redis() -> AsyncIterator[Store]:
        store = RedisStore(aioredis.Redis(host="127.0.0.1", port=port))
        try:
            yield store
        finally:
            await store.close()

    return open_redis


@pytest.fixture
def redis_url(redis_port: int) -> Iterator[str]:
    """For Redis-only tests: the URL of the flushed test database."""
    with redis.Redis(host="127.0.0.1", port=redis_port) as sync_client:
        sync_client.flushdb()
    yield f"redis://127.0.0.1:{redis_port}/0"
