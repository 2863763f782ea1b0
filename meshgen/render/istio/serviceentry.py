"""ServiceEntries for external providers: the provider's hosts, reached from the mesh, TLS originated by the
DestinationRule (the application port speaks plain HTTP inside the mesh)."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.istio.common import in_cluster, k8s_name, meta


def service_entry(cluster: ir.ProviderCluster, region: ir.Region) -> dict[str, Any] | None:
    external = [ep for ep in cluster.endpoints if not in_cluster(ep.host)]
    if not external:
        return None
    ports = sorted({ep.port for ep in external})
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": meta(k8s_name(cluster.name), region.name),
        "spec": {
            "hosts": sorted({ep.host for ep in external}),
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "ports": [{"number": p, "name": f"http-{p}", "protocol": "HTTP"} for p in ports],
        },
    }
