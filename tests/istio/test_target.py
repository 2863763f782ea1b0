"""`meshgen build` writes both targets; `--target` picks one."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgen.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _tops(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"compose", "local", "istio", "grafana", "prometheus", "alertmanager"}),
        (["--target", "istio"], {"istio"}),
        (["--target", "envoy"], {"compose", "local", "grafana", "prometheus", "alertmanager"}),
    ],
    ids=["both", "istio", "envoy"],
)
def test_build_target(tmp_path: Path, args: list[str], expected: set[str]) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", str(ROOT / "policies" / "lab.yaml"), "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    assert _tops(out) == expected


def test_unknown_target_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["build", str(ROOT / "policies" / "lab.yaml"), "-o", str(tmp_path), "--target", "k8s"]
    )
    assert result.exit_code == 2
