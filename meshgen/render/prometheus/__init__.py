"""Prometheus, as code: scrape configs per target, recording rules for the SLIs, and the alerts (SLO burn rates,
providers ejected, budget stages, hedging, the data-plane service, estimated accounting).

Files, under ``generated/prometheus/``: ``local/prometheus.yml`` (the lab's loopback ports, 5 s intervals),
``compose/prometheus.yml`` (service DNS names, 15 s), ``istio/prometheus.yml`` (each region's service by its
Kubernetes Service name), and ``rules/{sli,alerts}.yml`` that all load. Pure: IR → documents; the same IR gives
byte-identical files.
"""

from __future__ import annotations

from meshgen.ir.model import Gateway
from meshgen.render.document import Document
from meshgen.render.envoy import Target
from meshgen.render.prometheus.rules import alert_rules, sli_rules
from meshgen.render.prometheus.scrape import istio_prometheus_config, prometheus_config

__all__ = ["render_prometheus"]


def render_prometheus(gw: Gateway) -> list[Document]:
    return [
        *(Document(f"prometheus/{t.value}/prometheus.yml", prometheus_config(gw, t)) for t in Target),
        Document("prometheus/istio/prometheus.yml", istio_prometheus_config(gw)),
        Document("prometheus/rules/sli.yml", sli_rules(gw)),
        Document("prometheus/rules/alerts.yml", alert_rules(gw)),
    ]
