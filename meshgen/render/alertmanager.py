"""Alertmanager, as code: routes per region and severity, from the IR.

Receivers: ``page`` and ``ticket``. With the policy's ``service.alert_webhook`` set, both POST there (Alertmanager's
webhook JSON, beside the service's own budget-stage POSTs); unset, the compose target's notify nobody (alerts are
seen in Alertmanager's UI and API, ``/api/v2/alerts``). The local target's also POST to the lab's webhook receiver
(``python -m meshgen.lab.alert_sink`` on the port after Alertmanager's), which logs and keeps every notification.
Per-region routes carry the region in the group key, so one region's page never hides another's.

The local target (the lab) groups and repeats within seconds, so an alert is visible at once; compose uses the usual
30 s / 5 m / 4 h.
"""

from __future__ import annotations

from typing import Any, Final

from meshgen.ir.model import Gateway
from meshgen.render.document import Document
from meshgen.render.envoy import Target
from meshgen.render.envoy.target import LOOPBACK
from meshgen.render.prometheus.scrape import lab_alertmanager_port

__all__ = ["SEVERITIES", "alertmanager_config", "lab_sink_port", "render_alertmanager"]

SEVERITIES: Final = ("page", "ticket")
_TIMING: Final = {
    Target.LOCAL: {"group_wait": "1s", "group_interval": "5s", "repeat_interval": "1h"},
    Target.COMPOSE: {"group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h"},
}
_GROUP_BY: Final = ("alertname", "region", "slo", "tenant", "envoy_cluster_name", "model")


def lab_sink_port(gw: Gateway) -> int:
    """The lab's webhook receiver: the port after the lab's Alertmanager."""
    return lab_alertmanager_port(gw) + 1


def _receiver(name: str, webhooks: list[str]) -> dict[str, Any]:
    receiver: dict[str, Any] = {"name": name}
    if webhooks:
        receiver["webhook_configs"] = [{"url": url, "send_resolved": True} for url in webhooks]
    return receiver


def alertmanager_config(gw: Gateway, target: Target) -> dict[str, Any]:
    severity_routes = [{"receiver": s, "matchers": [f'severity="{s}"']} for s in SEVERITIES]
    region_routes = [
        {"matchers": [f'region="{r.name}"'], "group_by": [*_GROUP_BY], "routes": severity_routes} for r in gw.regions
    ]
    webhooks = [gw.service.alert_webhook] if gw.service.alert_webhook else []
    if target is Target.LOCAL:
        webhooks.append(f"http://{LOOPBACK}:{lab_sink_port(gw)}/alerts")
    return {
        "route": {
            "receiver": "ticket",
            "group_by": [*_GROUP_BY],
            **_TIMING[target],
            "routes": [*region_routes, *severity_routes],
        },
        "inhibit_rules": [
            {
                "source_matchers": ['alertname="MeshgenServiceDown"'],
                "target_matchers": ['alertname="MeshgenAdmissionErrors"'],
            }
        ],
        "receivers": [_receiver(s, webhooks) for s in SEVERITIES],
    }


def render_alertmanager(gw: Gateway) -> list[Document]:
    return [Document(f"alertmanager/{t.value}/alertmanager.yml", alertmanager_config(gw, t)) for t in Target]
