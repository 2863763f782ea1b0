"""Core Kubernetes kinds for the Istio target: the region Namespaces (sidecar injection on), the data-plane service
and the mock providers (Deployment, Service, ServiceAccount; the service's config in a ConfigMap). The images are
the ones docker-compose.yml builds (ext_proc/Dockerfile, meshgen/lab/Dockerfile)."""

from __future__ import annotations

import json
from typing import Any

from meshgen.ir import model as ir
from meshgen.render.istio.common import (
    GATEWAY_NAME,
    GATEWAY_NODE_PORT,
    MOCK_IMAGE,
    SERVICE_GRPC_PORT,
    SERVICE_HTTP_PORT,
    SERVICE_IMAGE,
    SERVICE_NAME,
    gateway_selector,
    in_cluster,
    meta,
    namespace,
)

MOCK_ADMIN_PORT = 11435
ISTIO_AGENT_METRICS_PORT = 15020


def namespace_doc(region: ir.Region) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace(region.name), "labels": {"istio-injection": "enabled"}},
    }


def _labels(app: str) -> dict[str, str]:
    return {"app": app}


def service_account(name: str, region: ir.Region) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name, region.name)}


def service(name: str, region: ir.Region, ports: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, region.name),
        "spec": {
            "selector": _labels(name),
            "ports": [{"name": pname, "port": port, "targetPort": port} for pname, port in ports],
        },
    }


def _probe(port: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 5}


def scraped(port: int, path: str) -> dict[str, str]:
    """The pod annotations a Prometheus with Kubernetes pod discovery scrapes by (the usual `prometheus.io/*`)."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": path}


def deployment(
    name: str,
    region: ir.Region,
    container: dict[str, Any],
    volumes: list[Any],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    pod: dict[str, Any] = {"serviceAccountName": name, "containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    template_meta: dict[str, Any] = {"labels": _labels(name)}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, region.name),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": _labels(name)},
            "template": {"metadata": template_meta, "spec": pod},
        },
    }


def ingress_gateway(region: ir.Region, *, first: bool) -> list[dict[str, Any]]:
    """The region's ingress gateway, deployed with Istio's gateway injection (image `auto`); the `first` one (the
    smoke request's) is a NodePort on 30080 for kind."""
    name = f"{GATEWAY_NAME}-ingress"
    labels = {**gateway_selector(region.name), "istio": "ingressgateway", "sidecar.istio.io/inject": "true"}
    pod = {
        "serviceAccountName": name,
        "containers": [{"name": "istio-proxy", "image": "auto"}],
    }
    port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": 8080}
    if region.auth == "mtls":
        port = {"name": "https", "port": 443, "targetPort": 8443}
    if first:
        port["nodePort"] = GATEWAY_NODE_PORT
    service_spec: dict[str, Any] = {"selector": gateway_selector(region.name), "ports": [port]}
    if first:
        service_spec["type"] = "NodePort"
    return [
        service_account(name, region),
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, region.name), "spec": service_spec},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(name, region.name),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": gateway_selector(region.name)},
                "template": {
                    # Istio's agent serves the gateway Envoy's stats (merged) on 15020.
                    "metadata": {
                        "annotations": {
                            "inject.istio.io/templates": "gateway",
                            **scraped(ISTIO_AGENT_METRICS_PORT, "/stats/prometheus"),
                        },
                        "labels": labels,
                    },
                    "spec": pod,
                },
            },
        },
    ]


def service_config_map(region: ir.Region, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(f"{SERVICE_NAME}-config", region.name),
        "data": {"service.json": json.dumps(config, indent=2, sort_keys=False) + "\n"},
    }


def data_plane_service(region: ir.Region, gw: ir.Gateway) -> list[dict[str, Any]]:
    keys = sorted({c.key_env for c in gw.clusters})
    container = {
        "name": SERVICE_NAME,
        "image": SERVICE_IMAGE,
        "args": [
            "python",
            "-m",
            "ext_proc",
            "--config",
            "/etc/meshgen/service.json",
            "--host",
            "0.0.0.0",
            "--port",
            str(SERVICE_HTTP_PORT),
            "--grpc-port",
            str(SERVICE_GRPC_PORT),
            "--ledger",
            "/var/lib/meshgen/ledger.sqlite",
        ],
        "ports": [
            {"name": "http", "containerPort": SERVICE_HTTP_PORT},
            {"name": "grpc", "containerPort": SERVICE_GRPC_PORT},
        ],
        "env": [
            {"name": k, "valueFrom": {"secretKeyRef": {"name": "provider-keys", "key": k, "optional": True}}}
            for k in keys
        ],
        "readinessProbe": _probe(SERVICE_HTTP_PORT),
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/meshgen", "readOnly": True},
            {"name": "ledger", "mountPath": "/var/lib/meshgen"},
        ],
    }
    volumes = [
        {"name": "config", "configMap": {"name": f"{SERVICE_NAME}-config"}},
        {"name": "ledger", "emptyDir": {}},
    ]
    return [
        service_account(SERVICE_NAME, region),
        service(SERVICE_NAME, region, [("http", SERVICE_HTTP_PORT), ("grpc", SERVICE_GRPC_PORT)]),
        deployment(SERVICE_NAME, region, container, volumes, scraped(SERVICE_HTTP_PORT, "/metrics")),
    ]


def dashboards_config_map(region: ir.Region, dashboards: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Grafana's dashboards for the region's namespace, found by Grafana's dashboard sidecar by its label."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta("meshgen-dashboards", region.name), "labels": {"grafana_dashboard": "1"}},
        "data": {f"{uid}.json": json.dumps(board, indent=2) + "\n" for uid, board in dashboards},
    }


def mock_providers(gw: ir.Gateway, region: ir.Region) -> list[dict[str, Any]]:
    """A mock per in-cluster endpoint host (`ollama-east`) of this region's clusters."""
    docs: list[dict[str, Any]] = []
    for c in gw.clusters:
        if c.region != region.name:
            continue
        for ep in c.endpoints:
            if not in_cluster(ep.host):
                continue
            container = {
                "name": "mock",
                "image": MOCK_IMAGE,
                "args": [
                    "python",
                    "-m",
                    "meshgen.lab.providers",
                    "--listen",
                    f"{ep.name}={ep.port}",
                    "--host",
                    "0.0.0.0",
                    "--admin-port",
                    str(MOCK_ADMIN_PORT),
                ],
                "ports": [
                    {"name": "http", "containerPort": ep.port},
                    {"name": "admin", "containerPort": MOCK_ADMIN_PORT},
                ],
                "readinessProbe": _probe(MOCK_ADMIN_PORT),
            }
            docs += [
                service_account(ep.host, region),
                service(ep.host, region, [("http", ep.port)]),
                deployment(ep.host, region, container, []),
            ]
    return docs
