"""What a renderer returns: a relative path and the data to write there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Document:
    path: str
    """Relative to the output directory, '/'-separated: `local/envoy/us-east.yaml`."""
    data: dict[str, Any]
    header_key: str = "generated_by"
    """JSON only: the key the generated-by header goes under (a Grafana dashboard puts it in `description`, so the
    file stays valid against Grafana's schema)."""
