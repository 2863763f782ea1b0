"""One Envoy bootstrap per region and target."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.document import Document
from meshgen.render.envoy.clusters import all_clusters
from meshgen.render.envoy.filters.tracing import tracing_runtime
from meshgen.render.envoy.listeners import all_listeners
from meshgen.render.envoy.target import Placement, Target

MAX_DOWNSTREAM_CONNECTIONS = 50_000
"""Beyond this Envoy refuses new client connections rather than running out of file descriptors."""


def bootstrap(gw: ir.Gateway, target: Target, region: ir.Region) -> dict[str, Any]:
    place = Placement(gw, target, region.name)
    return {
        "node": {
            "id": f"meshgen.{gw.name}.{region.name}",
            "cluster": f"gateway.{region.name}",
            "locality": {"region": region.name},
        },
        "admin": {"address": place.admin().socket()},
        # The admin layer lets `meshgen chaos` switch faults with /runtime_modify, no restart.
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": tracing_runtime(gw.tracing)},
                {"name": "admin", "admin_layer": {}},
            ]
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3"
                        ".DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": all_listeners(gw, place, region),
            "clusters": all_clusters(gw, place, region),
        },
    }


def render_envoy(gw: ir.Gateway, target: Target) -> list[Document]:
    return [Document(f"{target}/envoy/{r.name}.yaml", bootstrap(gw, target, r)) for r in gw.regions]
