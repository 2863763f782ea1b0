"""Scrape configs: every Envoy's admin ``/stats/prometheus`` (with a ``region`` label), the data-plane service's
``/metrics`` and, in the lab, the supervisor's. The mock providers serve no metrics, so nothing scrapes them."""

from __future__ import annotations

from typing import Any, Final

from meshgen.ir.model import Gateway
from meshgen.render.envoy import Target
from meshgen.render.envoy.target import COMPOSE_ADMIN_PORT, COMPOSE_SERVICE, LOOPBACK

__all__ = ["ALERTMANAGER_PORT", "INTERVALS", "alertmanager_address", "lab_alertmanager_port", "prometheus_config"]

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
