"""One small policy per feature → the exact tree `meshgen build` writes. `pytest --update-golden` rewrites."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshgen import __version__, output
from meshgen.compile import compile_policy

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
CASES = sorted((HERE / "cases").glob("*.yaml"))
EXPECTED = HERE / "expected"


def build(case: Path) -> dict[str, str]:
    source = case.relative_to(ROOT).as_posix()
    return output.serialize(compile_policy(case, source=source), source=source, version=__version__)


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_case_builds_the_expected_tree(case: Path, update_golden: bool) -> None:
    files = build(case)
    expected = EXPECTED / case.stem
    if update_golden:
        output.write(expected, files)
    on_disk = output.read_tree(expected)
    diffs = [
        "".join(difflib.unified_diff(on_disk.get(p, "").splitlines(True), files.get(p, "").splitlines(True), p, p))
        for p in output.drift(expected, files)
    ]
    assert not diffs, "golden output differs (run pytest --update-golden and review):\n" + "\n".join(diffs)[:6000]


def test_no_expected_tree_without_a_case(update_golden: bool) -> None:
    stale = sorted(p for p in EXPECTED.iterdir() if p.is_dir() and p.name not in {c.stem for c in CASES})
    if update_golden:
        for path in stale:
            shutil.rmtree(path)
        stale = []
    assert not stale, f"expected trees with no case (run pytest --update-golden): {stale}"


def test_builds_are_byte_identical_across_processes(tmp_path: Path) -> None:
    """Separate interpreters with different hash seeds: any set or dict order leaking into output shows here."""
    trees = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        subprocess.run(
            [sys.executable, "-m", "meshgen.cli", "build", "policies/lab.yaml", "-o", str(out)],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
            capture_output=True,
            timeout=60,
        )
        trees.append(output.read_tree(out))
    assert trees[0] == trees[1] == output.read_tree(ROOT / "generated")


@pytest.mark.parametrize("target", ["compose", "local"])
def test_admin_listens_on_loopback_only(target: str) -> None:
    for path in (ROOT / "generated" / target / "envoy").glob("*.yaml"):
        admin = yaml.safe_load(path.read_text())["admin"]["address"]["socket_address"]
        assert admin["address"] == "127.0.0.1", path
