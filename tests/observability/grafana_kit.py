"""What the Grafana tests share: every dashboard meshgen writes, its PromQL, the metric names in it, and the strict
TypeScript check against Grafana's published schema (npm ``@grafana/schema``, pinned in package.json)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.support import in_ci, require_binary

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "generated"
GOLDEN = ROOT / "tests/golden/expected"
TSC = ROOT / "node_modules/.bin/tsc"
SCHEMA = ROOT / "node_modules/@grafana/schema/dist/esm/index.d.mts"


def dashboard_files() -> list[Path]:
    """generated/grafana/ and every golden case's: each dashboard `meshgen build` writes for a checked-in policy."""
    return sorted(GENERATED.glob("grafana/dashboards/*.json")) + sorted(GOLDEN.glob("*/grafana/dashboards/*.json"))


def label(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$__interval": "15s",
    "${model}": ".*",
    "$model": ".*",
    "${tenant}": ".*",
    "$tenant": ".*",
}
"""What Grafana puts in place of the variables the dashboards use (an "All" selection is the regex `.*`)."""


def interpolate(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_NAME = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"})
_KEYWORDS |= {"offset", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers outside strings, label matchers, groupings and ranges
    that are not called as functions nor PromQL keywords."""
    bare = _RANGE.sub("", _MATCHERS.sub("", _GROUPING.sub("", _STRING.sub('""', expr))))
    return {name for name in _NAME.findall(bare) if name not in _KEYWORDS}


# ---- the strict schema check ---------------------------------------------------------------------------------------

TS_PRELUDE = """\
import type { Dashboard } from "@grafana/schema";
import type { Options as bargauge } from "@panels/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen";
import type { Options as stat } from "@panels/stat/panelcfg/x/StatPanelCfg_types.gen";
import type { Options as timeseries } from "@panels/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen";

/** The schema as JSON carries it: a string enum's values as their strings (JSON cannot name a TypeScript enum);
 * everything else, excess-property checks of object literals included, exactly as Grafana declares it. */
type Json<T> = T extends string ? (string extends T ? T : `${T}`)
  : T extends readonly (infer U)[] ? Json<U>[]
  : T extends object ? { [K in keyof T]: Json<T[K]> }
  : T;

export const dashboard: Json<Dashboard> = """


PANEL_OPTIONS = ("bargauge", "stat", "timeseries")
"""Panel types whose `options` are checked too, against the panel plugin's own `Options` (the dashboard schema
leaves them open)."""


def _panel_options(text: str) -> str:
    """One object literal per panel's options, typed by its plugin's schema; any other panel type with options fails."""
    lines = []
    for i, panel in enumerate(panels(json.loads(text))):
        if "options" not in panel:
            continue
        kind = panel["type"] if panel["type"] in PANEL_OPTIONS else "unchecked_panel_type"
        lines.append(f"export const options{i}: Json<{kind}> = {json.dumps(panel['options'])};")
    return "".join(line + "\n" for line in lines)


def require_tsc() -> Path:
    """node and the pinned TypeScript from `npm ci`; missing → fail under CI, skip elsewhere."""
    require_binary("node")
    if not (TSC.is_file() and SCHEMA.is_file()):
        reason = f"{TSC.relative_to(ROOT)} or @grafana/schema missing (run `npm ci`; .ci/run does)"
        if in_ci():
            pytest.fail(f"{reason} — CI must have every real component", pytrace=False)
        pytest.skip(reason)
    return TSC


def typecheck(dashboards: Mapping[str, str], workdir: Path) -> dict[str, list[str]]:
    """tsc --noEmit over one .ts file per dashboard (name → JSON text), each assigning the JSON as an object literal
    to Grafana's `Dashboard` type under `strict`; the errors per name (none: an empty list)."""
    tsc = require_tsc()
    workdir.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, (name, text) in enumerate(sorted(dashboards.items())):
        ts = workdir / f"dashboard{i}.ts"
        ts.write_text(TS_PRELUDE + text.rstrip() + ";\n" + _panel_options(text))
        files[ts.name] = name
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "es2022",
            "module": "esnext",
            "moduleResolution": "bundler",
            "skipLibCheck": True,
            "types": [],
            "paths": {"@grafana/schema": [str(SCHEMA)], "@panels/*": [f"{SCHEMA.parent}/raw/composable/*"]},
        },
        "files": sorted(files),
    }
    (workdir / "tsconfig.json").write_text(json.dumps(config, indent=2))
    result = subprocess.run(
        [str(tsc), "-p", "tsconfig.json", "--pretty", "false"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    errors: dict[str, list[str]] = {name: [] for name in files.values()}
    for line in result.stdout.splitlines():
        match = re.match(r"^(dashboard\d+\.ts)\(", line)
        if match:
            errors[files[match.group(1)]].append(line)
        elif line.strip() and not line.startswith(" "):
            raise AssertionError(f"tsc said something about no dashboard: {result.stdout}{result.stderr}")
    if result.returncode != 0 and not any(errors.values()):
        raise AssertionError(f"tsc failed: {result.stdout}{result.stderr}")
    return errors
