"""Chaos faults, compiled in at 0 % under runtime keys so `meshgen chaos` can switch them without a restart."""

from __future__ import annotations

from typing import Any

from meshgen.ir import model as ir
from meshgen.render.envoy.types import API, duration, filter_

_OFF = {"numerator": 0, "denominator": "HUNDRED"}


def runtime_key(fault: ir.Fault, kind: str) -> str:
    return f"meshgen.chaos.{fault.name}.{kind}_percent"


def fault_filter(fault: ir.Fault) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if fault.delay_ms is not None:
        config["delay"] = {"fixed_delay": duration(fault.delay_ms), "percentage": _OFF}
        config["delay_percent_runtime"] = runtime_key(fault, "delay")
    if fault.abort_status is not None:
        config["abort"] = {"http_status": fault.abort_status, "percentage": _OFF}
        config["abort_percent_runtime"] = runtime_key(fault, "abort")
    return filter_(f"meshgen.chaos.{fault.name}", f"{API}.extensions.filters.http.fault.v3.HTTPFault", config)
