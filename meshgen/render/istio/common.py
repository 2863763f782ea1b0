"""Names and metadata shared by the Istio resource families."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir

GATEWAY_NAME = "llm-gateway"
GATEWAY_NODE_PORT = 30080
"""The first region's gateway on the kind node (kind/cluster.yaml publishes it on localhost:8080)."""


def gateway_selector(region: str) -> dict[str, str]:
    """Each region runs its own ingress gateway in its namespace (as the Compose target runs one Envoy a region):
    the Gateway, EnvoyFilter, AuthorizationPolicy and RequestAuthentication select it by this label."""
    return {"meshgen.io/gateway": region}


SERVICE_NAME = "meshgen-service"
SERVICE_IMAGE = "meshgen/service:dev"
"""The images docker-compose.yml builds: ext_proc/Dockerfile and meshgen/lab/Dockerfile."""
MOCK_IMAGE = "meshgen/mocks:dev"
SERVICE_HTTP_PORT = 9000
SERVICE_GRPC_PORT = 9001
ROUTE_HEADER = "x-meshgen-route"
TENANT_HEADER = "x-meshgen-tenant"


def namespace(region: str) -> str:
    return f"ai-lab-{region}"


def meta(name: str, region: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace(region),
        "labels": {"app.kubernetes.io/managed-by": "meshgen"},
        **extra,
    }


def k8s_name(name: str) -> str:
    """`provider.openai.us-east` → `provider-openai-us-east` (a DNS-1123 label)."""
    return name.replace(".", "-")


def in_cluster(host: str) -> bool:
    """A dotless endpoint host (`ollama-east`) is a mock provider run in the cluster; others are external."""
    return "." not in host


def host_of(ep: ir.Endpoint, region: str) -> str:
    return f"{ep.host}.{namespace(region)}.svc.cluster.local" if in_cluster(ep.host) else ep.host


def seconds(ms: int) -> str:
    return f"{ms / 1000:g}s" if ms % 1000 else f"{ms // 1000}s"


def doc_path(region: str, kind: str, name: str) -> str:
    return f"istio/{namespace(region)}/{kind.lower()}-{name}.yaml"
