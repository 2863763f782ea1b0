"""What a supervised lab keeps in its run directory (``.lab/`` by default), and how to read it safely.

    .lab/plan.json        what to run: every process's command, health check and log, the URLs, the demo keys,
                          the chaos faults. Written by `meshgen lab up`, read by the supervisor and every command.
    .lab/supervisor.pid   the supervisor's pid, written by `meshgen lab up` as soon as it is started
    .lab/state.json       what runs: per process pid, state and restarts. Rewritten (atomically) by the supervisor
                          on every change; ``phase`` is ``starting``, then ``ready``, or ``failed`` with an ``error``.
    .lab/chaos.json       the runtime values `meshgen chaos` set, per region, re-applied to an Envoy after a restart
    .lab/<process>.log    each process's stdout and stderr, appended across restarts; ``supervisor.log`` too
    .lab/ledger.sqlite    the data-plane service's ledger

`meshgen lab down` removes everything but the logs and the ledger. A pid is trusted only together with its start
time (``/proc/<pid>/stat``, or ``ps`` where there is no ``/proc``), so a pid the kernel reused for another program
is never signalled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

_PROC = Path("/proc")

__all__ = [
    "Fault",
    "Plan",
    "ProcessSpec",
    "ProcessState",
    "RegionUrls",
    "RunDir",
    "State",
    "alive",
    "ps_start",
    "start_ticks",
]

Phase = Literal["starting", "ready", "failed"]
ProcessStatus = Literal["starting", "running", "unhealthy", "backoff", "stopped"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProcessSpec(_Model):
    name: str
    """`mocks`, `service`, `envoy-us-east`, `prometheus`: the restart counter's ``process`` label, the log's name."""
    argv: tuple[str, ...]
    env: dict[str, str] = {}
    """Added to the supervisor's environment."""
    health_url: str
    """GET answers 200 (and ``health_body``, when set) once the process serves."""
    health_body: str | None = None
    log: str
    tier: int
    """Stop order: the highest tier first (Envoys before the service before the mocks); start in the reverse."""


class RegionUrls(_Model):
    auth: str
    base_url: str
    """OpenAI-compatible: ``http://127.0.0.1:<listener>/v1``."""
    admin_url: str
    admin_port: int


class Fault(_Model):
    name: str
    delay_ms: int | None
    abort_status: int | None
    percent: float
    runtime_keys: tuple[str, ...]
    """``meshgen.chaos.<name>.delay_percent`` and/or ``…abort_percent``: what `meshgen chaos` sets."""
    targets: tuple[str, ...]
    """The provider clusters whose chaos hop carries it."""


class Plan(_Model):
    policy: str
    name: str
    generated: str
    run_dir: str
    processes: tuple[ProcessSpec, ...]
    regions: dict[str, RegionUrls]
    demo_keys: dict[str, str]
    """Tenant → lab-only API key, only keys whose sha256 the policy lists for that tenant."""
    tenant_models: dict[str, tuple[str, ...]]
    """Tenant → the models it may use (for the demo keys)."""
    faults: tuple[Fault, ...]
    urls: dict[str, str]
    """``supervisor_metrics``, ``mocks_admin``, ``service``, ``prometheus`` (when it runs)."""
    metrics_port: int
    build_digest: str = ""
    """sha256 of the ``generated/local`` files the lab started from (``run.local_digest``)."""
    ports: tuple[tuple[str, int], ...]
    """Every port the lab listens on (checked free before it starts)."""


class ProcessState(_Model):
    pid: int | None
    start: int | None
    """The pid's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    status: ProcessStatus
    restarts: int


class State(_Model):
    supervisor_pid: int
    supervisor_start: int | None
    phase: Phase
    error: str | None = None
    processes: dict[str, ProcessState]


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot); None when there is no such process or it is a zombie.
    Without ``/proc`` (macOS), a number derived from ``ps``'s start time, compared only for equality."""
    if not _PROC.is_dir():
        return ps_start(pid)
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def ps_start(pid: int) -> int | None:
    """``start_ticks`` from ``ps -o lstart=,stat=``: its start time to the second, hashed stably; None when gone."""
    try:
        out = subprocess.run(
            ["ps", "-o", "lstart=,stat=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out[-1].startswith("Z"):
        return None
    return int.from_bytes(hashlib.sha256(" ".join(out[:-1]).encode()).digest()[:6], "big")


def alive(pid: int | None, start: int | None) -> bool:
    """``pid`` runs and is the process that started at ``start`` (any start when ``start`` is None)."""
    if pid is None:
        return False
    ticks = start_ticks(pid)
    return ticks is not None and (start is None or ticks == start)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class RunDir:
    """The run directory's files; every read tolerates a missing or half-written file (returns None)."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.plan_path = self.path / "plan.json"
        self.state_path = self.path / "state.json"
        self.pid_path = self.path / "supervisor.pid"
        self.chaos_path = self.path / "chaos.json"
        self.supervisor_log = self.path / "supervisor.log"

    def log(self, process: str) -> Path:
        return self.path / f"{process}.log"

    def write_plan(self, plan: Plan) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.plan_path, plan.model_dump(mode="json"))

    def plan(self) -> Plan | None:
        try:
            return Plan.model_validate_json(self.plan_path.read_text())
        except (OSError, ValidationError):
            return None

    def write_state(self, state: State) -> None:
        _write_json(self.state_path, state.model_dump(mode="json"))

    def state(self) -> State | None:
        try:
            return State.model_validate_json(self.state_path.read_text())
        except (OSError, ValidationError):
            return None

    def write_pid(self, pid: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        start = start_ticks(pid)
        _write_json(self.pid_path, {"pid": pid, "start": start})

    def supervisor(self) -> tuple[int, int | None] | None:
        """The supervisor's (pid, start) as last recorded, whether or not it still runs."""
        try:
            data = json.loads(self.pid_path.read_text())
            return int(data["pid"]), (None if data.get("start") is None else int(data["start"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def supervisor_alive(self) -> bool:
        recorded = self.supervisor()
        return recorded is not None and alive(*recorded)

    def chaos(self) -> dict[str, dict[str, str]]:
        """Region → runtime key → value, as `meshgen chaos` last set them."""
        try:
            data = json.loads(self.chaos_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(r): {str(k): str(v) for k, v in kv.items()} for r, kv in data.items() if isinstance(kv, dict)}

    def write_chaos(self, values: dict[str, dict[str, str]]) -> None:
        _write_json(self.chaos_path, values)

    def clear(self) -> None:
        """Forget the lab: plan, state, pid and chaos files (the logs and the ledger stay)."""
        for path in (self.state_path, self.pid_path, self.plan_path, self.chaos_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
