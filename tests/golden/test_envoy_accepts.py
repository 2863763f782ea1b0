"""Every Envoy bootstrap we commit (goldens and generated/) parses strictly into Envoy's protos and passes the
real `envoy --mode validate`: a golden file cannot hold a config Envoy would refuse."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from meshgen.validate.envoy import envoy_validate, parse_bootstrap
from tests.support import require_binary

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAPS = sorted(
    [*(ROOT / "tests/golden/expected").glob("*/*/envoy/*.yaml"), *(ROOT / "generated").glob("*/envoy/*.yaml")]
)
IDS = [p.relative_to(ROOT).as_posix() for p in BOOTSTRAPS]


def test_there_are_bootstraps_to_check() -> None:
    assert len(BOOTSTRAPS) >= 30


@pytest.mark.parametrize("path", BOOTSTRAPS, ids=IDS)
def test_parses_into_envoy_protos(path: Path) -> None:
    parse_bootstrap(yaml.safe_load(path.read_text()))


def test_real_envoy_validates_every_bootstrap() -> None:
    envoy = require_binary("envoy")
    with ThreadPoolExecutor(4) as pool:
        failures = [f for f in pool.map(lambda p: _validate(p, envoy), BOOTSTRAPS) if f]
    assert not failures, "\n\n".join(failures)


def _validate(path: Path, envoy: str) -> str | None:
    try:
        envoy_validate(path, binary=envoy)
    except Exception as error:  # collected so one run lists every rejected file
        return f"{path.relative_to(ROOT)}: {error}"
    return None
