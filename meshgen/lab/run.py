"""The lab in one process: one policy's gateway running on this machine from ``generated/local/`` for as long as
a ``with`` block lasts (`meshgen lab demo` without a running lab, and tests). `meshgen lab up` runs the same parts
as supervised background processes instead (``control.py``, ``supervisor.py``).

    with Lab(Path("policies/lab.yaml"), regions=["us-east"]) as lab:
        lab.listener_url("us-east")      # http://127.0.0.1:18005

``start()`` rebuilds ``generated/`` when it is stale (the library behind `meshgen build`), then starts, each
bounded by ``ready_timeout``: mock providers on every provider endpoint port, the data-plane service on the
``service`` port, and one real Envoy per region on ``generated/local/envoy/<region>.yaml``. Every port comes from
the IR (``lab.base_port`` in the policy). ``stop()`` (also on leaving the ``with``) stops them in reverse order,
each with SIGTERM, then SIGKILL. Logs go to ``run_dir`` (default ``.lab/`` in the working directory):
``service.log`` and ``envoy-<region>.log``, overwritten by the next run.

Anything that keeps the lab from starting (a port in use, no envoy binary, a part not ready in time) raises
``LabError`` (a ``MeshgenError``, exit 1) naming the part and, where there is one, its log.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import time
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from meshgen import __version__, output
from meshgen.compile import build
from meshgen.errors import MeshgenError
from meshgen.ir.model import Gateway
from meshgen.lab.envoy import EnvoyError, EnvoyProcess
from meshgen.lab.lifecycle import Managed
from meshgen.lab.providers import MockProviders
from meshgen.lab.service import ServiceError, ServiceProcess

__all__ = [
    "DEFAULT_RUN_DIR",
    "BuildResult",
    "Lab",
    "LabError",
    "current_digest",
    "ensure_built",
    "local_digest",
    "ports_in_use",
    "select_regions",
    "signals_interrupt",
]

DEFAULT_RUN_DIR = Path(".lab")
HOST = "127.0.0.1"


class LabError(MeshgenError):
    """The lab could not start: a port in use, no envoy binary, a part not ready in time."""

    exit_code: ClassVar[int] = 1


@dataclass(frozen=True)
class BuildResult:
    gateway: Gateway
    changed: tuple[str, ...]
    """Files of ``generated/`` that were rewritten because they were stale (empty: it was up to date)."""
    digest: str = ""
    """``local_digest`` of the build: tells whether a running lab runs this build."""


def local_digest(files: Mapping[str, str]) -> str:
    """sha256 over the ``local/`` files of a build (what the lab runs), by path."""
    h = hashlib.sha256()
    for path in sorted(p for p in files if p.startswith("local/")):
        h.update(f"{path}\0{files[path]}\0".encode())
    return h.hexdigest()


def current_digest(policy: Path) -> str:
    """``local_digest`` of what `meshgen build POLICY` would write now (nothing is written)."""
    return local_digest(build(policy, version=__version__)[1])


def ensure_built(policy: Path, generated: Path) -> BuildResult:
    """What `meshgen build POLICY -o GENERATED` does, but only when ``generated`` differs from what it would write."""
    gateway, files = build(policy, version=__version__)
    changed = output.drift(generated, files)
    if changed:
        output.write(generated, files)
    return BuildResult(gateway, tuple(changed), local_digest(files))


def ports_in_use(ports: Iterable[tuple[str, int]]) -> list[str]:
    """``"18006 (listener.us-east)"`` for each of ``ports`` that cannot be bound on ``HOST`` right now."""
    busy: list[str] = []
    for name, port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                busy.append(f"{port} ({name})")
    return busy


def select_regions(gateway: Gateway, requested: Sequence[str], policy: Path) -> tuple[str, ...]:
    """``requested`` in the policy's order (every region when empty); ``LabError`` naming an unknown one."""
    known = tuple(r.name for r in gateway.regions)
    unknown = [r for r in requested if r not in known]
    if unknown:
        raise LabError(f"{policy}: no region {', '.join(map(repr, unknown))}; regions: {', '.join(known)}")
    return tuple(r for r in known if r in requested) if requested else known


class Lab(Managed):
    """The gateway of ``policy`` on loopback; a context manager (``start()`` / ``stop()``)."""

    def __init__(
        self,
        policy: Path,
        *,
        generated: Path = Path("generated"),
        regions: Sequence[str] = (),
        run_dir: Path = DEFAULT_RUN_DIR,
        ready_timeout: float = 20.0,
        envoy_log_level: str = "warn",
    ) -> None:
        self.policy = policy
        self.generated = generated
        self.requested_regions = tuple(regions)
        """Regions to run; empty means every region of the policy."""
        self.run_dir = run_dir
        self.ready_timeout = ready_timeout
        self.envoy_log_level = envoy_log_level
        self.build: BuildResult | None = None
        self.providers: MockProviders | None = None
        self.service: ServiceProcess | None = None
        self.envoys: dict[str, EnvoyProcess] = {}
        self._stack: contextlib.ExitStack | None = None

    # ---- what runs where -------------------------------------------------------------------------------
    @property
    def gateway(self) -> Gateway:
        if self.build is None:
            raise LabError("the lab is not started")
        return self.build.gateway

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(self.envoys)

    def listener_url(self, region: str) -> str:
        return f"http://{HOST}:{self.gateway.ports.of(f'listener.{region}')}"

    def admin_url(self, region: str) -> str:
        return f"http://{HOST}:{self.gateway.ports.of(f'admin.{region}')}"

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Lab:
        if self._stack is not None:
            raise LabError("the lab is already started")
        self.build = ensure_built(self.policy, self.generated)
        gateway = self.build.gateway
        regions = select_regions(gateway, self.requested_regions, self.policy)
        endpoints = {e.name: gateway.ports.of(e.name) for c in gateway.clusters for e in c.endpoints}
        envoy_ports = [
            (name, port)
            for name, port in gateway.ports.by_name
            for region in regions
            if name in (f"listener.{region}", f"admin.{region}") or name.startswith(f"chaos.{region}.")
        ]
        service_ports = [(name, gateway.ports.of(name)) for name in ("service", "service.grpc")]
        busy = ports_in_use([*service_ports, *endpoints.items(), *envoy_ports])
        if busy:
            raise LabError(
                f"port(s) in use on {HOST}: {', '.join(busy)}; is another `meshgen lab up` running? "
                f"Stop it, or move the lab with `lab.base_port` in {self.policy}."
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        local = self.generated / "local"
        stack = contextlib.ExitStack()
        self._stack = stack
        try:
            self.providers = stack.enter_context(MockProviders(endpoints))
            service_log = self.run_dir / "service.log"
            service_log.write_text("")
            self.service = stack.enter_context(
                ServiceProcess(
                    local / "service.json",
                    host=HOST,
                    port=gateway.ports.of("service"),
                    grpc_port=gateway.ports.of("service.grpc"),
                    ledger=self.run_dir / "ledger.sqlite",
                    timeout=self.ready_timeout,
                    log_path=service_log,
                    process_group=0,
                )
            )
            for region in regions:
                self.envoys[region] = stack.enter_context(
                    EnvoyProcess(
                        local / "envoy" / f"{region}.yaml",
                        gateway.ports.of(f"admin.{region}"),
                        log_level=self.envoy_log_level,
                        ready_timeout=self.ready_timeout,
                        log_path=self.run_dir / f"envoy-{region}.log",
                        process_group=0,
                    )
                )
        except (EnvoyError, ServiceError, RuntimeError, OSError) as error:
            self.stop()
            raise LabError(f"the lab did not start: {error}\n(logs in {self.run_dir}/)") from error
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every part, Envoys first, then the service, then the providers (each SIGTERM, then SIGKILL)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self.envoys = {}
        self.service = None
        self.providers = None

    def exited(self) -> list[str]:
        """The parts that are no longer running (none while the lab is healthy)."""
        gone = [f"envoy {region}" for region, envoy in self.envoys.items() if not envoy.running]
        if self.service is not None and not self.service.running:
            gone.append("data-plane service")
        return gone

    def wait(self, *, poll: float = 0.5) -> list[str]:
        """Block until some part exits on its own; return which (a signal interrupts the wait as usual)."""
        while not (gone := self.exited()):
            time.sleep(poll)
        return gone


def _interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Inside, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` as Ctrl-C does, so ``with Lab(...)`` still stops
    every part (they run in process groups of their own and would outlive us otherwise). Main thread only."""
    handled = (signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, _interrupt) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
