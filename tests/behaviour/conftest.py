"""The gateway as users run it: `meshgen build` output for tests/behaviour/policy.yaml, with free ports, run by
the real Envoy in front of the real data-plane service and mock providers that record what they receive."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshgen import output
from meshgen.compile import compile_gateway, render_all
from meshgen.ir.model import Gateway, Ports
from meshgen.lab.service import ServiceProcess
from tests.support import EnvoyProcess, MockUpstream, free_ports, require_binary
from tests.support.client import Reply, post

POLICY = Path(__file__).with_name("policy.yaml")
TEAM_KEY = "sk-test-team"
DEV_KEY = "sk-test-dev"


@dataclass
class Running:
    gw: Gateway
    envoy: EnvoyProcess
    upstream: MockUpstream
    port: int
    ledger: Path
    """The service's SQLite ledger: tests read what was counted straight from it."""
    service: ServiceProcess | None
    grpc_port: int
    config: Path

    def post(
        self,
        body: Mapping[str, Any] | bytes,
        *,
        key: str | None = TEAM_KEY,
        headers: Mapping[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None,
    ) -> Reply:
        auth = {"authorization": f"Bearer {key}"} if key is not None else {}
        return post(self.port, body, {**auth, **(headers or {})}, conn=conn)


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def with_free_ports(gw: Gateway, fixed: Mapping[str, int]) -> Gateway:
    names = [name for name, _ in gw.ports.by_name if name not in fixed]
    ports = dict(zip(names, free_ports(len(names)), strict=True)) | dict(fixed)
    return gw.model_copy(update={"ports": Ports(by_name=tuple(ports.items()))})


@contextmanager
def running_gateway(gw: Gateway, out: Path, *, service: bool = True) -> Iterator[Running]:
    """`gw` built as `meshgen build` would, on free ports, run by the real Envoy before the real service (or, with
    `service=False`, before a port where nothing answers) and mock providers."""
    require_binary("envoy")
    out.mkdir(parents=True, exist_ok=True)
    config = out / "service.json"
    config.write_text(json.dumps(next(d for d in render_all(gw) if d.path == "local/service.json").data))
    with ExitStack() as stack:
        grpc_port = free_ports(1)[0]
        process = ServiceProcess(config, grpc_port=grpc_port, ledger=out / "ledger.sqlite") if service else None
        port = stack.enter_context(process).port if process else free_ports(1)[0]
        gw = with_free_ports(gw, {"service": port, "service.grpc": grpc_port})
        output.write(out / "gen", output.serialize(render_all(gw), source=POLICY.name, version="test"))
        endpoints = {e.name: gw.ports.of(e.name) for c in gw.clusters for e in c.endpoints}
        upstream = stack.enter_context(MockUpstream(endpoints))
        envoy = stack.enter_context(EnvoyProcess(out / "gen/local/envoy/us-east.yaml", gw.ports.of("admin.us-east")))
        listener = gw.ports.of("listener.us-east")
        yield Running(gw, envoy, upstream, listener, out / "ledger.sqlite", process, grpc_port, config)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_gateway(compile_gateway(POLICY), tmp_path_factory.mktemp("generated")) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_upstream(request: pytest.FixtureRequest) -> None:
    if "lab" in request.fixturenames:
        lab: Running = request.getfixturevalue("lab")
        lab.upstream.reset()
        lab.upstream.clear()
