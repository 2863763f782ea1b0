"""Every generated Istio-target resource validates strictly; a typo anywhere is rejected."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pydantic
import pytest
import yaml

from tests.istio.strict import validate

ROOT = Path(__file__).resolve().parents[2]
TREES = [ROOT / "generated" / "istio", *sorted((ROOT / "tests" / "golden" / "expected").glob("*/istio"))]
FILES = [p for tree in TREES for p in sorted(tree.rglob("*.yaml")) if p.name != "kustomization.yaml"]


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_generated_resource_validates_strictly(path: Path) -> None:
    validate(_load(path))


def test_there_are_resources_of_every_family() -> None:
    kinds = {_load(p)["kind"] for p in FILES}
    assert kinds >= {
        "Namespace", "ConfigMap", "ServiceAccount", "Service", "Deployment", "Gateway", "VirtualService",
        "DestinationRule", "ServiceEntry", "PeerAuthentication", "RequestAuthentication", "AuthorizationPolicy",
        "EnvoyFilter", "Telemetry",
    }  # fmt: skip


def _typo(resource: dict[str, Any], path: list[str | int], key: str) -> dict[str, Any]:
    bad = copy.deepcopy(resource)
    node: Any = bad
    for step in path:
        node = node[step]
    node[key + "x"] = node.pop(key)
    return bad


ISTIO = ROOT / "generated" / "istio" / "ai-lab-us-east"


@pytest.mark.parametrize(
    ("file", "path", "key"),
    [
        ("virtualservice-llm-routes.yaml", ["spec", "http", 0, "retries"], "perTryTimeout"),
        ("virtualservice-llm-routes.yaml", ["spec"], "hosts"),
        ("destinationrule-provider-openai-us-east.yaml", ["spec", "trafficPolicy", "outlierDetection"], "interval"),
        ("authorizationpolicy-tenant-models.yaml", ["metadata"], "namespace"),
        ("envoyfilter-meshgen.yaml", ["spec", "configPatches", 0], "applyTo"),
    ],
    ids=["vs-retries", "vs-spec", "dr-outlier", "authz-metadata", "envoyfilter-patch"],
)
def test_istio_typo_is_rejected(file: str, path: list[str | int], key: str) -> None:
    resource = _load(ISTIO / file)
    validate(resource)
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        validate(_typo(resource, path, key))


@pytest.mark.parametrize(
    ("file", "path", "key"),
    [
        ("deployment-meshgen-service.yaml", ["spec", "template", "spec"], "serviceAccountName"),
        ("service-meshgen-service.yaml", ["spec"], "selector"),
        ("namespace.yaml", ["metadata"], "labels"),
    ],
    ids=["deployment-pod", "service-spec", "namespace-metadata"],
)
def test_core_typo_is_rejected(file: str, path: list[str | int], key: str) -> None:
    resource = _load(ISTIO / file)
    validate(resource)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(_typo(resource, path, key))
