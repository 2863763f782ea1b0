"""Alertmanager, as code: routes per region and severity, from the IR.

Receivers: ``page`` and ``ticket``. With the policy's ``service.alert_webhook`` set, both POST there (Alertmanager's
webhook JSON, beside the service's own budget-stage POSTs); unset, they notify nobody and alerts are only seen in
Alertmanager's UI and API (``/api/v2/alerts``), which is what the lab shows. Per-region routes carry the region in
the group key, so one region's page never hides another's.

The local target (the lab) groups and repeats within seconds, so an alert is visible at once; compose uses the usual
30 s / 5 m / 4 h.
"""

from __future__ import annotations

from typing import Any, Final

from meshgen.ir.model import Gateway
from meshgen.render.document import Document
from meshgen.render.envoy import Target

__all__ = ["SEVERITIES", "alertmanager_config", "render_alertmanager"]

SEVERITIES: Final = ("page", "ticket")
_TIMING: Final = {
    Target.LOCAL: {"group_wait": "1s", "group_interval": "5s", "repeat_interval": "1h"},
    Target.COMPOSE: {"group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h"},
}
_GROUP_BY: Final = ("alertname", "region", "slo", "tenant", "envoy_cluster_name", "model")


def _receiver(name: str, webhook: str | None) -> dict[str, Any]:
    receiver: dict[str, Any] = {"name": name}
    if webhook:
        receiver["webhook_configs"] = [{"url": webhook, "send_resolved": True}]
    return receiver


def alertmanager_config(gw: Gateway, target: Target) -> dict[str, Any]:
    severity_routes = [{"receiver": s, "matchers": [f'severity="{s}"']} for s in SEVERITIES]
    region_routes = [
        {"matchers": [f'region="{r.name}"'], "group_by": [*_GROUP_BY], "routes": severity_routes} for r in gw.regions
    ]
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
        "receivers": [_receiver(s, gw.service.alert_webhook) for s in SEVERITIES],
    }


def render_alertmanager(gw: Gateway) -> list[Document]:
    return [Document(f"alertmanager/{t.value}/alertmanager.yml", alertmanager_config(gw, t)) for t in Target]
