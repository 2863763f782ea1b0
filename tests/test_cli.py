"""`meshgen` as users run it: exit codes, what is printed, and what is (not) written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import meshgen
from meshgen.cli import app

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "policies/lab.yaml"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_public_surface() -> None:
    assert meshgen.__all__ == ["__version__", "compile_policy"]


def test_committed_generated_tree_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, out = run("build", "policies/lab.yaml", "--check")
    assert code == 0, out


def test_typo_prints_line_and_did_you_mean_and_writes_nothing(tmp_path: Path) -> None:
    policy = tmp_path / "lab.yaml"
    policy.write_text(LAB.read_text().replace("failover: [claude-sonnet, llama3]", "failover: [claude-sonet, llama3]"))
    line = next(i for i, text in enumerate(policy.read_text().splitlines(), 1) if "[claude-sonet," in text)
    code, out = run("build", str(policy), "-o", str(tmp_path / "out"))
    assert code == 1
    assert (
        f"{policy}:{line}: models.gpt-4o.failover[0]: unknown model 'claude-sonet' "
        "(did you mean 'claude-sonnet'?) [MG101]" in out
    )
    assert not (tmp_path / "out").exists()


def test_build_prunes_stale_files_and_rebuilds_identically(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    assert run("build", str(LAB), "-o", str(out))[0] == 0
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "local/envoy/old-region.yaml").write_text("stale")
    assert run("build", str(LAB), "-o", str(out))[0] == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first


def test_check_exits_3_and_lists_the_files_that_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the policy path as given is part of every file's header
    out = tmp_path / "generated"
    shutil.copytree(ROOT / "generated", out)
    (out / "local/service.json").write_text("{}")
    (out / "compose/extra.yaml").write_text("x: 1")
    (out / "local/envoy/europe.yaml").unlink()
    code, text = run("build", "policies/lab.yaml", "-o", str(out), "--check")
    assert code == 3
    listed = [line.strip() for line in text.splitlines() if line.startswith("  ")]
    assert listed == ["compose/extra.yaml", "local/envoy/europe.yaml", "local/service.json"]


def test_build_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    code, out = run("build", str(LAB), "-o", str(tmp_path))
    assert code == 70
    assert "refusing to replace" in out
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_validate_and_schema() -> None:
    assert run("validate", str(LAB)) == (0, f"{LAB}: ok\n")
    code, out = run("schema")
    schema = json.loads(out)
    assert code == 0
    assert {"apiVersion", "providers", "models", "tenants", "chaos", "slos"} <= set(schema["properties"])
