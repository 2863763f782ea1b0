"""Policy → IR. Defaults, names, ordering and ports are resolved here, once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar
from urllib.parse import urlsplit

from meshgen.ir import model as ir
from meshgen.policy import model as pm

GLOBAL_REGION = "global"
SETTLE_MARGIN_MS = 10_000
"""Beyond the longest request: the access log's flush (0.5 s) and a slow, busy service."""
QUEUE_MARGIN_MS = 1_000
"""Beyond the longest non-critical queue wait: the service's last retry and its answer."""


def build_gateway(policy: pm.Policy, *, source: str) -> ir.Gateway:
    clusters = build_clusters(policy)
    models = build_models(policy)
    longest_ms = max(m.timeout_ms for m in models)
    longest_wait_ms = max((t.non_critical.queue_max_wait for t in policy.tenants.values() if t.non_critical), default=0)
    return ir.Gateway(
        name=policy.name,
        source=source,
        regions=build_regions(policy, clusters, models),
        clusters=clusters,
        models=models,
        tenants=build_tenants(policy),
        slos=build_slos(policy),
        service=ir.Service(
            # A held non-critical request is answered only after its wait: the admission call must outlast it.
            timeout_ms=max(policy.service.timeout, longest_wait_ms + QUEUE_MARGIN_MS if longest_wait_ms else 0),
            failure_mode=policy.service.failure_mode,
            max_request_bytes=policy.service.max_request_bytes,
            store=policy.service.store,
            redis_url=policy.service.redis_url,
            ledger_down=policy.service.ledger_down,
            alert_webhook=policy.service.alert_webhook,
            settle_after_ms=longest_ms + SETTLE_MARGIN_MS,
        ),
        ports=build_ports(policy, clusters),
        tracing=build_tracing(policy),
    )


def build_tracing(policy: pm.Policy) -> ir.Tracing | None:
    endpoint = policy.observability.otlp_endpoint
    if endpoint is None:
        return None
    url = urlsplit(endpoint)
    return ir.Tracing(
        otlp_host=url.hostname or "",
        otlp_port=url.port or 4317,
        sample_percent=policy.observability.sample_percent,
    )


def _endpoint(cluster: str, index: int, endpoint: pm.Endpoint) -> ir.Endpoint:
    url = urlsplit(endpoint.url)
    tls = url.scheme == "https"
    return ir.Endpoint(
        name=f"{cluster}.ep{index}",
        host=url.hostname or "",
        port=url.port or (443 if tls else 80),
        tls=tls,
        weight=endpoint.weight,
    )


_Section = TypeVar("_Section", pm.Outlier, pm.CircuitBreakers)


def _merged(default: _Section, override: _Section | None) -> _Section:
    """A provider's override changes only the fields it names; the rest come from provider_defaults."""
    return default if override is None else default.model_copy(update=override.model_dump(exclude_unset=True))


def key_env(provider: str) -> str:
    """`MESHGEN_KEY_<PROVIDER>`: where the data-plane service finds a provider's key unless the policy names one."""
    return "MESHGEN_KEY_" + "".join(c if c.isalnum() else "_" for c in provider.upper())


def build_clusters(policy: pm.Policy) -> tuple[ir.ProviderCluster, ...]:
    defaults = policy.provider_defaults
    clusters = []
    for provider_name, provider in sorted(policy.providers.items()):
        outlier = _merged(defaults.outlier, provider.outlier)
        breakers = _merged(defaults.circuit_breakers, provider.circuit_breakers)
        by_region: dict[str, list[pm.Endpoint]] = {}
        for endpoint in provider.endpoints:
            by_region.setdefault(endpoint.region or GLOBAL_REGION, []).append(endpoint)
        for region, endpoints in sorted(by_region.items()):
            name = f"provider.{provider_name}.{region}"
            faults = tuple(
                ir.Fault(name=fault_name, delay_ms=fault.delay, abort_status=fault.abort, percent=fault.percent)
                for fault_name, fault in sorted(policy.chaos.items())
                if fault.target.provider == provider_name and fault.target.region in (None, region)
            )
            clusters.append(
                ir.ProviderCluster(
                    name=name,
                    provider=provider_name,
                    region=region,
                    schema_=provider.schema_,
                    endpoints=tuple(_endpoint(name, i, e) for i, e in enumerate(endpoints)),
                    timeout_ms=provider.timeout or defaults.timeout,
                    connect_timeout_ms=provider.connect_timeout or defaults.connect_timeout,
                    outlier=ir.Outlier(
                        consecutive_5xx=outlier.consecutive_5xx,
                        interval_ms=outlier.interval,
                        ejection_ms=outlier.ejection,
                        max_ejection_percent=outlier.max_ejection_percent,
                    ),
                    breakers=ir.Breakers(**breakers.model_dump()),
                    faults=faults,
                    key_env=provider.api_key_env or key_env(provider_name),
                )
            )
    return tuple(clusters)


def build_models(policy: pm.Policy) -> tuple[ir.Model, ...]:
    models = []
    for name, spec in sorted(policy.models.items()):
        schema = policy.providers[spec.provider].schema_
        failover = spec.failover or []

        canary = spec.canary
        provider_ms = spec.timeout or policy.providers[spec.provider].timeout or policy.provider_defaults.timeout
        # One attempt may take the provider's timeout, unless a hedge or per-try timeout cuts it shorter.
        attempt_ms = spec.hedge.after if spec.hedge else spec.retry.per_try_timeout or provider_ms
        header_name, header_value = next(iter(canary.header.items())) if canary and canary.header else ("", "")
        models.append(
            ir.Model(
                name=name,
                provider=spec.provider,
                schema_=schema,
                upstream_name=spec.upstream_name or name,
                failover=tuple(failover),
                hedge=ir.Hedge(after_ms=spec.hedge.after) if spec.hedge else None,
                canary=ir.Canary(
                    model=canary.model,
                    weight=canary.weight,
                    header_name=header_name,
                    header_value=header_value,
                )
                if canary
                else None,
                mirror=ir.Mirror(model=spec.mirror.model, percent=spec.mirror.percent) if spec.mirror else None,
                downgrade=spec.downgrade,
                price_input_per_mtok=spec.price.input_per_mtok if spec.price else None,
                price_output_per_mtok=spec.price.output_per_mtok if spec.price else None,
                affinity_header=spec.affinity.header.lower() if spec.affinity else None,
                retries=spec.retry.attempts,
                per_try_timeout_ms=attempt_ms,
                # Hedged attempts run side by side, so the slowest needs the provider's time; retries run in turn.
                timeout_ms=provider_ms if spec.hedge else attempt_ms * (spec.retry.attempts + 1),
                max_tokens_default=spec.max_tokens_default,
            )
        )
    return tuple(models)


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def provider_order(clusters: tuple[ir.ProviderCluster, ...], provider: str, region: str) -> tuple[str, ...]:
    """A provider's clusters as one region sees them: its own region first, then unplaced, then the others."""

    def rank(c: ir.ProviderCluster) -> tuple[int, str]:
        return (0 if c.region == region else 1 if c.region == GLOBAL_REGION else 2, c.region)

    return tuple(c.name for c in sorted((c for c in clusters if c.provider == provider), key=rank))


def build_regions(
    policy: pm.Policy, clusters: tuple[ir.ProviderCluster, ...], models: tuple[ir.Model, ...]
) -> tuple[ir.Region, ...]:
    by_name = {m.name: m for m in models}
    regions = []
    for name, region in sorted(policy.regions.items()):
        chains = tuple(
            (
                m.name,
                _unique(
                    cluster
                    for target in (m.name, *m.failover)
                    for cluster in provider_order(clusters, by_name[target].provider, name)
                ),
            )
            for m in models
        )
        jwt = region.jwt
        regions.append(
            ir.Region(
                name=name,
                auth=region.auth,
                jwt=ir.Jwt(issuer=jwt.issuer, audiences=tuple(jwt.audiences), jwks_uri=jwt.jwks_uri) if jwt else None,
                chains=chains,
            )
        )
    return tuple(regions)


def build_tenants(policy: pm.Policy) -> tuple[ir.Tenant, ...]:
    return tuple(
        ir.Tenant(
            name=name,
            key_hashes=tuple(sorted(k.removeprefix("sha256:") for k in tenant.keys)),
            models=tuple(sorted(set(tenant.models))),
            limits=ir.Limits(**tenant.limits.model_dump()),
            alerts_at=tuple(tenant.alerts_at),
            non_critical=ir.NonCritical(
                header=tenant.non_critical.header.lower(),
                value=tenant.non_critical.value,
                queue_max_wait_ms=tenant.non_critical.queue_max_wait,
            )
            if tenant.non_critical
            else None,
        )
        for name, tenant in sorted(policy.tenants.items())
    )


def build_slos(policy: pm.Policy) -> tuple[ir.Slo, ...]:
    return tuple(
        ir.Slo(name=name, objective=slo.objective, window_ms=slo.window, threshold_ms=slo.threshold)
        for name, slo in sorted(policy.slos.items())
    )


def build_ports(policy: pm.Policy, clusters: tuple[ir.ProviderCluster, ...]) -> ir.Ports:
    """Consecutive ports from `lab.base_port`, in a fixed order so the local target is stable."""
    names = ["service", "service.grpc"]
    for region in sorted(policy.regions):
        names += [f"listener.{region}", f"admin.{region}"]
        names += [f"chaos.{region}.{c.name}" for c in clusters if c.faults]
    names += [e.name for c in clusters for e in c.endpoints]
    # The lab's own parts, last so the ports above stay where they were: the mock providers' admin API, the
    # supervisor's metrics (`meshgen lab up`) and Prometheus when it is installed.
    names += ["mocks.admin", "supervisor", "prometheus"]
    return ir.Ports(by_name=tuple((n, policy.lab.base_port + i) for i, n in enumerate(names)))
