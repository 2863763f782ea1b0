"""`meshgen lab up | status | down | logs`: the lab as supervised background processes, driven from the CLI.

``up`` builds ``generated/`` when stale, writes the plan (what to run: ``state.py``), starts the supervisor
(``supervisor.py``) detached and waits until every process answers its health check. Each process gets its ports
from the IR (``lab.base_port``): the mock providers (``python -m meshgen.lab.providers``) on every provider endpoint
port plus their admin API on ``mocks.admin``, the data-plane service on ``service`` and ``service.grpc``, one Envoy
per region on ``generated/local/envoy/<region>.yaml``, the supervisor's metrics on ``supervisor`` and, when the
``prometheus`` binary is installed, Prometheus on ``prometheus`` scraping all of them with the generated rules
(``generated/prometheus/local/``, the lab's regions only) and Alertmanager (Debian's ``prometheus-alertmanager``)
on the next port with ``generated/alertmanager/local/alertmanager.yml``, notifying the lab's webhook receiver
(``python -m meshgen.lab.alert_sink``, the port after) which logs each notification to ``alert-sink.log``.

The demo API keys (``sk-lab-<tenant>``, or the tenant name's first word: ``sk-lab-dev`` for ``dev-team``) are the lab's
own, published in ``policies/lab.yaml``'s comment and the README; a key is shown only when its sha256 is one the
policy lists for that tenant. They are not secrets and must never be used outside the lab.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshgen.ir.model import Gateway
from meshgen.lab.envoy import EnvoyError, EnvoyProcess
from meshgen.lab.run import HOST, LabError, current_digest, ensure_built, ports_in_use, select_regions
from meshgen.lab.service import ServiceProcess
from meshgen.lab.state import Fault, Plan, ProcessSpec, RegionUrls, RunDir, alive
from meshgen.render.alertmanager import lab_sink_port
from meshgen.render.envoy.filters.fault import runtime_key
from meshgen.render.prometheus.scrape import lab_alertmanager_port

__all__ = [
    "LAB_KEY_PREFIX",
    "MOCKS_MODULE",
    "UpResult",
    "demo_keys",
    "down",
    "follow_logs",
    "log_paths",
    "plan_lab",
    "status",
    "up",
]

LAB_KEY_PREFIX = "sk-lab-"
MOCKS_MODULE = "meshgen.lab.providers"
"""The mock providers' process: ``--listen LABEL=PORT … --host H --admin-port P``."""
ALERT_SINK_MODULE = "meshgen.lab.alert_sink"
"""The lab's webhook receiver for Alertmanager (``--host H --port P``), run with Alertmanager."""
UP_TIMEOUT = 90.0
DOWN_TIMEOUT = 30.0
"""The supervisor stops four tiers, each bounded by its own SIGTERM → SIGKILL timeout (5 s)."""


def demo_keys(gateway: Gateway) -> dict[str, str]:
    """Tenant → the lab's key for it: ``sk-lab-<tenant>`` or ``sk-lab-<a leading part of the name>``, whichever
    hashes to one of the tenant's ``key_hashes``; tenants without such a key are left out."""
    keys: dict[str, str] = {}
    for tenant in gateway.tenants:
        words = tenant.name.split("-")
        for n in range(len(words), 0, -1):
            candidate = LAB_KEY_PREFIX + "-".join(words[:n])
            if hashlib.sha256(candidate.encode()).hexdigest() in tenant.key_hashes:
                keys[tenant.name] = candidate
                break
    return keys


def _faults(gateway: Gateway) -> tuple[Fault, ...]:
    found: dict[str, Fault] = {}
    for cluster in gateway.clusters:
        for f in cluster.faults:
            kinds = [k for k, on in (("delay", f.delay_ms is not None), ("abort", f.abort_status is not None)) if on]
            known = found.get(f.name)
            targets = (known.targets if known else ()) + (cluster.name,)
            found[f.name] = Fault(
                name=f.name,
                delay_ms=f.delay_ms,
                abort_status=f.abort_status,
                percent=f.percent,
                runtime_keys=tuple(runtime_key(f, kind) for kind in kinds),
                targets=targets,
            )
    return tuple(found[name] for name in sorted(found))


def _mock_provider_keys(service_json: Path) -> dict[str, str]:
    """Lab-only placeholders for the provider keys the data-plane service reads (each provider's ``key_env`` in its
    config), so a real key in the caller's environment never travels to the mocks or into their records."""
    try:
        providers = json.loads(service_json.read_text()).get("providers", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {
        p["key_env"]: f"sk-mock-{name}-lab-only"
        for name, p in sorted(providers.items())
        if isinstance(p, dict) and isinstance(p.get("key_env"), str)
    }


def _prometheus_config(generated: Path, regions: Sequence[str]) -> dict[str, Any]:
    """generated/prometheus/local/prometheus.yml for the regions this lab runs, its rule files by absolute path."""
    config: dict[str, Any] = yaml.safe_load((generated / "prometheus" / "local" / "prometheus.yml").read_text())
    config["rule_files"] = [str((generated / "prometheus" / "rules" / "*.yml").resolve())]
    for job in config["scrape_configs"]:
        job["static_configs"] = [
            s for s in job["static_configs"] if s.get("labels", {}).get("region", regions[0]) in regions
        ]
    return config


def plan_lab(
    gateway: Gateway,
    *,
    policy: Path,
    generated: Path,
    run_dir: Path,
    regions: Sequence[str],
    prometheus: str | None,
    alertmanager: str | None = None,
    envoy_log_level: str = "warn",
) -> Plan:
    """What `meshgen lab up` runs for ``gateway``: absolute paths, ports from the IR. ``prometheus`` is the
    binary to run (None: none); its config goes to ``run_dir/prometheus.yml`` when the plan is written."""
    run_dir, generated = run_dir.resolve(), generated.resolve()
    local = generated / "local"
    ports = gateway.ports

    def url(name: str, path: str = "") -> str:
        return f"http://{HOST}:{ports.of(name)}{path}"

    def log(name: str) -> str:
        return str(run_dir / f"{name}.log")

    endpoints = {e.name: ports.of(e.name) for c in gateway.clusters for e in c.endpoints}
    mocks_argv = [sys.executable, "-m", MOCKS_MODULE]
    for label, port in endpoints.items():
        mocks_argv += ["--listen", f"{label}={port}"]
    mocks_argv += ["--host", HOST, "--admin-port", str(ports.of("mocks.admin"))]
    service = ServiceProcess(
        local / "service.json",
        host=HOST,
        port=ports.of("service"),
        grpc_port=ports.of("service.grpc"),
        ledger=run_dir / "ledger.sqlite",
    )
    processes = [
        ProcessSpec(
            name="mocks",
            argv=tuple(mocks_argv),
            health_url=url("mocks.admin", "/healthz"),
            log=log("mocks"),
            tier=0,
        ),
        ProcessSpec(
            name="service",
            argv=tuple(service.command),
            env=_mock_provider_keys(local / "service.json"),
            health_url=url("service", "/healthz"),
            log=log("service"),
            tier=1,
        ),
    ]
    for region in regions:
        envoy = EnvoyProcess(local / "envoy" / f"{region}.yaml", ports.of(f"admin.{region}"), log_level=envoy_log_level)
        processes.append(
            ProcessSpec(
                name=f"envoy-{region}",
                argv=tuple(envoy.command),
                health_url=url(f"admin.{region}", "/ready"),
                health_body="LIVE",
                log=log(f"envoy-{region}"),
                tier=2,
            )
        )
    urls = {
        "supervisor_metrics": url("supervisor", "/metrics"),
        "mocks_admin": url("mocks.admin"),
        "service": url("service"),
    }
    if prometheus is not None:
        processes.append(
            ProcessSpec(
                name="prometheus",
                argv=(
                    prometheus,
                    f"--config.file={run_dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={run_dir / 'prometheus-data'}",
                    f"--web.listen-address={HOST}:{ports.of('prometheus')}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ),
                health_url=url("prometheus", "/-/ready"),
                log=log("prometheus"),
                tier=3,
            )
        )
        urls["prometheus"] = url("prometheus")
    if alertmanager is not None:
        am = f"http://{HOST}:{lab_alertmanager_port(gateway)}"
        processes.append(
            ProcessSpec(
                name="alertmanager",
                argv=(
                    alertmanager,
                    f"--config.file={generated / 'alertmanager' / 'local' / 'alertmanager.yml'}",
                    f"--storage.path={run_dir / 'alertmanager-data'}",
                    f"--web.listen-address={HOST}:{lab_alertmanager_port(gateway)}",
                    "--cluster.listen-address=",
                    "--log.level=warn",
                ),
                health_url=f"{am}/-/ready",
                log=log("alertmanager"),
                tier=3,
            )
        )
        urls["alertmanager"] = am
        sink = f"http://{HOST}:{lab_sink_port(gateway)}"
        processes.append(
            ProcessSpec(
                name="alert-sink",
                argv=(sys.executable, "-m", ALERT_SINK_MODULE, "--host", HOST, "--port", str(lab_sink_port(gateway))),
                health_url=f"{sink}/healthz",
                log=log("alert-sink"),
                tier=0,
            )
        )
        urls["alert_sink"] = sink
    auth = {r.name: r.auth for r in gateway.regions}
    lab_ports = [(n, ports.of(n)) for n in ("service", "service.grpc", "mocks.admin", "supervisor")]
    lab_ports += list(endpoints.items())
    lab_ports += [
        (n, p)
        for n, p in ports.by_name
        for r in regions
        if n in (f"listener.{r}", f"admin.{r}") or n.startswith(f"chaos.{r}.")
    ]
    if prometheus is not None:
        lab_ports.append(("prometheus", ports.of("prometheus")))
    if alertmanager is not None:
        lab_ports += [("alertmanager", lab_alertmanager_port(gateway)), ("alert-sink", lab_sink_port(gateway))]
    return Plan(
        policy=str(policy.resolve()),
        name=gateway.name,
        generated=str(generated),
        run_dir=str(run_dir),
        processes=tuple(processes),
        regions={
            r: RegionUrls(
                auth=auth[r],
                base_url=url(f"listener.{r}", "/v1"),
                admin_url=url(f"admin.{r}"),
                admin_port=ports.of(f"admin.{r}"),
            )
            for r in regions
        },
        demo_keys=demo_keys(gateway),
        tenant_models={t.name: t.models for t in gateway.tenants},
        faults=_faults(gateway),
        urls=urls,
        metrics_port=ports.of("supervisor"),
        ports=tuple(lab_ports),
    )


# ---- up ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UpResult:
    plan: Plan
    already_running: bool
    changed: tuple[str, ...] = ()
    """Files of ``generated/`` rebuilt because they were stale."""
    stale: bool = False
    """The lab already ran, from another build than the policy compiles to now."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(run_dir: RunDir, timeout: float) -> None:
    """Until the supervisor says ``ready``; ``LabError`` (the lab stopped) when it failed, died or took too long."""
    deadline = time.monotonic() + timeout
    while True:
        state = run_dir.state()
        if state is not None and state.phase == "ready":
            return
        if state is not None and state.phase == "failed":
            log = next((Path(p.log) for p in (run_dir.plan() or _no_plan()).processes if p.log in (state.error or "")),
                       run_dir.supervisor_log)  # fmt: skip
            down(run_dir.path)
            raise LabError(f"the lab did not start: {state.error}\n--- {log} ---\n{_tail(log)}")
        if not run_dir.supervisor_alive():
            down(run_dir.path)
            log = run_dir.supervisor_log
            raise LabError(f"the lab's supervisor exited while starting\n--- {log} ---\n{_tail(log)}")
        if time.monotonic() >= deadline:
            waiting = [n for n, p in (state.processes.items() if state else ()) if p.status != "running"]
            down(run_dir.path)
            raise LabError(
                f"the lab was not ready within {timeout:.0f}s (waiting for {', '.join(waiting) or 'the supervisor'}); "
                f"logs in {run_dir.path}/"
            )
        time.sleep(0.1)


def _no_plan() -> Plan:
    raise LabError("the lab's plan.json disappeared while it was starting")


def up(
    policy: Path,
    *,
    generated: Path = Path("generated"),
    run_dir: Path = Path(".lab"),
    regions: Sequence[str] = (),
    prometheus: bool = True,
    timeout: float = UP_TIMEOUT,
) -> UpResult:
    """Start the supervised lab and wait until it is healthy; when one already runs in ``run_dir`` (for the same
    policy), wait for it to be ready and report it instead."""
    rd = RunDir(run_dir)
    with _locked(rd):
        return _up(rd, policy, generated=generated, regions=regions, prometheus=prometheus, timeout=timeout)


@contextlib.contextmanager
def _locked(rd: RunDir) -> Iterator[None]:
    """One `lab up` at a time per run directory: a second one waits, then finds the first one's lab running."""
    rd.path.mkdir(parents=True, exist_ok=True)
    with open(rd.path / "up.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _up(
    rd: RunDir, policy: Path, *, generated: Path, regions: Sequence[str], prometheus: bool, timeout: float
) -> UpResult:
    if rd.supervisor_alive():
        plan = rd.plan()
        if plan is None:
            raise LabError(f"a lab supervisor runs for {rd.path} but its plan.json is unreadable; `meshgen lab down`")
        if Path(plan.policy) != policy.resolve():
            raise LabError(
                f"a lab for {plan.policy} already runs in {rd.path}; `meshgen lab down` first, "
                f"or give this one another --run-dir (and lab.base_port)"
            )
        _wait_ready(rd, timeout)
        stale = bool(plan.build_digest) and plan.build_digest != current_digest(policy)
        return UpResult(plan, already_running=True, stale=stale)
    down(rd.path)  # leftovers of a lab whose supervisor died: stop its processes, forget its state
    built = ensure_built(policy, generated)
    gateway = built.gateway
    chosen = select_regions(gateway, regions, policy)
    binary = shutil.which("prometheus") if prometheus else None
    am_binary = (shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")) if binary else None
    try:
        plan = plan_lab(
            gateway,
            policy=policy,
            generated=generated,
            run_dir=rd.path,
            regions=chosen,
            prometheus=binary,
            alertmanager=am_binary,
        )
    except EnvoyError as error:  # no envoy binary
        raise LabError(str(error)) from None
    plan = plan.model_copy(update={"build_digest": built.digest})
    busy = ports_in_use(plan.ports)
    if busy:
        raise LabError(
            f"port(s) in use on {HOST}: {', '.join(busy)}; is another lab running? "
            f"Stop it, or move the lab with `lab.base_port` in {policy}."
        )
    rd.write_plan(plan)
    if binary is not None:
        (rd.path / "prometheus.yml").write_text(yaml.safe_dump(_prometheus_config(generated, chosen), sort_keys=False))
    for spec in plan.processes:
        with open(spec.log, "ab") as log:
            log.write(f"=== meshgen lab up {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
    launched = subprocess.run(
        [sys.executable, "-m", "meshgen.lab.supervisor", "--detach", str(rd.path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if launched.returncode != 0:
        rd.clear()
        raise LabError(f"could not start the lab's supervisor: {launched.stderr.strip() or launched.returncode}")
    _wait_ready(rd, timeout)
    return UpResult(plan, already_running=False, changed=built.changed)


# ---- down --------------------------------------------------------------------------------------------------
def _wait_gone(pids: Sequence[tuple[int, int | None]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(*p) for p in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, start: int | None, signum: int) -> None:
    if alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own child (a test that ran `up` in-process); nothing otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def down(run_dir: Path = Path(".lab"), *, timeout: float = DOWN_TIMEOUT) -> bool:
    """Stop the supervisor (which stops its processes), then anything of the lab still running (SIGTERM, then
    SIGKILL); forget the plan and state. True when something was running."""
    rd = RunDir(run_dir)
    supervisor = rd.supervisor()
    state = rd.state()
    children = [(p.pid, p.start) for p in (state.processes.values() if state else ()) if p.pid is not None]
    found = False
    if supervisor is not None and alive(*supervisor):
        found = True
        _signal(*supervisor, signal.SIGTERM)
        if not _wait_gone([supervisor], timeout):
            _signal(*supervisor, signal.SIGKILL)
            _wait_gone([supervisor], 5.0)
        _reap(supervisor[0])
    leftovers = [c for c in children if alive(*c)]
    if leftovers:
        found = True
        for pid, start in leftovers:
            _signal(pid, start, signal.SIGTERM)
        if not _wait_gone(leftovers, 5.0):
            for pid, start in leftovers:
                _signal(pid, start, signal.SIGKILL)
            _wait_gone(leftovers, 5.0)
    if found and supervisor is not None:
        # Anything else still in the supervisor's process group (it led its own session): ours, end it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(supervisor[0], signal.SIGKILL)
    rd.clear()
    return found


# ---- status ------------------------------------------------------------------------------------------------
KEYS_NOTE = "lab-only demo keys (published in policies/lab.yaml and the README); never use them outside the lab"


def status(run_dir: Path = Path(".lab")) -> dict[str, Any]:
    """The running lab as `meshgen lab status --json` prints it (``{"running": false, …}`` when none runs)."""
    rd = RunDir(run_dir)
    plan, state = rd.plan(), rd.state()
    supervisor = rd.supervisor()
    if plan is None or supervisor is None or not alive(*supervisor):
        return {"running": False, "run_dir": str(rd.path)}
    processes: dict[str, Any] = {}
    for spec in plan.processes:
        ps = state.processes.get(spec.name) if state else None
        gone = ps is not None and ps.status in ("starting", "running", "unhealthy") and not alive(ps.pid, ps.start)
        processes[spec.name] = {
            # "exited": it just died and the supervisor has not yet noticed (it will restart it)
            "status": "exited" if gone else ps.status if ps else "starting",
            "pid": ps.pid if ps else None,
            "restarts": ps.restarts if ps else 0,
            "log": spec.log,
        }
    return {
        "running": True,
        "phase": state.phase if state else "starting",
        "policy": plan.policy,
        "name": plan.name,
        "run_dir": plan.run_dir,
        "supervisor": {"pid": supervisor[0], "metrics_url": plan.urls["supervisor_metrics"]},
        "processes": processes,
        "regions": {
            r: {"base_url": u.base_url, "admin_url": u.admin_url, "auth": u.auth} for r, u in plan.regions.items()
        },
        "tenants": {
            tenant: {"api_key": key, "models": list(plan.tenant_models.get(tenant, ()))}
            for tenant, key in sorted(plan.demo_keys.items())
        },
        "api_keys_note": KEYS_NOTE,
        "urls": dict(plan.urls),
    }


def format_status(info: dict[str, Any]) -> str:
    if not info["running"]:
        return f"no lab running in {info['run_dir']}/"
    lines = [
        f"lab {info['name']} ({info['policy']}): {info['phase']}; supervisor pid {info['supervisor']['pid']}, "
        f"restarts counted at {info['supervisor']['metrics_url']}",
        "",
        f"{'process':<16}{'status':<10}{'pid':<9}{'restarts':<10}log",
    ]
    for name, p in info["processes"].items():
        pid = "-" if p["pid"] is None else str(p["pid"])
        lines.append(f"{name:<16}{p['status']:<10}{pid:<9}{p['restarts']:<10}{p['log']}")
    lines += ["", urls_text(info)]
    return "\n".join(lines)


def urls_text(info: dict[str, Any]) -> str:
    """Each region's OpenAI-compatible base URL and admin, the lab's other URLs and the demo keys."""
    lines = [f"{'region':<10}{'base URL (OpenAI-compatible)':<34}admin"]
    for region, r in info["regions"].items():
        lines.append(f"{region:<10}{r['base_url']:<34}{r['admin_url']}")
    lines.append("")
    lines += [f"{name.replace('_', ' ')}: {u}" for name, u in info["urls"].items()]
    if info["tenants"]:
        keys = ", ".join(f"{t} {v['api_key']}" for t, v in info["tenants"].items())
        lines += ["", f"API keys: {keys}", f"  ({KEYS_NOTE})"]
        regions = info["regions"]
        region = next((n for n, r in regions.items() if r["auth"] == "api-key"), next(iter(regions)))
        tenant, model = max(
            ((t, v["models"]) for t, v in info["tenants"].items()), key=lambda tm: len(tm[1])
        )  # the tenant allowed the most models, and its first
        body = json.dumps({"model": model[0] if model else "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        lines += [
            "",
            f"Try ({region}):",
            f"  curl -s {regions[region]['base_url']}/chat/completions "
            f"-H 'authorization: Bearer {info['tenants'][tenant]['api_key']}' "
            f"-H 'content-type: application/json' -d '{body}'",
        ]
    return "\n".join(lines)


# ---- logs --------------------------------------------------------------------------------------------------
def log_paths(run_dir: Path = Path(".lab")) -> dict[str, Path]:
    """Process → its log: the plan's when a lab is planned, else every ``*.log`` left in ``run_dir``."""
    rd = RunDir(run_dir)
    plan = rd.plan()
    if plan is not None:
        paths = {p.name: Path(p.log) for p in plan.processes}
    else:
        paths = {p.stem: p for p in sorted(rd.path.glob("*.log"))}
    paths["supervisor"] = rd.supervisor_log
    return paths


def tail_lines(path: Path, lines: int) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:] if lines > 0 else text.splitlines()


def follow_logs(
    paths: dict[str, Path], emit: Callable[[str], None], *, prefix: bool, poll: float = 0.2
) -> Iterator[None]:
    """Emit lines appended to ``paths`` from now on (prefixed ``name |`` when ``prefix``); yields after every poll
    so the caller decides when to stop (Ctrl-C, or a test's deadline)."""
    offsets = {name: (p.stat().st_size if p.exists() else 0) for name, p in paths.items()}
    partial = dict.fromkeys(paths, "")
    while True:
        for name, path in paths.items():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size < offsets[name]:  # truncated or replaced
                offsets[name] = 0
            if size == offsets[name]:
                continue
            with open(path, "rb") as f:
                f.seek(offsets[name])
                data = f.read()
            offsets[name] += len(data)
            *complete, partial[name] = (partial[name] + data.decode(errors="replace")).split("\n")
            for line in complete:
                emit(f"{name:<14}| {line}" if prefix else line)
        yield
        time.sleep(poll)
