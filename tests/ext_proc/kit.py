"""Helpers for the data-plane service tests: a config, the service as a subprocess, a raw HTTP reader.

The service runner itself is product code (``meshgen.lab.service``: `meshgen lab up` runs it too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

from meshgen.lab.service import READY_PREFIX, ServiceProcess
from tests.support.client import Reply

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0  # seconds; every wait in these tests is bounded by this

__all__ = [
    "KEY_A",
    "KEY_A2",
    "KEY_B",
    "READY_PREFIX",
    "ROOT",
    "TIMEOUT",
    "Reply",
    "ServiceProcess",
    "authz_request",
    "config_dict",
    "read_response",
    "run_service",
    "sha256_hex",
    "write_config",
]

KEY_A = "sk-team-a-0123456789"
KEY_A2 = "sk-team-a-second-key"
KEY_B = "sk-team-b-abcdef"


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config_dict() -> dict[str, Any]:
    """A small valid service.json: team-a may use the GPT models, team-b only llama3."""
    return {
        "schema_version": 1,
        "policy": "ai-chaos-lab",
        "failure_mode": "closed",
        "models": {
            "gpt-4o": {
                "provider": "openai",
                "upstream_name": "gpt-4o",
                "downgrade": "gpt-4o-mini",
                "max_tokens_default": 1024,
                "price": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
            },
            "gpt-4o-mini": {
                "provider": "openai",
                "upstream_name": "gpt-4o-mini",
                "downgrade": None,
                "max_tokens_default": 1024,
                "price": None,
            },
            "llama3": {"provider": "ollama", "upstream_name": "llama3:8b", "max_tokens_default": 512},
        },
        "tenants": {
            "team-a": {
                "key_hashes": [sha256_hex(KEY_A), sha256_hex(KEY_A2)],
                "models": ["gpt-4o", "gpt-4o-mini"],
                "limits": {"rpm": 600, "tpm": 100000, "tpd": None, "usd_per_day": 50.0},
                "alerts_at": [0.8, 0.9, 1.0],
                "non_critical": {"header": "x-priority", "value": "low", "queue_max_wait_ms": 20000},
            },
            "team-b": {"key_hashes": [sha256_hex(KEY_B)], "models": ["llama3"], "non_critical": None},
        },
    }


def write_config(directory: Path, doc: dict[str, Any] | None = None) -> Path:
    path = directory / "service.json"
    path.write_text(json.dumps(config_dict() if doc is None else doc))
    return path


def run_service(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ext_proc ARGS`` expecting it to exit by itself (bad config, usage error)."""
    return subprocess.run(
        [sys.executable, "-m", "ext_proc", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def read_response(stream: BinaryIO) -> Reply:
    """One HTTP/1.1 response with a content-length body, read from a buffered socket file."""
    status_line = stream.readline()
    if not status_line:
        raise EOFError("connection closed before a response")
    version, status, _reason = status_line.decode("latin-1").split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers: dict[str, str] = {}
    while True:
        line = stream.readline().decode("latin-1")
        if line in ("\r\n", ""):
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers["content-length"]))
    return Reply(int(status), headers, body)


def authz_request(body: bytes | None = None, *, key: str | None = None, bearer: bool = True, extra: str = "") -> bytes:
    """Bytes of one ``POST /authz/v1/chat/completions`` as Envoy's ext_authz sends it."""
    lines = ["POST /authz/v1/chat/completions HTTP/1.1", "host: ext-authz", "content-type: application/json"]
    if key is not None:
        lines.append(f"authorization: Bearer {key}" if bearer else f"x-api-key: {key}")
    payload = b"" if body is None else body
    lines.append(f"content-length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode() + payload


class LogLines(logging.Handler):
    """The service's JSON log lines, captured from a logger of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events += [json.loads(line) for line in record.getMessage().splitlines()]  # a batch: a line each

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


def capture_log(level: int = logging.INFO) -> tuple[logging.Logger, LogLines]:
    log = logging.getLogger(f"test-service-{id(object())}")
    log.propagate = False
    log.setLevel(level)
    lines = LogLines()
    log.addHandler(lines)
    return log, lines
