"""A real redis-server on a free loopback port, without persistence, for the ledger tests.

:func:`redis_server` runs one for a ``with`` block; :class:`RedisServer` can also be stopped and started again on
the same port mid-test (Redis down, then back), keeping its data across the restart when asked to.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from tests.support.ports import free_ports
from tests.support.tools import require_binary

START_TIMEOUT_S = 10.0


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """redis-server on `port` (else a free one) in `workdir`: :meth:`start`, :meth:`stop`, and again."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_ports(1)[0]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        """Start and wait for PING (bounded); a dump left by ``stop(save=True)`` is loaded. Returns the port."""
        binary = require_binary("redis-server")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._proc = proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers_ping(self.port):
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {_log_tail(self.workdir)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not answer PING within {START_TIMEOUT_S}s: {_log_tail(self.workdir)}"
                )
            time.sleep(0.02)
        return self.port

    def stop(self, *, save: bool = False) -> None:
        """Stop it (SIGTERM, then SIGKILL after 5 s); with `save`, write its data first for the next start."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if save:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(b"SAVE\r\n")
                assert sock.recv(64).startswith(b"+OK"), "redis-server did not SAVE"
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextmanager
def redis_server(workdir: Path, port: int | None = None) -> Iterator[int]:
    """Start redis-server (on `port`, else a free one), wait for PING, yield the port; stop it on exit."""
    with RedisServer(workdir, port) as server:
        yield server.port


def _log_tail(workdir: Path) -> str:
    log = workdir / "redis.log"
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
