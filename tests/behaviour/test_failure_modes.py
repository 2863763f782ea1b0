"""The data-plane service down: `failure_mode: closed` refuses with an OpenAI-style 503, `open` lets traffic flow."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshgen.compile import compile_gateway
from tests.behaviour.conftest import POLICY, chat, running_gateway


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_service_down(tmp_path: Path, mode: str) -> None:
    gw = compile_gateway(POLICY)
    gw = gw.model_copy(update={"service": gw.service.model_copy(update={"failure_mode": mode})})
    with running_gateway(gw, tmp_path, service=False) as lab:
        reply = lab.post(chat("failover-model"))
        if mode == "closed":
            assert reply.status == 503
            assert reply.headers["content-type"] == "application/json"
            assert reply.json()["error"]["code"] == "admission_unavailable"
            assert lab.upstream.count() == 0
        else:
            assert reply.status == 200, reply.body
            assert reply.headers["x-served-by"] == "provider.primary.us-east.ep0"
            assert "authorization" not in lab.upstream.requests()[0].headers
            # Unaccounted traffic is visible: Envoy counts every request let through without admission.
            assert lab.envoy.stat("http.gateway_us-east.ext_authz.failure_mode_allowed") == 1
