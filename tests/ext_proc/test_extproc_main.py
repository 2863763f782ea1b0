"""The command line and the process: startup, bad config, signals, internal errors."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from pathlib import Path

import pytest

from ext_proc.admission import Admission, Admitted
from ext_proc.config import ServiceConfig, load_config
from ext_proc.main import main
from ext_proc.server import Server
from tests.ext_proc.kit import (
    KEY_A,
    TIMEOUT,
    ServiceProcess,
    authz_request,
    config_dict,
    run_service,
    write_config,
)


def test_bad_config_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    doc = config_dict()
    doc["schema_version"] = 7
    path = write_config(tmp_path, doc)
    result = run_service("--config", str(path), "--port", "0")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"meshgen-service: error: {path}: schema_version is 7, this service reads schema_version 1; "
        "rebuild the config with a meshgen that matches this service\n"
    )


def test_missing_config_file_exits_non_zero(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    result = run_service("--config", str(path))
    assert result.returncode == 1
    assert result.stderr == (
        f"meshgen-service: error: {path}: cannot read the config file: No such file or directory\n"
    )


def test_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "the following arguments are required: --config" in capsys.readouterr().err


def test_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--config", str(write_config(tmp_path)), "--port", str(port), "--ledger", str(tmp_path / "l.db")])
    assert code == 1
    assert f"meshgen-service: error: cannot listen on 127.0.0.1:{port}:" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_cleanly_with_open_connection(tmp_path: Path, signum: int) -> None:
    proc = ServiceProcess(write_config(tmp_path)).start()
    try:
        assert proc.lines[0] == f"meshgen-service listening on 127.0.0.1:{proc.port}"
        with socket.create_connection((proc.host, proc.port), timeout=TIMEOUT) as idle:
            idle.sendall(authz_request(b'{"model":"gpt-4o"}', key=KEY_A))
            assert idle.recv(12) == b"HTTP/1.1 200"
            assert proc.signal(signum) == 0  # the idle keep-alive connection does not hold the exit
            idle.settimeout(TIMEOUT)
            rest = b""
            while chunk := idle.recv(4096):  # EOF: the server closed our connection on the way out
                rest += chunk
    finally:
        proc.stop()
    assert not any("Traceback" in line for line in proc.lines), proc.lines


class _BrokenAdmission(Admission):
    def admit(self, key: bytes | None, body: bytes, content_type: bytes | None = None) -> Admitted:
        raise RuntimeError(f"boom while reading {body!r}")


def test_internal_error_is_503_and_logged_without_the_body(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config: ServiceConfig = load_config(write_config(tmp_path))
    logger = logging.getLogger("tests.ext_proc.broken")
    secret = b'{"model":"gpt-4o","messages":[{"content":"SECRET-PROMPT"}]}'

    async def scenario() -> list[bytes]:
        server = Server(config, logger=logger, admission=_BrokenAdmission(config))
        host, port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(authz_request(secret, key=KEY_A) + b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
                first = await asyncio.wait_for(reader.readuntil(b"}}"), TIMEOUT)
                second = await asyncio.wait_for(reader.readuntil(b"ok"), TIMEOUT)
            finally:
                writer.close()
                await writer.wait_closed()
        finally:
            await server.close()
        return [first, second]

    with caplog.at_level(logging.INFO, logger=logger.name):
        first, second = asyncio.run(scenario())
    head, _, body = first.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert json.loads(body) == {
        "error": {
            "message": "The service is temporarily unavailable. Please retry.",
            "type": "server_error",
            "code": "service_unavailable",
        }
    }
    assert second.startswith(b"HTTP/1.1 200 OK\r\n")  # the connection survives an internal error
    records = [json.loads(r.getMessage()) for r in caplog.records]
    assert [(r["event"], r.get("error"), r.get("reason")) for r in records] == [
        ("internal_error", "RuntimeError", None),
        ("request", None, "service_unavailable"),
    ]
    assert any("in admit" in frame for frame in records[0]["stack"])
    assert "SECRET" not in caplog.text and KEY_A not in caplog.text and "boom" not in caplog.text
