"""Istio target: `generated/istio/ai-lab-<region>/<kind>-<name>.yaml`, one resource per file, plus a
`kustomization.yaml` listing them all. Pure: IR → documents."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render import k8s
from meshgen.render.document import Document
from meshgen.render.extproc_config import service_config
from meshgen.render.grafana import dashboards
from meshgen.render.istio.common import doc_path, namespace
from meshgen.render.istio.destinationrule import destination_rule
from meshgen.render.istio.envoyfilter import envoy_filter
from meshgen.render.istio.gateway import gateway
from meshgen.render.istio.security import (
    authorization_policy,
    peer_authentication,
    request_authentication,
)
from meshgen.render.istio.serviceentry import service_entry
from meshgen.render.istio.telemetry import telemetry
from meshgen.render.istio.virtualservice import check_fault_hops, fault_hops, model_routes

__all__ = ["istio_resources", "render_istio"]


def _smoke_region(gw: ir.Gateway) -> ir.Region:
    """The region kind publishes on localhost:8080: the first with plain API keys (curl needs no client cert)."""
    return next((r for r in gw.regions if r.auth == "api-key"), gw.regions[0])


def _region_resources(gw: ir.Gateway, region: ir.Region) -> list[dict[str, Any]]:
    used = sorted({c for _, chain in region.chains for c in chain})
    clusters = [gw.cluster(c) for c in used]
    entries = [se for c in clusters if (se := service_entry(gw, c, region)) is not None]
    jwt = request_authentication(region)
    services = [model_routes(gw, region), *fault_hops(gw, region)]
    check_fault_hops(services, source=gw.source)
    return [
        k8s.namespace_doc(region),
        k8s.service_config_map(region, service_config(gw)),
        *k8s.data_plane_service(region, gw),
        *k8s.mock_providers(gw, region),
        *k8s.ingress_gateway(region, first=region == _smoke_region(gw)),
        gateway(region),
        *services,
        *(destination_rule(gw, region, c) for c in clusters),
        *entries,
        peer_authentication(region),
        *([jwt] if jwt else []),
        authorization_policy(gw, region),
        envoy_filter(gw, region),
        telemetry(gw, region),
        k8s.dashboards_config_map(region, dashboards(gw, (region,))),
    ]


def istio_resources(gw: ir.Gateway) -> list[tuple[str, dict[str, Any]]]:
    """(region, resource) for every resource, in a fixed order."""
    return [(r.name, res) for r in gw.regions for res in _region_resources(gw, r)]


def _path(region: str, res: dict[str, Any]) -> str:
    if res["kind"] == "Namespace":
        return f"istio/{namespace(region)}/namespace.yaml"
    return doc_path(region, res["kind"], res["metadata"]["name"])


def render_istio(gw: ir.Gateway) -> list[Document]:
    docs = [Document(_path(region, res), res) for region, res in istio_resources(gw)]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [d.path.removeprefix("istio/") for d in docs],
    }
    return [*docs, Document("istio/kustomization.yaml", kustomization)]
