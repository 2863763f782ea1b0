"""Policy file → every generated document: the library entry point behind `meshgen build`."""

from __future__ import annotations

from pathlib import Path

from meshgen.ir.build import build_gateway
from meshgen.ir.model import Gateway
from meshgen.policy import load_policy
from meshgen.render.document import Document
from meshgen.render.envoy import Target, render_envoy
from meshgen.render.extproc_config import render_service_config


def compile_gateway(policy_path: Path, *, source: str | None = None) -> Gateway:
    return build_gateway(load_policy(policy_path), source=source or policy_path.as_posix())


def render_all(gw: Gateway) -> list[Document]:
    return [doc for target in Target for doc in (*render_envoy(gw, target), render_service_config(gw, target))]


def compile_policy(policy_path: Path, *, source: str | None = None) -> list[Document]:
    return render_all(compile_gateway(policy_path, source=source))
