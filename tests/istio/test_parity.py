"""Every policy field is in the parity table (meshgen/render/parity.py), for both targets."""

from __future__ import annotations

import typing
from collections.abc import Iterator

import pydantic

from meshgen.policy.model import Policy
from meshgen.render.parity import FEATURES, NotSupported, feature_of


def _models(annotation: object) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def policy_fields(model: type[pydantic.BaseModel] = Policy, prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        nested = _models(field.annotation)
        if not nested:
            yield prefix + name
        for sub in nested:
            yield from policy_fields(sub, f"{prefix}{name}.")


def test_every_policy_field_has_an_envoy_and_an_istio_rendering() -> None:
    missing = [f for f in policy_fields() if feature_of(f) is None]
    assert not missing, f"add these policy fields to meshgen/render/parity.py FEATURES: {missing}"


def test_the_table_names_no_field_the_policy_lacks() -> None:
    known = set(policy_fields())
    stale = [f for feature in FEATURES for f in feature.fields if f not in known]
    assert not stale


def test_a_new_field_is_caught() -> None:
    class Extended(Policy):
        shiny: int = 0

    assert [f for f in policy_fields(Extended) if feature_of(f) is None] == ["shiny"]


def test_not_supported_rows_say_why() -> None:
    rows = [f for f in FEATURES if isinstance(f.istio, NotSupported)]
    assert [r.fields for r in rows] == [("lab.base_port",)]
    assert all(r.istio.reason for r in rows if isinstance(r.istio, NotSupported))
