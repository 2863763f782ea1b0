"""Run the data-plane service (``python -m ext_proc``) as a child process and read what it logs.

`meshgen lab up` runs it on the `service` port of the `local` target; the tests run it on a free port::

    with ServiceProcess(Path("generated/local/service.json"), port=18000) as service:
        ...Envoy's ext_authz reaches 127.0.0.1:service.port...

The service prints ``meshgen-service listening on HOST:PORT`` to stderr once it accepts connections; ``start()``
waits for that line (bounded) and learns the port from it, so ``port=0`` works. Every stderr line is kept in
``lines`` and, with ``log_path``, also written to that file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from meshgen.lab.lifecycle import Managed, terminate

__all__ = ["READY_PREFIX", "ServiceError", "ServiceProcess"]

READY_PREFIX = "meshgen-service listening on "


class ServiceError(RuntimeError):
    """The data-plane service did not start, or did not log what was awaited, in time."""


class ServiceProcess(Managed):
    """``python -m ext_proc --config CONFIG --host HOST --port PORT [EXTRA_ARGS]``; stderr read in a thread."""

    def __init__(
        self,
        config: Path,
        extra_args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout: float = 10.0,
        log_path: Path | None = None,
        cwd: Path | None = None,
        process_group: int | None = None,
        grpc_port: int | None = None,
        ledger: Path | None = None,
    ) -> None:
        self.config = config
        self.grpc_port = grpc_port
        """Where the service takes Envoy's access log (usage); None: no accounting of usage."""
        self.ledger = ledger if ledger is not None else config.with_name("meshgen-ledger.sqlite")
        """The SQLite ledger (when the config's store is sqlite); beside the config unless given."""
        self.extra_args = tuple(extra_args)
        self.host = host
        self.port = port
        self.timeout = timeout
        """Bound, in seconds, of every wait: readiness, ``wait_for_line``, each step of ``stop``."""
        self.log_path = log_path
        self.cwd = cwd
        self.process_group = process_group
        """0: a process group of its own, so a terminal's Ctrl-C reaches only the parent, which stops it in order."""
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def command(self) -> list[str]:
        args = ["--config", str(self.config), "--host", self.host, "--port", str(self.port)]
        args += ["--ledger", str(self.ledger)]
        if self.grpc_port is not None:
            args += ["--grpc-port", str(self.grpc_port)]
        return [sys.executable, "-m", "ext_proc", *args, *self.extra_args]

    def start(self) -> ServiceProcess:
        if self._proc is not None:
            raise ServiceError("ServiceProcess already started")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            process_group=self.process_group,
        )
        self._reader = threading.Thread(target=self._read, name="meshgen-service-stderr", daemon=True)
        self._reader.start()
        try:
            ready = self.wait_for_line(lambda line: line.startswith(READY_PREFIX))
        except BaseException:
            self.stop()
            raise
        self.port = int(ready.rsplit(":", 1)[1])
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        log: TextIO | None = None if self.log_path is None else open(self.log_path, "a", encoding="utf-8")
        try:
            for raw in self._proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        finally:
            if log is not None:
                log.close()
            with self._cond:
                self._cond.notify_all()

    def wait_for_line(self, predicate: Callable[[str], bool], start: int = 0) -> str:
        """The first stderr line from index ``start`` on that matches; ``ServiceError`` after ``timeout``."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                exited = self._proc is None or self._proc.poll() is not None
                if remaining <= 0 or (exited and not (self._reader and self._reader.is_alive())):
                    tail = "\n".join(self.lines[-40:])
                    why = "exited" if exited else f"nothing matching within {self.timeout}s"
                    raise ServiceError(f"data-plane service {why}; stderr so far:\n{tail}")
                self._cond.wait(min(remaining, 0.1))

    def refusal_logs(self, start: int = 0) -> list[dict[str, Any]]:
        """The JSON log lines (one per refusal) from index ``start`` on."""
        with self._cond:
            lines = self.lines[start:]
        return [json.loads(line) for line in lines if line.startswith("{")]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def signal(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` and return the exit code (bounded wait)."""
        if self._proc is None:
            raise ServiceError("ServiceProcess not started")
        self._proc.send_signal(signum)
        return self._proc.wait(timeout=self.timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code (None if it never started)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        terminate(proc, self.timeout)
        if self._reader is not None:
            self._reader.join(timeout=self.timeout)
            self._reader = None
        if proc.stderr is not None:
            proc.stderr.close()
        return proc.returncode
