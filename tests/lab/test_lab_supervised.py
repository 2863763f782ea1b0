"""`meshgen lab up | status | down | logs` and `meshgen chaos` on policies/lab.yaml, moved to free ports: the
supervisor, the real Envoys (all three regions), the data-plane service and the mock providers as real
background processes.

One lab serves the module (bringing one up costs a few seconds of two shared cores); the tests run in file order and
the last one takes it down and checks that nothing is left."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from meshgen.cli import app
from meshgen.compile import compile_gateway
from meshgen.lab.state import start_ticks
from tests.lab.test_lab_demo import POLICY, _bindable, free_base
from tests.support import require_binary

TIMEOUT = 30.0
REGIONS = ("europe", "us-east", "us-west")


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@dataclass
class RunningLab:
    policy: Path
    generated: Path
    run_dir: Path

    def cli(self, *args: str) -> tuple[int, str]:
        return _cli(*args, "--run-dir", str(self.run_dir))

    def up(self) -> tuple[int, str]:
        return self.cli("lab", "up", str(self.policy), "-g", str(self.generated))

    def status(self) -> dict[str, Any]:
        code, out = self.cli("lab", "status", "--json")
        info: dict[str, Any] = json.loads(out)
        assert (code == 0) == info["running"], out
        return info

    def chat(self, region: str, model: str, **headers: str) -> tuple[int, str | None]:
        info = self.status()
        base = info["regions"][region]["base_url"]
        port = int(base.split(":")[2].split("/")[0])
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        key = info["tenants"]["platform"]["api_key"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            all_headers = {"authorization": f"Bearer {key}", "content-type": "application/json", **headers}
            conn.request("POST", "/v1/chat/completions", body, all_headers)
            response = conn.getresponse()
            response.read()
            return response.status, response.getheader("x-served-by")
        finally:
            conn.close()

    def restarts_metric(self) -> dict[str, float]:
        url = self.status()["supervisor"]["metrics_url"]
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        found = re.findall(r'^service_container_restarts_total\{process="([^"]+)"\} (\S+)$', text, re.M)
        return {name: float(value) for name, value in found}

    def wait_restarted(self, process: str, old_pid: int, restarts: int) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            p = self.status()["processes"][process]
            if p["status"] == "running" and p["pid"] != old_pid and p["restarts"] >= restarts:
                return p
            assert time.monotonic() < deadline, f"{process} not restarted: {p}"
            time.sleep(0.1)


def lab_policy(tmp: Path, *edits: tuple[str, str]) -> Path:
    """policies/lab.yaml on free ports, with each (pattern, replacement) applied once, written into ``tmp``."""
    count = len(compile_gateway(POLICY).ports.by_name)
    text = POLICY.read_text()
    for pattern, replacement in ((r"(?m)^(\s+base_port:\s*)\d+", rf"\g<1>{free_base(count)}"), *edits):
        text, n = re.subn(pattern, replacement, text)
        assert n == 1, f"policies/lab.yaml should match {pattern!r} once"
    policy = tmp / "lab.yaml"
    policy.write_text(text)
    return policy


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    """policies/lab.yaml on free ports, with `openai-errors` at 100 % (so switching it on fails every attempt)."""
    require_binary("envoy")
    tmp = tmp_path_factory.mktemp("lab")
    policy = lab_policy(tmp, (r"(?m)^(\s+openai-errors:.*percent:\s*)\d+", r"\g<1>100"))
    running = RunningLab(policy, tmp / "generated", tmp / "run")
    yield running
    running.cli("lab", "down")


def _gone(pid: int, start: int | None) -> bool:
    return start is None or start_ticks(pid) != start


def test_up_brings_up_every_region(lab: RunningLab) -> None:
    started = time.monotonic()
    code, out = lab.up()
    assert code == 0, out
    assert time.monotonic() - started < 60
    assert "lab up for" in out
    for region in REGIONS:
        assert re.search(rf"^{region}\s+http://127\.0\.0\.1:\d+/v1\s", out, re.M), out
    assert "sk-lab-platform" in out and "lab-only" in out
    for region in REGIONS:
        assert lab.chat(region, "gpt-4o-mini")[0] == 200, region
    assert lab.chat("us-east", "gpt-4o-mini") == (200, "provider.openai.us-east.ep0")


def test_up_again_sees_the_running_lab(lab: RunningLab) -> None:
    pids = {n: p["pid"] for n, p in lab.status()["processes"].items()}
    code, out = lab.up()
    assert code == 0, out
    assert "lab already running" in out and "older build" not in out
    assert {n: p["pid"] for n, p in lab.status()["processes"].items()} == pids
    original = lab.policy.read_text()
    try:
        lab.policy.write_text(original.replace("rpm: 600", "rpm: 601"))
        code, out = lab.up()
        assert code == 0 and "It runs an older build of the policy" in out, out
    finally:
        lab.policy.write_text(original)


def test_status_json(lab: RunningLab) -> None:
    info = lab.status()
    expected = {"mocks", "service", *(f"envoy-{r}" for r in REGIONS)}
    if shutil.which("prometheus"):
        expected.add("prometheus")
        assert info["urls"]["prometheus"].startswith("http://127.0.0.1:")
        if shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"):
            expected |= {"alertmanager", "alert-sink"}
    assert set(info["processes"]) == expected
    for name, p in info["processes"].items():
        assert p["status"] == "running" and isinstance(p["pid"], int) and p["restarts"] == 0, name
        assert Path(p["log"]).parent == lab.run_dir.resolve()
    assert info["phase"] == "ready"
    assert set(info["regions"]) == set(REGIONS)
    for region in info["regions"].values():
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", region["base_url"])
    assert {t: v["api_key"] for t, v in info["tenants"].items()} == {
        "dev-team": "sk-lab-dev",
        "platform": "sk-lab-platform",
        "research": "sk-lab-research",
    }
    assert info["tenants"]["dev-team"]["models"] == ["llama3"]
    assert "lab-only" in info["api_keys_note"]
    code, out = lab.cli("lab", "status")
    assert code == 0 and re.search(r"^service\s+running\s+\d+\s+0\s", out, re.M), out


@pytest.mark.parametrize("process", ["service", "mocks"])
def test_kill_9_is_restarted_and_counted(lab: RunningLab, process: str) -> None:
    before = lab.status()["processes"][process]
    counted = lab.restarts_metric()[process]
    os.kill(before["pid"], signal.SIGKILL)
    after = lab.wait_restarted(process, before["pid"], before["restarts"] + 1)
    assert after["restarts"] == before["restarts"] + 1
    assert lab.restarts_metric()[process] == counted + 1
    assert lab.chat("us-east", "gpt-4o-mini") == (200, "provider.openai.us-east.ep0")


def test_crashes_in_a_row_back_off(lab: RunningLab) -> None:
    first = lab.status()["processes"]["service"]
    os.kill(first["pid"], signal.SIGKILL)
    second = lab.wait_restarted("service", first["pid"], first["restarts"] + 1)
    os.kill(second["pid"], signal.SIGKILL)  # again, well within 10 s of being healthy: the backoff doubles
    third = lab.wait_restarted("service", second["pid"], first["restarts"] + 2)
    log = lab.cli("lab", "logs", "supervisor", "-n", "0")[1]
    delays = {
        int(n): float(s) for n, s in re.findall(r"service: exited with -9 after \S+; restart (\d+) in (\S+)s", log)
    }
    assert delays[third["restarts"]] == 2 * delays[second["restarts"]], log


def test_a_hung_process_is_killed_and_restarted(lab: RunningLab) -> None:
    before = lab.status()["processes"]["service"]
    os.kill(before["pid"], signal.SIGSTOP)  # alive, but answers nothing
    try:
        deadline = time.monotonic() + TIMEOUT
        while lab.status()["processes"]["service"]["status"] != "unhealthy":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        lab.wait_restarted("service", before["pid"], before["restarts"] + 1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(before["pid"], signal.SIGCONT)
    assert "health checks failed in a row; SIGKILL" in lab.cli("lab", "logs", "supervisor")[1]
    assert lab.chat("us-east", "gpt-4o-mini") == (200, "provider.openai.us-east.ep0")


def test_logs(lab: RunningLab) -> None:
    code, out = lab.cli("lab", "logs", "service", "-n", "0")
    assert code == 0 and "meshgen-service listening on" in out, out
    code, out = lab.cli("lab", "logs", "-n", "5")
    assert code == 0 and re.search(r"^supervisor\s+\| ", out, re.M), out
    code, out = lab.cli("lab", "logs", "nope")
    assert code == 1 and "no process 'nope'" in out


def test_demo_goes_through_the_running_lab(lab: RunningLab) -> None:
    pids = {n: p["pid"] for n, p in lab.status()["processes"].items()}
    code, out = lab.cli("lab", "demo", str(lab.policy), "-g", str(lab.generated))
    assert code == 0, out
    assert "8/8 as expected" in out
    assert {n: p["pid"] for n, p in lab.status()["processes"].items()} == pids, "the same lab, not a new one"


def test_chaos_on_off(lab: RunningLab) -> None:
    def on_in() -> dict[str, bool]:
        code, out = lab.cli("chaos", "status", "--json")
        assert code == 0, out
        return {r: faults["openai-errors"]["on"] for r, faults in json.loads(out)["regions"].items()}

    assert lab.chat("us-east", "gpt-4o", **{"x-model-version": "beta"}) == (200, "provider.openai.us-east.ep0")
    code, out = lab.cli("chaos", "on", "openai-errors", "--region", "us-east")
    assert code == 0 and "meshgen.chaos.openai-errors.abort_percent=100" in out, out
    assert on_in() == {"europe": False, "us-east": True, "us-west": False}
    # gpt-4o's beta route has only OpenAI behind it: every attempt meets the fault. gpt-4o-mini fails over to Ollama.
    assert lab.chat("us-east", "gpt-4o", **{"x-model-version": "beta"})[0] >= 500
    assert lab.chat("us-east", "gpt-4o-mini") == (200, "provider.ollama.us-east.ep0")
    assert lab.chat("europe", "gpt-4o-mini") == (200, "provider.openai.europe.ep0")
    code, out = lab.cli("chaos", "status")
    assert code == 0 and re.search(r"^openai-errors\s+off\s+on\s+off", out, re.M), out

    # An Envoy the supervisor restarts gets the switched faults back.
    envoy = lab.status()["processes"]["envoy-us-east"]
    os.kill(envoy["pid"], signal.SIGKILL)
    lab.wait_restarted("envoy-us-east", envoy["pid"], envoy["restarts"] + 1)
    assert on_in()["us-east"] is True
    assert lab.chat("us-east", "gpt-4o", **{"x-model-version": "beta"})[0] >= 500

    code, out = lab.cli("chaos", "off", "openai-errors")
    assert code == 0, out
    assert on_in() == dict.fromkeys(REGIONS, False)
    # OpenAI answers again (which of its endpoints depends on what outlier detection ejected meanwhile)
    status, served_by = lab.chat("us-east", "gpt-4o", **{"x-model-version": "beta"})
    assert status == 200 and (served_by or "").startswith("provider.openai."), served_by


def test_chaos_names_the_known_faults(lab: RunningLab) -> None:
    code, out = lab.cli("chaos", "on", "openai-typo")
    assert code == 1
    assert "unknown fault 'openai-typo'; the policy's faults: openai-errors, openai-slow, openai-throttle" in out
    code, out = lab.cli("chaos", "on", "openai-slow", "--region", "mars")
    assert code == 1 and "no region 'mars'" in out


def test_down_leaves_nothing_running(lab: RunningLab) -> None:
    info = lab.status()
    pids = [(p["pid"], start_ticks(p["pid"])) for p in info["processes"].values()]
    supervisor = info["supervisor"]["pid"]
    pids.append((supervisor, start_ticks(supervisor)))
    assert all(start is not None for _, start in pids)
    code, out = lab.cli("lab", "down")
    assert code == 0 and "lab stopped." in out, out
    assert all(_gone(pid, start) for pid, start in pids), pids
    assert not {"state.json", "plan.json", "supervisor.pid"} & {p.name for p in lab.run_dir.iterdir()}
    assert lab.status() == {"running": False, "run_dir": str(lab.run_dir.resolve())}
    code, out = lab.cli("lab", "down")
    assert code == 0 and "no lab running" in out
    code, out = lab.cli("chaos", "status")
    assert code == 1 and "no lab running" in out


def test_up_refuses_ports_in_use(tmp_path: Path) -> None:
    count = len(compile_gateway(POLICY).ports.by_name)
    policy = tmp_path / "lab.yaml"
    text = re.sub(r"(?m)^(\s+base_port:\s*)\d+", rf"\g<1>{free_base(count)}", POLICY.read_text())
    policy.write_text(text)
    busy = compile_gateway(policy).ports.of("mocks.admin")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", busy))
        sock.listen()
        code, out = _cli("lab", "up", str(policy), "-g", str(tmp_path / "g"), "--run-dir", str(tmp_path / "run"))
    assert code == 1
    assert f"{busy} (mocks.admin)" in out and "lab.base_port" in out
    assert not (tmp_path / "run" / "supervisor.pid").exists()


def _one_region_lab(tmp_path: Path) -> RunningLab:
    require_binary("envoy")
    count = len(compile_gateway(POLICY).ports.by_name)
    policy = tmp_path / "lab.yaml"
    policy.write_text(re.sub(r"(?m)^(\s+base_port:\s*)\d+", rf"\g<1>{free_base(count)}", POLICY.read_text()))
    return RunningLab(policy, tmp_path / "generated", tmp_path / "run")


def test_a_process_that_cannot_start_fails_up_and_leaves_nothing(tmp_path: Path) -> None:
    lab = _one_region_lab(tmp_path)
    (lab.run_dir / "ledger.sqlite").mkdir(parents=True)  # the service cannot open its ledger: it exits at once
    code, out = lab.cli("lab", "up", str(lab.policy), "-g", str(lab.generated), "-r", "us-east", "--no-prometheus")
    assert code == 1, out
    assert "the lab did not start: service exited" in out and "service.log" in out, out
    assert not {"state.json", "plan.json", "supervisor.pid"} & {p.name for p in lab.run_dir.iterdir()}
    assert all(_bindable(port) for _, port in compile_gateway(lab.policy).ports.by_name)


def test_down_after_the_supervisor_was_killed(tmp_path: Path) -> None:
    lab = _one_region_lab(tmp_path)
    code, out = lab.cli("lab", "up", str(lab.policy), "-g", str(lab.generated), "-r", "us-east", "--no-prometheus")
    assert code == 0, out
    info = lab.status()
    assert set(info["processes"]) == {"mocks", "service", "envoy-us-east"}
    children = [(p["pid"], start_ticks(p["pid"])) for p in info["processes"].values()]
    os.kill(info["supervisor"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while lab.status()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not any(_gone(pid, start) for pid, start in children), "its processes outlive it"
    code, out = lab.cli("lab", "down")
    assert code == 0 and "lab stopped." in out, out
    assert all(_gone(pid, start) for pid, start in children)
    assert all(_bindable(port) for _, port in compile_gateway(lab.policy).ports.by_name)
