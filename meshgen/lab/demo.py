"""`meshgen lab demo`: a few real requests through a running lab.

The demo goes through the lab that `meshgen lab up` runs (``demo_running``) or, when none runs, through a ``Lab``
of its own that it stops afterwards. Each demo request names what it expects (status, and where it applies the
provider that served it, the route it took or the OpenAI error code); ``run_demo`` sends them through one region's
real Envoy and ``format_table`` shows model → status → route or error → ``x-served-by``. The route is read from
Envoy's own counters: the request's ``cluster.model_<name>_chain.external.upstream_rq_completed`` goes up by one
(stat names spell our dots as _).

The keys are the lab's (``policies/lab.yaml`` keeps only their sha256): ``sk-lab-platform`` may use every model,
``sk-lab-dev`` only llama3.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from meshgen.compile import compile_gateway
from meshgen.ir.model import Gateway
from meshgen.lab.envoy import EnvoyProcess
from meshgen.lab.run import HOST, Lab, LabError, signals_interrupt
from meshgen.lab.state import RunDir

__all__ = [
    "DEV_KEY",
    "PLATFORM_KEY",
    "DemoCase",
    "DemoResult",
    "demo",
    "demo_cases",
    "demo_running",
    "format_table",
    "run_demo",
    "run_demo_through",
]

PLATFORM_KEY = "sk-lab-platform"
RESEARCH_KEY = "sk-lab-research"
DEV_KEY = "sk-lab-dev"
_KEY_NAMES = {PLATFORM_KEY: "platform", RESEARCH_KEY: "research", DEV_KEY: "dev"}
TIMEOUT = 10.0
"""Seconds: bound of each demo request and of waiting for Envoy's counters."""
_EXTERNAL = ".external.upstream_rq_completed"


@dataclass(frozen=True)
class DemoCase:
    title: str
    model: str
    key: str | None
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    served_by: tuple[str, ...] = ()
    """Providers that may answer (empty: not checked)."""
    route: str | None = None
    """The chain cluster that must take the request (``model.gpt-4o-beta.chain``)."""
    code: str | None = None
    """The OpenAI error code a refusal must carry."""


@dataclass(frozen=True)
class DemoResult:
    case: DemoCase
    status: int | None
    """None when no answer came (the connection failed or timed out)."""
    served_by: str | None
    route: str | None
    code: str | None
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        c = self.case
        out: list[str] = []
        if self.error is not None:
            return [self.error]
        if self.status != c.status:
            out.append(f"expected {c.status}")
        if c.served_by and self.served_by not in c.served_by:
            out.append(f"expected served by {' or '.join(c.served_by)}")
        if c.route is not None and self.route != c.route:
            out.append(f"expected route {c.route}")
        if c.code is not None and self.code != c.code:
            out.append(f"expected code {c.code}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems


def demo_cases(gw: Gateway, region: str) -> tuple[DemoCase, ...]:
    """The demo for ``region`` of the lab policy: routing, a canary by header, refusals, two kinds of failover."""
    endpoints = [e.name for c in gw.clusters for e in c.endpoints]
    openai_local = f"provider.openai.{region}.ep0"
    openai_others = tuple(e for e in endpoints if e.startswith("provider.openai.") and e != openai_local)
    ollama_local = f"provider.ollama.{region}.ep0"
    return (
        DemoCase("gpt-4o", "gpt-4o", PLATFORM_KEY, 200, served_by=(openai_local,)),
        DemoCase(
            "gpt-4o, X-Model-Version: beta",
            "gpt-4o",
            PLATFORM_KEY,
            200,
            headers={"X-Model-Version": "beta"},
            route="model_gpt-4o-beta_chain",
        ),
        DemoCase("gpt-4o, dev may use only llama3", "gpt-4o", DEV_KEY, 403, code="model_not_allowed"),
        DemoCase("llama3", "llama3", DEV_KEY, 200, served_by=(ollama_local,)),
        DemoCase("unknown model", "gpt-5-ultra", PLATFORM_KEY, 404, code="model_not_found"),
        DemoCase("no API key", "gpt-4o", None, 401, code="missing_api_key"),
        # Failover is shown on gpt-4o-mini: gpt-4o's 10 % canary would make these rows a matter of chance.
        DemoCase(
            f"gpt-4o-mini, {openai_local} answers 503",
            "gpt-4o-mini",
            PLATFORM_KEY,
            200,
            headers={"x-mock": f"status=503@{openai_local}"},
            served_by=openai_others,
            route="model_gpt-4o-mini_chain",
        ),
        DemoCase(
            "gpt-4o-mini, every OpenAI endpoint answers 503",
            "gpt-4o-mini",
            PLATFORM_KEY,
            200,
            headers={"x-mock": "status=503@provider.openai.*"},
            served_by=(ollama_local,),
            route="model_gpt-4o-mini_chain",
        ),
    )


def _chain_counts(envoy: EnvoyProcess) -> dict[str, int]:
    stats = envoy.stats("cluster.model_")
    return {
        name.removeprefix("cluster.").removesuffix(_EXTERNAL): value
        for name, value in stats.items()
        if name.endswith(_EXTERNAL)
    }


def _send(port: int, case: DemoCase) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"model": case.model, "messages": [{"role": "user", "content": "Say hi."}]})
    headers = {"content-type": "application/json", **case.headers}
    if case.key is not None:
        headers["authorization"] = f"Bearer {case.key}"
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _error_code(body: bytes) -> str | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return None if code is None else str(code)


def run_demo(lab: Lab, region: str) -> list[DemoResult]:
    """Send every demo case through ``region``'s listener of a started ``Lab``; never raises for a wrong answer."""
    return run_demo_through(lab.gateway, region, lab.envoys[region])


def run_demo_through(gateway: Gateway, region: str, envoy: EnvoyProcess) -> list[DemoResult]:
    """Send every demo case through ``region``'s listener, in order, reading routes from ``envoy``'s admin."""
    port = gateway.ports.of(f"listener.{region}")
    results: list[DemoResult] = []
    for case in demo_cases(gateway, region):
        before = _chain_counts(envoy)
        try:
            status, headers, body = _send(port, case)
        except (OSError, http.client.HTTPException) as error:
            results.append(DemoResult(case, None, None, None, None, error=f"no answer: {error}"))
            continue
        route = None
        deadline = time.monotonic() + (TIMEOUT if status < 400 else 0.0)
        while True:  # the counter moves when the upstream answer completes, a moment after the client's
            after = _chain_counts(envoy)
            moved = sorted(name for name, n in after.items() if n > before.get(name, 0))
            if moved or time.monotonic() >= deadline:
                route = ", ".join(moved) or None
                break
            time.sleep(0.02)
        code = _error_code(body) if status >= 400 else None
        results.append(DemoResult(case, status, headers.get("x-served-by"), route, code))
    return results


def demo(lab: Lab, region: str) -> list[DemoResult]:
    """Start ``lab``, run the demo through ``region``, stop the lab (also on Ctrl-C or SIGTERM)."""
    with signals_interrupt(), lab:
        return run_demo(lab, region)


def demo_running(run_dir: Path, region: str) -> list[DemoResult] | None:
    """The demo through the lab `meshgen lab up` runs in ``run_dir``; None when none runs there."""
    rd = RunDir(run_dir)
    plan = rd.plan()
    if plan is None or not rd.supervisor_alive():
        return None
    if region not in plan.regions:
        regions = ", ".join(plan.regions)
        raise LabError(f"the lab running in {rd.path}/ has no region {region!r}; its regions: {regions}")
    gateway = compile_gateway(Path(plan.policy))
    envoy = EnvoyProcess(Path(plan.generated) / "local" / "envoy" / f"{region}.yaml", plan.regions[region].admin_port)
    return run_demo_through(gateway, region, envoy)


def format_table(results: list[DemoResult]) -> str:
    """One line per request: what was asked, with which key → status → route or error code → served by."""
    header = ("request", "key", "status", "route / error", "served by", "")
    rows = [header]
    for r in results:
        key = "(none)" if r.case.key is None else _KEY_NAMES.get(r.case.key, "other")
        status = "-" if r.status is None else str(r.status)
        detail = r.code or (r.route or "-").removeprefix("model_").removesuffix("_chain")
        verdict = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
        rows.append((r.case.title, key, status, detail, r.served_by or "-", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)
