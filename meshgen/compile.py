"""Policy file → every generated document: the library entry point behind `meshgen build`."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshgen import output
from meshgen.ir.build import build_gateway
from meshgen.ir.model import Gateway
from meshgen.policy import load_policy
from meshgen.render.alertmanager import render_alertmanager
from meshgen.render.document import Document
from meshgen.render.envoy import Target, render_envoy
from meshgen.render.extproc_config import render_service_config
from meshgen.render.grafana import render_grafana
from meshgen.render.istio import render_istio
from meshgen.render.prometheus import render_prometheus


def compile_gateway(policy_path: Path, *, source: str | None = None) -> Gateway:
    return build_gateway(load_policy(policy_path), source=source or policy_path.as_posix())


TARGETS = ("envoy", "istio")
"""`meshgen build --target`: envoy is Compose and the local lab (with their monitoring), istio the mesh."""


def target_of(path: str) -> str:
    """Which target a file of `generated/` belongs to (by its path relative to it)."""
    return "istio" if path.startswith("istio/") else "envoy"


def render_all(gw: Gateway, targets: tuple[str, ...] = TARGETS) -> list[Document]:
    docs = [doc for target in Target for doc in (*render_envoy(gw, target), render_service_config(gw, target))]
    envoy = [*docs, *render_grafana(gw), *render_prometheus(gw), *render_alertmanager(gw)]
    return [*(envoy if "envoy" in targets else []), *(render_istio(gw) if "istio" in targets else [])]


def compile_policy(policy_path: Path, *, source: str | None = None) -> list[Document]:
    return render_all(compile_gateway(policy_path, source=source))


@contextmanager
def _no_gc() -> Iterator[None]:
    """Compiling allocates millions of small objects that all live until the files are written; Python's cyclic
    collector rescans them again and again (compile time grew super-linearly with 1,000 tenants). Nothing here
    makes cycles that must be collected before the command ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


PARALLEL_FROM = 200
"""Models plus tenants from which dumping the files on every core pays for starting the workers (~10 ms each)."""


def build(policy_path: Path, *, version: str, targets: tuple[str, ...] = TARGETS) -> tuple[Gateway, dict[str, str]]:
    """The gateway and the text of every file `meshgen build` writes for this policy, keyed by relative path."""
    with _no_gc():
        source = policy_path.as_posix()
        gw = compile_gateway(policy_path, source=source)
        large = len(gw.models) + len(gw.tenants) >= PARALLEL_FROM
        processes = (os.cpu_count() or 1) if large else 1
        return gw, output.serialize(render_all(gw, targets), source=source, version=version, processes=processes)
