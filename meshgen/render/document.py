"""What a renderer returns: a relative path and the data to write there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Document:
    path: str
    """Relative to the output directory, '/'-separated: `local/envoy/us-east.yaml`."""
    data: dict[str, Any]
