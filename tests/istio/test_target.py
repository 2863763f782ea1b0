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


def test_one_target_keeps_the_others_files(tmp_path: Path) -> None:
    out, policy = tmp_path / "out", str(ROOT / "policies" / "lab.yaml")
    assert CliRunner().invoke(app, ["build", policy, "-o", str(out)]).exit_code == 0
    both = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    envoy_file = out / "local" / "service.json"
    envoy_file.write_text(envoy_file.read_text() + " ")  # stale now: an istio-only build must leave it alone
    result = CliRunner().invoke(app, ["build", policy, "-o", str(out), "--target", "istio"])
    assert result.exit_code == 0, result.output
    assert {p.relative_to(out) for p in out.rglob("*") if p.is_file()} == both
    assert envoy_file.read_text().endswith(" ")
