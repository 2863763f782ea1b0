"""Shared pytest options and fixtures.

``--update-golden`` rewrites tests/golden/expected/ (and deletes stale files) instead of comparing against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support import MockUpstream, free_ports, require_binary


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/expected/ from current output (deleting stale files) instead of comparing",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when pytest ran with --update-golden."""
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture
def envoy_bin() -> str:
    """Path of the real envoy binary (skip locally / fail in CI when missing)."""
    return require_binary("envoy")


@pytest.fixture
def mock_upstream() -> Iterator[Callable[..., MockUpstream]]:
    """Factory ``mock_upstream("provider.openai.us-east.ep0", ...)``: free ports, stopped after the test."""
    started: list[MockUpstream] = []

    def make(*labels: str) -> MockUpstream:
        up = MockUpstream(dict(zip(labels, free_ports(len(labels)), strict=True))).start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()
