"""A real redis-server on a free loopback port, without persistence, for the ledger tests."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def redis_server(workdir: Path, port: int | None = None) -> Iterator[int]:
    """Start redis-server (on `port`, else a free one), wait for PING, yield the port; stop it on exit."""
    binary = require_binary("redis-server")
    port = port if port is not None else free_ports(1)[0]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--logfile", str(workdir / "redis.log")]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers_ping(port):
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {_log_tail(workdir)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S}s: {_log_tail(workdir)}")
            time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _log_tail(workdir: Path) -> str:
    log = workdir / "redis.log"
    return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
