"""Telemetry: access logging on, and tracing when the policy sends spans."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.istio.common import meta


def telemetry(gw: ir.Gateway, region: ir.Region) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessLogging": [{"providers": [{"name": "envoy"}]}]}
    if gw.tracing:
        spec["tracing"] = [{"randomSamplingPercentage": gw.tracing.sample_percent}]
    return {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": meta("meshgen", region.name),
        "spec": spec,
    }
