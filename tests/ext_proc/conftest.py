from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ext_proc.kit import ServiceProcess, write_config

MAX_BODY_BYTES = 4096


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One running service per test module, bodies capped at MAX_BODY_BYTES."""
    config = write_config(tmp_path_factory.mktemp("ext_proc"))
    proc = ServiceProcess(config, ("--max-body-bytes", str(MAX_BODY_BYTES))).start()
    try:
        yield proc
    finally:
        proc.stop()
