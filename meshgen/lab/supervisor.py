"""The lab's supervisor: runs the processes of a plan (``state.py``), restarts any that exits, until SIGTERM.

`meshgen lab up` starts it detached (``python -m meshgen.lab.supervisor --detach RUN_DIR``: a launcher starts the
real supervisor in a session of its own, records its pid and returns at once) and waits for ``state.json`` to say
``ready``. The supervisor

- starts every process of ``plan.json`` (lowest tier first), its stdout and stderr appended to ``<name>.log``;
- waits until each answers its health check; the lab is ``ready`` when all do. A process that exits or is not
  healthy within ``STARTUP_TIMEOUT`` before that fails the start: everything is stopped, ``phase: failed``;
- once ready, checks each process's health every second, kills one that failed ``UNHEALTHY_KILL_AFTER`` checks in
  a row (hung), and restarts a process that exits, after a backoff of 0.5 s doubling per consecutive crash up to 30 s
  (a process that was healthy for ``STABLE_AFTER`` seconds starts over at 0.5 s), and counts it in
  ``service_container_restarts_total{process="<name>"}`` on ``http://127.0.0.1:<supervisor port>/metrics``;
- re-applies ``chaos.json`` to an Envoy that was restarted (Envoy's admin runtime layer starts empty);
- on SIGTERM, SIGINT or SIGHUP stops the processes, highest tier first, each with SIGTERM, then SIGKILL after
  ``STOP_TIMEOUT``, removes ``state.json`` and exits 0.

The children stay in the supervisor's process group, so `meshgen lab down` can still end them all should the
supervisor itself have been killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, start_http_server

from meshgen.lab.state import Plan, ProcessSpec, ProcessState, ProcessStatus, RunDir, State, start_ticks

__all__ = ["RESTARTS_METRIC", "Supervisor", "backoff", "main"]

RESTARTS_METRIC = "service_container_restarts_total"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0
STABLE_AFTER = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
TICK = 0.1
HEALTH_TIMEOUT = 1.0
LIVENESS_EVERY = 1.0
"""Seconds between health checks of a running process."""
UNHEALTHY_KILL_AFTER = 8
"""Consecutive failed checks after which a running process counts as hung: SIGKILL, then the usual restart."""


def backoff(crashes: int) -> float:
    """Seconds before restart number ``crashes`` in a row (1 → 0.5 s, 2 → 1 s, 3 → 2 s, … at most 30 s)."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, crashes - 1)))


def healthy(spec: ProcessSpec) -> bool:
    try:
        with urllib.request.urlopen(spec.health_url, timeout=HEALTH_TIMEOUT) as resp:
            body = bytes(resp.read()).decode(errors="replace")
            return resp.status == 200 and (spec.health_body is None or body.strip() == spec.health_body)
    except (OSError, urllib.error.URLError, ValueError):
        return False


@dataclass
class _Child:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes] | None = None
    start: int | None = None
    started_at: float = 0.0
    status: ProcessStatus = "stopped"
    restarts: int = 0
    crashes: int = 0
    """Consecutive crashes, for the backoff."""
    restart_at: float = 0.0
    last_health: float = 0.0
    failed_checks: int = 0
    healthy_at: float | None = None
    """When it last became healthy (None: not since it was started)."""


class Supervisor:
    def __init__(self, run_dir: RunDir, plan: Plan, *, log: IO[str] | None = None) -> None:
        self.run_dir = run_dir
        self.plan = plan
        self.children = {spec.name: _Child(spec) for spec in sorted(plan.processes, key=lambda s: s.tier)}
        self.phase: str = "starting"
        self.error: str | None = None
        self.stopping = threading.Event()
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            RESTARTS_METRIC.removesuffix("_total"),
            "Restarts of a lab process by `meshgen lab up`'s supervisor after it exited.",
            ["process"],
            registry=self.registry,
        )
        self.up = Gauge(
            "meshgen_lab_process_up", "1 while a lab process runs and is healthy.", ["process"], registry=self.registry
        )
        for name in self.children:
            self.restarts.labels(name).inc(0)
            self.up.labels(name).set(0)
        self._log = log if log is not None else sys.stderr
        self._written: State | None = None
        self._start = start_ticks(os.getpid())

    # ---- bookkeeping -----------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        self._log.write(f"{stamp} {message}\n")
        self._log.flush()

    def _write_state(self) -> None:
        state = State(
            supervisor_pid=os.getpid(),
            supervisor_start=self._start,
            phase="ready" if self.phase == "ready" else "failed" if self.phase == "failed" else "starting",
            error=self.error,
            processes={
                name: ProcessState(
                    pid=None if c.proc is None else c.proc.pid, start=c.start, status=c.status, restarts=c.restarts
                )
                for name, c in self.children.items()
            },
        )
        if state != self._written:
            self.run_dir.write_state(state)
            self._written = state

    # ---- one process -----------------------------------------------------------------------------------
    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        with open(spec.log, "ab") as log:
            log.write(f"--- meshgen lab: starting {spec.name}: {' '.join(spec.argv)}\n".encode())
            log.flush()
            child.proc = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **spec.env},
                cwd=self.plan.run_dir,
            )
        child.start = start_ticks(child.proc.pid)
        child.started_at = time.monotonic()
        child.status, child.failed_checks, child.healthy_at = "starting", 0, None
        self.say(f"{spec.name}: started, pid {child.proc.pid}")

    def _became_healthy(self, child: _Child) -> None:
        child.status, child.healthy_at = "running", time.monotonic()
        self.up.labels(child.spec.name).set(1)
        self.say(f"{child.spec.name}: healthy")
        if child.spec.name.startswith("envoy-"):
            self._reapply_chaos(child.spec.name.removeprefix("envoy-"))

    def _reapply_chaos(self, region: str) -> None:
        values = self.run_dir.chaos().get(region)
        info = self.plan.regions.get(region)
        if not values or info is None:
            return
        query = urllib.parse.urlencode(values)
        request = urllib.request.Request(f"{info.admin_url}/runtime_modify?{query}", data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=HEALTH_TIMEOUT):
                self.say(f"envoy-{region}: chaos runtime re-applied: {query}")
        except (OSError, urllib.error.URLError) as error:
            self.say(f"envoy-{region}: could not re-apply chaos runtime: {error}")

    def _check_liveness(self, child: _Child) -> None:
        """A running process that stops answering is ``unhealthy``; after ``UNHEALTHY_KILL_AFTER`` failed checks in a
        row it is killed, and restarted like any process that exits."""
        if healthy(child.spec):
            if child.status == "unhealthy":
                self.say(f"{child.spec.name}: healthy again")
                self.up.labels(child.spec.name).set(1)
            child.status, child.failed_checks = "running", 0
            return
        child.failed_checks += 1
        if child.status == "running":
            child.status = "unhealthy"
            self.up.labels(child.spec.name).set(0)
            self.say(f"{child.spec.name}: health check failed")
        if child.failed_checks >= UNHEALTHY_KILL_AFTER and child.proc is not None:
            self.say(f"{child.spec.name}: {child.failed_checks} health checks failed in a row; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()

    def _exited(self, child: _Child, code: int) -> None:
        name = child.spec.name
        self.up.labels(name).set(0)
        child.proc, child.start = None, None
        if self.phase != "ready":
            child.status = "stopped"
            self.fail(f"{name} exited with {code} before it was ready; see {child.spec.log}")
            return
        now = time.monotonic()
        ran = now - child.started_at
        stable = child.healthy_at is not None and now - child.healthy_at >= STABLE_AFTER
        child.crashes = 1 if stable else child.crashes + 1
        child.restarts += 1
        self.restarts.labels(name).inc()
        delay = backoff(child.crashes)
        child.restart_at = time.monotonic() + delay
        child.status = "backoff"
        self.say(f"{name}: exited with {code} after {ran:.1f}s; restart {child.restarts} in {delay:.1f}s")

    def fail(self, error: str) -> None:
        if self.phase != "failed":
            self.say(f"start failed: {error}")
            self.phase, self.error = "failed", error
            self.stopping.set()

    # ---- the loop --------------------------------------------------------------------------------------
    def step(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if self.stopping.is_set():
                return
            if child.proc is not None:
                code = child.proc.poll()
                if code is not None:
                    self._exited(child, code)
                elif child.status == "starting" and now - child.last_health >= 0.2:
                    child.last_health = now
                    if healthy(child.spec):
                        self._became_healthy(child)
                    elif now - child.started_at > STARTUP_TIMEOUT:
                        late = f"{child.spec.name} not healthy within {STARTUP_TIMEOUT:.0f}s"
                        if self.phase == "starting":
                            self.fail(f"{late}; see {child.spec.log}")
                        else:  # a restart that does not come up: kill it, the next restart backs off further
                            self.say(f"{late} after a restart; SIGKILL")
                            child.proc.kill()
                elif child.status in ("running", "unhealthy") and now - child.last_health >= LIVENESS_EVERY:
                    child.last_health = now
                    self._check_liveness(child)
            elif child.status == "backoff" and now >= child.restart_at:
                self._spawn(child)
        if self.phase == "starting" and all(c.status == "running" for c in self.children.values()):
            self.phase = "ready"
            self.say("lab ready")

    def run(self) -> int:
        for child in self.children.values():
            self._spawn(child)
        self._write_state()
        while not self.stopping.is_set():
            self.step()
            self._write_state()
            self.stopping.wait(TICK)
        self.stop_all()
        if self.phase == "failed":
            self._write_state()
            return 1
        with contextlib.suppress(FileNotFoundError):
            self.run_dir.state_path.unlink()
        self.say("stopped")
        return 0

    def stop_all(self) -> None:
        """Highest tier first; each tier SIGTERM, then SIGKILL after ``STOP_TIMEOUT``."""
        for tier in sorted({c.spec.tier for c in self.children.values()}, reverse=True):
            group = [c for c in self.children.values() if c.spec.tier == tier and c.proc is not None]
            for child in group:
                assert child.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT
            for child in group:
                assert child.proc is not None
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{child.spec.name}: no exit {STOP_TIMEOUT:.0f}s after SIGTERM; SIGKILL")
                    child.proc.kill()
                    child.proc.wait()
                child.proc, child.start, child.status = None, None, "stopped"
                self.up.labels(child.spec.name).set(0)
        self.say("every process stopped")

    def handle_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self.say(f"{signal.Signals(signum).name}: stopping")
        self.stopping.set()


def _detach(run_dir: RunDir) -> int:
    """Start the real supervisor in a session of its own, record its pid, return at once (it is not our child
    for long: we exit, and it is re-parented, so nobody has to reap it)."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    with open(run_dir.supervisor_log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshgen.lab.supervisor", str(run_dir.path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=run_dir.path,
        )
    run_dir.write_pid(proc.pid)
    print(proc.pid)
    sys.stdout.flush()
    os._exit(0)  # no Popen finalizer: the supervisor runs on


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshgen.lab.supervisor", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the lab's run directory, holding plan.json")
    parser.add_argument("--detach", action="store_true", help="start the supervisor in the background and return")
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run_dir)
    if args.detach:
        return _detach(run_dir)
    plan = run_dir.plan()
    if plan is None:
        print(f"no readable plan.json in {run_dir.path}", file=sys.stderr)
        return 2
    disable_created_metrics()  # type: ignore[no-untyped-call]  # this process's registry holds only the supervisor's series
    supervisor = Supervisor(run_dir, plan)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, supervisor.handle_signal)
    try:
        server, _ = start_http_server(plan.metrics_port, "127.0.0.1", registry=supervisor.registry)
    except OSError as error:
        supervisor.fail(f"the supervisor's metrics port {plan.metrics_port}: {error}")
        supervisor._write_state()
        return 1
    supervisor.say(f"supervisor pid {os.getpid()}, metrics on http://127.0.0.1:{plan.metrics_port}/metrics")
    try:
        return supervisor.run()
    finally:
        server.shutdown()


if __name__ == "__main__":
    sys.exit(main())
