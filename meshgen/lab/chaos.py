"""`meshgen chaos on|off|status`: switch the policy's compiled fault filters in a running lab's Envoys.

Every fault of the policy's ``chaos:`` is compiled into the chaos hop in front of its target provider, at 0 %, under
the runtime keys ``meshgen.chaos.<fault>.delay_percent`` and ``….abort_percent`` (``render/envoy/filters/fault.py``).
``on`` sets them to the policy's ``percent`` through each region's admin API (``POST /runtime_modify``), ``off`` to
0; no restart. Envoy reads these keys as whole percents, so a fractional ``percent`` is rounded. The values are
also kept in the run directory's ``chaos.json`` so the supervisor re-applies them to an Envoy it restarts.
``status`` reads the values back from each Envoy's ``/runtime``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from meshgen.errors import MeshgenError
from meshgen.lab.state import Fault, Plan, RunDir

__all__ = ["ChaosError", "fault_percent", "status", "switch"]

TIMEOUT = 5.0


class ChaosError(MeshgenError):
    """No lab runs, an unknown fault or region, or an Envoy's admin API refused the change."""

    exit_code: ClassVar[int] = 1


def _plan(run_dir: Path) -> Plan:
    rd = RunDir(run_dir)
    plan = rd.plan()
    if plan is None or not rd.supervisor_alive():
        raise ChaosError(f"no lab running in {rd.path}/; start one with `meshgen lab up`")
    return plan


def _fault(plan: Plan, name: str) -> Fault:
    faults = {f.name: f for f in plan.faults}
    if name not in faults:
        known = ", ".join(faults) or "none (the policy has no chaos: section)"
        raise ChaosError(f"unknown fault {name!r}; the policy's faults: {known}")
    return faults[name]


def _regions(plan: Plan, regions: Sequence[str]) -> list[str]:
    unknown = [r for r in regions if r not in plan.regions]
    if unknown:
        raise ChaosError(f"no region {', '.join(map(repr, unknown))} in the lab; regions: {', '.join(plan.regions)}")
    return [r for r in plan.regions if not regions or r in regions]


def fault_percent(fault: Fault) -> int:
    """The whole percent ``on`` sets (Envoy's runtime reads an integer numerator over 100)."""
    return max(0, min(100, round(fault.percent)))


def _admin(plan: Plan, region: str, path: str, *, post: bool = False) -> str:
    url = plan.regions[region].admin_url + path
    request = urllib.request.Request(url, data=b"" if post else None, method="POST" if post else "GET")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return bytes(resp.read()).decode()
    except urllib.error.HTTPError as error:
        with error:
            detail = error.read().decode(errors="replace").strip()
        raise ChaosError(f"envoy {region}: {path.split('?')[0]}: {error.code} {detail}") from None
    except OSError as error:
        raise ChaosError(f"envoy {region} ({plan.regions[region].admin_url}) did not answer: {error}") from None


def switch(run_dir: Path, name: str, on: bool, regions: Sequence[str] = ()) -> dict[str, dict[str, str]]:
    """Set fault ``name`` on (its policy percent) or off (0) in ``regions`` (every region of the lab when empty);
    region → the runtime values set."""
    plan = _plan(run_dir)
    fault = _fault(plan, name)
    chosen = _regions(plan, regions)
    value = str(fault_percent(fault) if on else 0)
    values = dict.fromkeys(fault.runtime_keys, value)
    rd = RunDir(run_dir)
    saved = rd.chaos()
    for region in chosen:  # saved first: an Envoy down right now gets the values when the supervisor restarts it
        saved[region] = {**saved.get(region, {}), **values}
    rd.write_chaos(saved)
    failed: list[str] = []
    for region in chosen:
        try:
            _admin(plan, region, "/runtime_modify?" + urllib.parse.urlencode(values), post=True)
        except ChaosError as error:
            failed.append(str(error))
    if failed:
        raise ChaosError("; ".join(failed) + " (the supervisor applies the change when it restarts that Envoy)")
    return {region: values for region in chosen}


def status(run_dir: Path, regions: Sequence[str] = ()) -> dict[str, Any]:
    """Region → fault → ``{"on", "percent", <runtime key>: value…}``, read from each Envoy's ``/runtime``; and
    the faults' descriptions under ``"faults"``."""
    plan = _plan(run_dir)
    out: dict[str, Any] = {"regions": {}, "faults": {}}
    for fault in plan.faults:
        out["faults"][fault.name] = {
            "delay_ms": fault.delay_ms,
            "abort_status": fault.abort_status,
            "percent": fault_percent(fault),
            "targets": list(fault.targets),
        }
    for region in _regions(plan, regions):
        entries = json.loads(_admin(plan, region, "/runtime")).get("entries", {})
        per_fault: dict[str, Any] = {}
        for fault in plan.faults:
            values = {key: _number(entries.get(key, {}).get("final_value")) for key in fault.runtime_keys}
            per_fault[fault.name] = {"on": any(v > 0 for v in values.values()), **values}
        out["regions"][region] = per_fault
    return out


def _number(value: object) -> float:
    try:
        number = float(str(value))
    except ValueError:
        return 0.0
    return number


def format_status(info: dict[str, Any]) -> str:
    faults: dict[str, Any] = info["faults"]
    if not faults:
        return "the policy has no chaos: faults"
    lines = []
    for name, f in faults.items():
        what = " and ".join(
            part
            for part in (
                f"delay {f['delay_ms']} ms" if f["delay_ms"] is not None else "",
                f"abort {f['abort_status']}" if f["abort_status"] is not None else "",
            )
            if part
        )
        lines.append(f"{name}: {what} at {f['percent']} % on {', '.join(f['targets'])}")
    lines.append("")
    width = max(len(n) for n in faults) + 2
    regions: dict[str, Any] = info["regions"]
    lines.append(f"{'fault':<{width}}" + "".join(f"{r:<10}" for r in regions))
    for name in faults:
        lines.append(f"{name:<{width}}" + "".join(f"{'on' if regions[r][name]['on'] else 'off':<10}" for r in regions))
    return "\n".join(lines)
