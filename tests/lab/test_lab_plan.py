"""What `meshgen lab up` plans to run, without running it: processes, ports, demo keys, faults, backoff."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshgen.cli import app
from meshgen.compile import compile_gateway
from meshgen.ir.model import Gateway
from meshgen.lab.control import demo_keys, follow_logs, plan_lab
from meshgen.lab.state import alive, ps_start, start_ticks
from meshgen.lab.supervisor import backoff

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies/lab.yaml"


@pytest.fixture(scope="module")
def gateway() -> Gateway:
    return compile_gateway(POLICY)


def test_backoff_doubles_up_to_30_seconds() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4, 7, 20)] == [0.5, 1.0, 2.0, 4.0, 30.0, 30.0]


def test_demo_keys_only_where_the_policy_has_their_hash(gateway: Gateway) -> None:
    expected = {"dev-team": "sk-lab-dev", "platform": "sk-lab-platform", "research": "sk-lab-research"}
    assert demo_keys(gateway) == expected
    no_hashes = gateway.model_copy(
        update={"tenants": tuple(t.model_copy(update={"key_hashes": ()}) for t in gateway.tenants)}
    )
    assert demo_keys(no_hashes) == {}


def test_plan_runs_every_part_on_the_policys_ports(gateway: Gateway, tmp_path: Path) -> None:
    plan = plan_lab(
        gateway,
        policy=POLICY,
        generated=tmp_path / "generated",
        run_dir=tmp_path / "run",
        regions=("us-east",),
        prometheus=None,
    )
    ports = gateway.ports
    assert [p.name for p in plan.processes] == ["mocks", "service", "envoy-us-east"]
    mocks = plan.processes[0].argv
    assert mocks[:3] == (sys.executable, "-m", "meshgen.lab.providers")
    assert f"provider.openai.us-east.ep0={ports.of('provider.openai.us-east.ep0')}" in mocks
    assert mocks[-2:] == ("--admin-port", str(ports.of("mocks.admin")))
    assert plan.processes[2].health_url == f"http://127.0.0.1:{ports.of('admin.us-east')}/ready"
    assert plan.regions["us-east"].base_url == f"http://127.0.0.1:{ports.of('listener.us-east')}/v1"
    assert plan.metrics_port == ports.of("supervisor")
    assert "prometheus" not in plan.urls
    names = {n for n, _ in plan.ports}
    assert {"service", "service.grpc", "mocks.admin", "supervisor", "listener.us-east"} <= names
    assert not any(n in ("listener.europe", "admin.europe") or n.startswith("chaos.europe.") for n in names)
    faults = {f.name: f for f in plan.faults}
    assert faults["openai-errors"].runtime_keys == ("meshgen.chaos.openai-errors.abort_percent",)
    assert faults["openai-slow"].runtime_keys == ("meshgen.chaos.openai-slow.delay_percent",)
    assert (faults["openai-errors"].abort_status, faults["openai-errors"].percent) == (500, 20)


def test_with_prometheus(gateway: Gateway, tmp_path: Path) -> None:
    plan = plan_lab(
        gateway, policy=POLICY, generated=tmp_path, run_dir=tmp_path, regions=("us-east",), prometheus="/bin/prom"
    )
    prom = plan.processes[-1]
    assert (prom.name, prom.argv[0]) == ("prometheus", "/bin/prom")
    assert f"--web.listen-address=127.0.0.1:{gateway.ports.of('prometheus')}" in prom.argv
    assert plan.urls["prometheus"] == f"http://127.0.0.1:{gateway.ports.of('prometheus')}"


def test_commands_without_a_lab(tmp_path: Path) -> None:
    run_dir = ["--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, ["lab", "status", "--json", *run_dir])
    assert result.exit_code == 1
    assert json.loads(result.output) == {"running": False, "run_dir": str((tmp_path / "run").resolve())}
    result = CliRunner().invoke(app, ["lab", "down", *run_dir])
    assert result.exit_code == 0 and "no lab running" in result.output
    result = CliRunner().invoke(app, ["chaos", "on", "openai-errors", *run_dir])
    assert result.exit_code == 1 and "no lab running" in result.output and "meshgen lab up" in result.output


def test_follow_logs_prints_appended_lines(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("old line\n")
    seen: list[str] = []
    follow = follow_logs({"service": log}, seen.append, prefix=True, poll=0.0)
    next(follow)
    with log.open("a") as f:
        f.write("new line\nhalf")
    next(follow)
    assert seen == ["service       | new line"], "from the end on, whole lines only"
    with log.open("a") as f:
        f.write(" done\n")
    next(follow)
    assert seen[-1] == "service       | half done"
    log.write_text("after a restart\n")  # truncated and rewritten
    next(follow)
    assert seen[-1] == "service       | after a restart"


def test_pid_identity_with_and_without_proc() -> None:
    me = os.getpid()
    assert start_ticks(me) is not None and alive(me, start_ticks(me))
    assert not alive(me, (start_ticks(me) or 0) + 1), "same pid, another start: another process"
    assert ps_start(me) is not None and ps_start(me) == ps_start(me)  # the fallback where /proc is missing
    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    assert start_ticks(child.pid) is None and ps_start(child.pid) is None and not alive(child.pid, None)
