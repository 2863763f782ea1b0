"""Scrape configs: every Envoy's admin ``/stats/prometheus`` (with a ``region`` label), the data-plane service's
``/metrics`` and, in the lab, the supervisor's. The mock providers serve no metrics, so nothing scrapes them.

The Istio target (``istio_prometheus_config``) scrapes the data-plane service of each region by its Service name
(``meshgen-service.ai-lab-<region>.svc.cluster.local:9000``, one replica each, ``region`` from the namespace), from a
Prometheus inside the mesh (the namespaces' mTLS is STRICT). No Envoy job: Istio names its clusters
``outbound|443||<host>``, not meshgen's ``provider_*``, so the Envoy-based rules would find nothing; under Istio the
service's alerts apply (budgets, estimated accounting, service down). Pod discovery is left out: Debian's
Prometheus has no Kubernetes service discovery, so promtool here could not check it."""

from __future__ import annotations

from typing import Any, Final

from meshgen.ir.model import Gateway
from meshgen.render.envoy import Target
from meshgen.render.envoy.target import COMPOSE_ADMIN_PORT, COMPOSE_SERVICE, LOOPBACK

__all__ = [
    "ALERTMANAGER_PORT",
    "INTERVALS",
    "alertmanager_address",
    "istio_prometheus_config",
    "lab_alertmanager_port",
    "prometheus_config",
]

INTERVALS: Final = {Target.LOCAL: "5s", Target.COMPOSE: "15s"}
"""Scrape and rule evaluation: short in the lab so an alert shows within seconds, Prometheus' usual 15 s elsewhere."""
ALERTMANAGER_PORT: Final = 9093
JOB_ENVOY: Final = "envoy"
JOB_SERVICE: Final = "meshgen-service"


def lab_alertmanager_port(gw: Gateway) -> int:
    """The lab's Alertmanager listens on the port after Prometheus' (the last of `lab.base_port`'s range)."""
    return gw.ports.of("prometheus") + 1


def alertmanager_address(gw: Gateway, target: Target) -> str:
    if target is Target.LOCAL:
        return f"{LOOPBACK}:{lab_alertmanager_port(gw)}"
    return f"alertmanager:{ALERTMANAGER_PORT}"


def _envoy_address(gw: Gateway, target: Target, region: str) -> str:
    if target is Target.LOCAL:
        return f"{LOOPBACK}:{gw.ports.of(f'admin.{region}')}"
    return f"envoy-{region}:{COMPOSE_ADMIN_PORT}"


def _service_address(gw: Gateway, target: Target) -> str:
    if target is Target.LOCAL:
        return f"{LOOPBACK}:{gw.ports.of('service')}"
    return "{}:{}".format(*COMPOSE_SERVICE)


def prometheus_config(gw: Gateway, target: Target) -> dict[str, Any]:
    interval = INTERVALS[target]
    scrape: list[dict[str, Any]] = [
        {
            "job_name": JOB_ENVOY,
            "metrics_path": "/stats/prometheus",
            "static_configs": [
                {"targets": [_envoy_address(gw, target, r.name)], "labels": {"region": r.name}} for r in gw.regions
            ],
        },
        {"job_name": JOB_SERVICE, "static_configs": [{"targets": [_service_address(gw, target)]}]},
    ]
    if target is Target.LOCAL:
        supervisor = f"{LOOPBACK}:{gw.ports.of('supervisor')}"
        scrape.append({"job_name": "lab-supervisor", "static_configs": [{"targets": [supervisor]}]})
    return {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            "external_labels": {"gateway": gw.name},
        },
        "rule_files": ["../rules/*.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_address(gw, target)]}]}]},
        "scrape_configs": scrape,
    }


ISTIO_NAMESPACE_PREFIX: Final = "ai-lab-"
"""The Istio target's namespace per region (meshgen/render/istio/common.py's ``namespace``)."""


def istio_prometheus_config(gw: Gateway) -> dict[str, Any]:
    service = {
        "job_name": JOB_SERVICE,
        "static_configs": [
            {
                "targets": [
                    f"{COMPOSE_SERVICE[0]}.{ISTIO_NAMESPACE_PREFIX}{r.name}.svc.cluster.local:{COMPOSE_SERVICE[1]}"
                ],
                "labels": {"region": r.name},
            }
            for r in gw.regions
        ],
    }
    return {
        "global": {
            "scrape_interval": INTERVALS[Target.COMPOSE],
            "evaluation_interval": INTERVALS[Target.COMPOSE],
            "external_labels": {"gateway": gw.name},
        },
        "rule_files": ["../rules/*.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"alertmanager:{ALERTMANAGER_PORT}"]}]}]},
        "scrape_configs": [service],
    }
