"""The Envoy runner lives in the product (``meshgen.lab.envoy``, `meshgen lab up` uses it); this re-exports it
and checks a config with the same ``envoy --mode validate`` that ``meshgen.validate`` runs after every render."""

from __future__ import annotations

from pathlib import Path

from meshgen.errors import RenderError
from meshgen.lab.envoy import EnvoyError, EnvoyProcess, envoy_binary
from meshgen.validate import envoy as validate

__all__ = ["EnvoyError", "EnvoyProcess", "envoy_binary", "envoy_validate"]


def envoy_validate(config_path: Path | str) -> None:
    """``meshgen.validate.envoy.envoy_validate`` with the venv's Envoy; ``EnvoyError`` with Envoy's output."""
    try:
        validate.envoy_validate(Path(config_path), binary=envoy_binary())
    except RenderError as error:
        raise EnvoyError(str(error)) from None
