"""The data-plane service's config: its own contract (`ext_proc.config`), filled from the IR."""

from __future__ import annotations

from pydantic import ValidationError

from ext_proc.config import ServiceConfig
from meshgen.errors import RenderError
from meshgen.ir import model as ir
from meshgen.render.document import Document
from meshgen.render.envoy.target import Target


def translated_chains(gw: ir.Gateway) -> dict[str, dict[str, str]]:
    """Each chain that crosses schemas: model → {provider → the chain's first model that provider serves}."""
    chains: dict[str, dict[str, str]] = {}
    for m in gw.models:
        targets: dict[str, str] = {}
        for target in (m.name, *m.failover):
            targets.setdefault(gw.model(target).provider, target)
        if any(gw.model(t).schema_ != m.schema_ for t in targets.values()):
            chains[m.name] = targets
    return chains


def service_config(gw: ir.Gateway) -> dict[str, object]:
    chains = translated_chains(gw)
    used = {p for chain in chains.values() for p in chain}
    return {
        "schema_version": 1,
        "policy": gw.name,
        "failure_mode": gw.service.failure_mode,
        "max_request_bytes": gw.service.max_request_bytes,
        "store": gw.service.store,
        "redis_url": gw.service.redis_url,
        "ledger_down": gw.service.ledger_down,
        "settle_after_ms": gw.service.settle_after_ms,
        "alert_webhook": gw.service.alert_webhook,
        "models": {
            m.name: {
                "provider": m.provider,
                "upstream_name": m.upstream_name,
                "downgrade": m.downgrade,
                "max_tokens_default": m.max_tokens_default,
                "price": {
                    "input_per_mtok": m.price_input_per_mtok,
                    "output_per_mtok": m.price_output_per_mtok,
                }
                if m.price_input_per_mtok is not None
                else None,
                "hedged": m.hedge is not None,
            }
            for m in gw.models
        },
        "tenants": {
            t.name: {
                "key_hashes": list(t.key_hashes),
                "models": list(t.models),
                "limits": t.limits.model_dump(),
                "alerts_at": list(t.alerts_at),
                "non_critical": t.non_critical.model_dump() if t.non_critical else None,
            }
            for t in gw.tenants
        },
        "providers": {c.provider: {"api": c.schema_, "key_env": c.key_env} for c in gw.clusters if c.provider in used},
        "translated_chains": chains,
        "tracing": {"otlp_endpoint": gw.tracing.otlp_endpoint} if gw.tracing else None,
    }


def render_service_config(gw: ir.Gateway, target: Target) -> Document:
    """Checked against the service's own contract here, so a build never writes a config the service refuses."""
    try:
        checked = ServiceConfig.model_validate(service_config(gw))
    except ValidationError as error:
        raise RenderError(f"service config breaks the ext_proc contract: {error}") from error
    return Document(f"{target}/service.json", checked.model_dump(mode="json", exclude={"generated_by"}))
