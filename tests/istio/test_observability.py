"""The Istio target's observability: every region's namespace carries Grafana's dashboards (the overview and its
own, as `meshgen build` writes them under generated/grafana/) for Grafana's dashboard sidecar, and the pods that
export metrics say so in the usual `prometheus.io/*` annotations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
ISTIO = ROOT / "generated" / "istio"
GRAFANA = ROOT / "generated" / "grafana" / "dashboards"
REGIONS = ("europe", "us-east", "us-west")


def _resource(region: str, name: str) -> Any:
    return yaml.safe_load((ISTIO / f"ai-lab-{region}" / name).read_text())


def _without_header(board: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in board.items() if k != "description"}  # the file's generated-by header lives there


def test_every_region_carries_the_overview_and_its_own_dashboard() -> None:
    for region in REGIONS:
        config_map = _resource(region, "configmap-meshgen-dashboards.yaml")
        assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
        assert sorted(config_map["data"]) == ["meshgen-overview.json", f"meshgen-region-{region}.json"]
        for name, text in config_map["data"].items():
            written = json.loads((GRAFANA / name).read_text())
            assert _without_header(json.loads(text)) == _without_header(written), (region, name)


def test_the_service_and_the_gateway_are_annotated_for_scraping() -> None:
    for region in REGIONS:
        service = _resource(region, "deployment-meshgen-service.yaml")
        pod = service["spec"]["template"]
        [container] = pod["spec"]["containers"]
        http = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
        assert pod["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(http),
            "prometheus.io/path": "/metrics",
        }
        gateway = _resource(region, "deployment-llm-gateway-ingress.yaml")["spec"]["template"]["metadata"]
        assert gateway["annotations"]["prometheus.io/port"] == "15020"  # Istio's agent: the merged Envoy stats
        assert gateway["annotations"]["prometheus.io/path"] == "/stats/prometheus"
