"""ServiceEntries: external providers' hosts, reached from the mesh (TLS originated by the DestinationRule: the
application port speaks plain HTTP inside the mesh), and one name for a cluster of several hosts, listing its
endpoints with their weights."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.istio.common import host_of, in_cluster, k8s_name, meta
from meshgen.render.istio.virtualservice import cluster_host


def service_entry(gw: ir.Gateway, cluster: ir.ProviderCluster, region: ir.Region) -> dict[str, Any] | None:
    hosts = {ep.host for ep in cluster.endpoints}
    external = [ep for ep in cluster.endpoints if not in_cluster(ep.host)]
    ports = sorted({ep.port for ep in cluster.endpoints})
    spec: dict[str, Any]
    if len(hosts) > 1:
        spec = {
            "hosts": [cluster_host(gw, cluster.name)],
            "location": "MESH_EXTERNAL" if external else "MESH_INTERNAL",
            "resolution": "DNS",
            "ports": [{"number": p, "name": f"http-{p}", "protocol": "HTTP"} for p in ports],
            "endpoints": [
                {
                    "address": host_of(ep, cluster.region),
                    "ports": {f"http-{ep.port}": ep.port},
                    "weight": ep.weight,
                }
                for ep in cluster.endpoints
            ],
        }
    elif external:
        spec = {
            "hosts": sorted({ep.host for ep in external}),
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "ports": [{"number": p, "name": f"http-{p}", "protocol": "HTTP"} for p in ports],
        }
    else:
        return None
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": meta(k8s_name(cluster.name), region.name),
        "spec": spec,
    }
