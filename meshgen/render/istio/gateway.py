"""Gateway: the region's ingress listener, TLS per the region's auth."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.istio.common import GATEWAY_NAME, gateway_selector, meta


def gateway(region: ir.Region) -> dict[str, Any]:
    if region.auth == "mtls":
        server: dict[str, Any] = {
            "port": {"number": 443, "name": "https", "protocol": "HTTPS"},
            "tls": {"mode": "MUTUAL", "credentialName": f"llm-gateway-{region.name}"},
        }
    else:
        server = {"port": {"number": 80, "name": "http", "protocol": "HTTP"}}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": meta(GATEWAY_NAME, region.name),
        "spec": {"selector": gateway_selector(region.name), "servers": [{**server, "hosts": ["*"]}]},
    }
