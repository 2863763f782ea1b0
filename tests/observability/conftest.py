"""Fixtures shared by the tracing tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.observability.otlp import OtlpReceiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r
