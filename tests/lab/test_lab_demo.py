"""`meshgen lab demo` (without a running lab) on policies/lab.yaml, moved to free ports: the real Envoy, the real
data-plane service and the mock providers, brought up from a freshly built generated/ and torn down again."""

from __future__ import annotations

import random
import re
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgen.cli import app
from meshgen.compile import compile_gateway
from tests.support import require_binary

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies/lab.yaml"
TIMEOUT = 20.0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base(count: int) -> int:
    """A base port whose ``count`` consecutive ports are all bindable right now (outside the ephemeral range)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found")


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """policies/lab.yaml with `lab.base_port` moved to a free range."""
    count = len(compile_gateway(POLICY).ports.by_name)
    text, n = re.subn(r"(?m)^(\s+base_port:\s*)\d+", rf"\g<1>{free_base(count)}", POLICY.read_text())
    assert n == 1, "policies/lab.yaml should set lab.base_port once"
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    return path


def _ports_all_free(policy: Path) -> bool:
    return all(_bindable(port) for _, port in compile_gateway(policy).ports.by_name)


def test_lab_demo_sends_real_requests_and_tears_down(policy: Path, tmp_path: Path) -> None:
    require_binary("envoy")
    generated, run_dir = tmp_path / "generated", tmp_path / "run"
    started = time.monotonic()
    result = CliRunner().invoke(
        app, ["lab", "demo", str(policy), "--generated", str(generated), "--run-dir", str(run_dir)]
    )
    assert time.monotonic() - started < 30
    assert result.exit_code == 0, result.output
    rows = {line.split("  ")[0]: line for line in result.output.splitlines()}
    expected = {
        "gpt-4o": ("200", "provider.openai.us-east.ep0"),
        "gpt-4o, X-Model-Version: beta": ("200", "gpt-4o-beta"),
        "gpt-4o, dev may use only llama3": ("403", "model_not_allowed"),
        "llama3": ("200", "provider.ollama.us-east.ep0"),
        "unknown model": ("404", "model_not_found"),
        "no API key": ("401", "missing_api_key"),
        "gpt-4o-mini, provider.openai.us-east.ep0 answers 503": ("200", "provider.openai.europe.ep0"),
        "gpt-4o-mini, every OpenAI endpoint answers 503": ("200", "provider.ollama.us-east.ep0"),
    }
    for title, (status, shown) in expected.items():
        cells = rows[title].split()
        assert status in cells and shown in cells and cells[-1] == "ok", rows[title]
    assert "8/8 as expected" in result.output
    assert (generated / "local/envoy/us-east.yaml").is_file(), "a missing generated/ is built first"
    assert {"service.log", "envoy-us-east.log", "ledger.sqlite"} <= {p.name for p in run_dir.iterdir()}
    assert _ports_all_free(policy), "every part of the lab stopped"


def test_lab_refuses_ports_in_use(policy: Path, tmp_path: Path) -> None:
    busy_port = compile_gateway(policy).ports.of("listener.us-east")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", busy_port))
        sock.listen()
        args = ["lab", "demo", str(policy), "-g", str(tmp_path / "generated"), "--run-dir", str(tmp_path / "run")]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert f"{busy_port} (listener.us-east)" in result.output
    assert "lab.base_port" in result.output


def test_lab_names_an_unknown_region(policy: Path, tmp_path: Path) -> None:
    args = ["lab", "demo", str(policy), "--region", "mars", "-g", str(tmp_path / "generated")]
    result = CliRunner().invoke(app, [*args, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "no region 'mars'; regions: europe, us-east, us-west" in result.output
