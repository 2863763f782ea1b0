"""DestinationRules, one per provider cluster a region uses: outlier detection, connection pool, consistent hash
(a model's affinity header), locality LB with failover to the other regions, TLS origination."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.istio.common import k8s_name, meta, seconds
from meshgen.render.istio.virtualservice import cluster_host


def destination_rule(gw: ir.Gateway, region: ir.Region, cluster: ir.ProviderCluster) -> dict[str, Any]:
    affinity = sorted({m.affinity_header for m in gw.models if m.affinity_header and m.provider == cluster.provider})
    lb: dict[str, Any] = (
        {"consistentHash": {"httpHeaderName": affinity[0]}} if affinity else {"simple": "LEAST_REQUEST"}
    )
    others = [r.name for r in gw.regions if r.name != region.name]
    if cluster.region == region.name and others:
        lb["localityLbSetting"] = {
            "enabled": True,
            "failover": [{"from": region.name, "to": other} for other in others],
        }
    policy: dict[str, Any] = {
        "connectionPool": {
            "tcp": {
                "maxConnections": cluster.breakers.max_connections,
                "connectTimeout": seconds(cluster.connect_timeout_ms),
            },
            "http": {
                "http1MaxPendingRequests": cluster.breakers.max_pending,
                "http2MaxRequests": cluster.breakers.max_requests,
                "maxRetries": cluster.breakers.max_retries,
            },
        },
        "outlierDetection": {
            "consecutive5xxErrors": cluster.outlier.consecutive_5xx,
            "interval": seconds(cluster.outlier.interval_ms),
            "baseEjectionTime": seconds(cluster.outlier.ejection_ms),
            "maxEjectionPercent": cluster.outlier.max_ejection_percent,
        },
        "loadBalancer": lb,
    }
    host = cluster_host(gw, cluster.name)
    if cluster.endpoints[0].tls:
        policy["tls"] = {"mode": "SIMPLE", "sni": cluster.endpoints[0].host}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": meta(k8s_name(cluster.name), region.name),
        "spec": {"host": host, "trafficPolicy": policy},
    }
