"""The generated Alertmanager configs pass ``amtool check-config``, and route by region and severity."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from meshgen.compile import compile_gateway
from meshgen.render.envoy import Target
from tests.support.tools import require_binary

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "expected"
TREES = [ROOT / "generated", *sorted(p for p in GOLDEN.iterdir() if p.is_dir())]


def _amtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("amtool"), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("tree", TREES, ids=[p.name for p in TREES])
def test_amtool_checks_every_generated_config(tree: Path) -> None:
    configs = sorted((tree / "alertmanager").glob("*/alertmanager.yml"))
    assert [c.parent.name for c in configs] == sorted(t.value for t in Target), tree
    checked = _amtool("check-config", *configs)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=MeshgenBudgetStage", "region=us-east", "severity=ticket"], "ticket"),
        (["alertname=MeshgenProviderFailing", "region=europe", "severity=page"], "page"),
        (["alertname=MeshgenServiceDown", "severity=page"], "page"),
        (["alertname=Other"], "ticket"),
    ],
    ids=["region-ticket", "region-page", "no-region-page", "default"],
)
def test_routes_by_region_and_severity(labels: list[str], receiver: str) -> None:
    config = ROOT / "generated" / "alertmanager" / "local" / "alertmanager.yml"
    routed = _amtool("config", "routes", "test", f"--config.file={config}", *labels)
    assert routed.returncode == 0, routed.stdout + routed.stderr
    assert routed.stdout.strip() == receiver
    tree = _amtool("config", "routes", "show", f"--config.file={config}")
    regions = [r.name for r in compile_gateway(ROOT / "policies" / "lab.yaml").regions]
    assert all(f'region="{r}"' in tree.stdout for r in regions), tree.stdout
