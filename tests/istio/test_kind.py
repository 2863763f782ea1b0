"""kind/bootstrap.sh: shellcheck clean, and its dry run prints the steps and every manifest it would apply.
There is no Docker or Kubernetes here, so the real run is not exercised."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.support import require_binary

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "kind" / "bootstrap.sh"


def test_bootstrap_passes_shellcheck() -> None:
    shellcheck = require_binary("shellcheck")
    result = subprocess.run([shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_prints_the_steps_and_the_manifests() -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}
    )
    out = result.stdout
    steps = [line for line in out.splitlines() if line.startswith("==> ")]
    assert [s.split()[1] for s in steps[:6]] == ["1/6", "2/6", "3/6", "4/6", "5/6", "6/6"]
    for command in ("kind create cluster", "istioctl install", "kubectl apply -k", "kubectl wait", "curl "):
        assert f"+ {command}" in out
    kustomization = yaml.safe_load((ROOT / "generated" / "istio" / "kustomization.yaml").read_text())
    for rel in kustomization["resources"]:
        assert f"# {rel}\n" in out
    printed = out.split("--- manifests", 1)[1].split("==> 5/6", 1)[0]
    docs = [d for d in yaml.safe_load_all(printed.split("\n", 1)[1]) if d]
    assert len(docs) == len(kustomization["resources"])


def test_unknown_argument_is_refused() -> None:
    result = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True)
    assert result.returncode == 2
