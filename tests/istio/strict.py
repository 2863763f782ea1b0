"""Strict schemas for the Istio target: Istio kinds against cloudcoil-models-istio with every model made
`extra="forbid"` (the package ignores unknown fields), core kinds with `kubernetes-validate --strict`."""

from __future__ import annotations

import importlib
import inspect
from functools import cache
from typing import Any

import kubernetes_validate
import pydantic

K8S_VERSION = "1.33.0"
"""A version kubernetes-validate ships schemas for (kind's default node image line)."""

ISTIO_MODULES = {
    "networking.istio.io/v1": "cloudcoil.models.istio.networking.v1",
    "networking.istio.io/v1alpha3": "cloudcoil.models.istio.networking.v1alpha3",
    "security.istio.io/v1": "cloudcoil.models.istio.security.v1",
    "telemetry.istio.io/v1": "cloudcoil.models.istio.telemetry.v1",
}


def _subclasses(cls: type[pydantic.BaseModel]) -> list[type[pydantic.BaseModel]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


@cache
def _forbid_extra() -> None:
    """Every cloudcoil model forbids unknown fields; parents embed their children's schemas, so rebuild until the
    nested ones are in (three passes cover the deepest nesting: a second-to-last pass changes nothing)."""
    for module in ISTIO_MODULES.values():
        importlib.import_module(module)
    models = [c for c in _subclasses(pydantic.BaseModel) if c.__module__.startswith("cloudcoil")]
    for model in models:
        model.model_config["extra"] = "forbid"
    for _ in range(3):
        for model in models:
            model.model_rebuild(force=True)


def istio_model(api_version: str, kind: str) -> type[pydantic.BaseModel]:
    _forbid_extra()
    module = importlib.import_module(ISTIO_MODULES[api_version])
    model = getattr(module, kind)
    assert inspect.isclass(model) and issubclass(model, pydantic.BaseModel)
    return model


def validate(resource: dict[str, Any]) -> None:
    """Raises on any schema error or unknown field."""
    if resource["apiVersion"] in ISTIO_MODULES:
        istio_model(resource["apiVersion"], resource["kind"]).model_validate(resource)
    else:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
