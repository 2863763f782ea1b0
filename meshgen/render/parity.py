"""Feature parity between the targets: every policy field, what renders it for Envoy and for Istio.

`tests/istio/test_parity.py` walks the policy model and fails when a field is in no row. A feature a target
cannot carry says so with `NotSupported`, whose error the test provokes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NotSupported:
    reason: str


@dataclass(frozen=True)
class Feature:
    fields: tuple[str, ...]
    """Dotted policy paths, maps and lists stepped through (`models.hedge.after`)."""
    envoy: str
    istio: str | NotSupported


SERVICE = "the data-plane service's config (ConfigMap meshgen-service-config in Istio, service.json in Compose)"

FEATURES: tuple[Feature, ...] = (
    Feature(("api_version", "name"), "generated-by header", "generated-by header; name in the service config"),
    Feature(
        ("service.timeout", "service.failure_mode", "service.max_request_bytes"),
        "envoy/filters ext_authz (timeout, failure_mode_allow, with_request_body)",
        "istio/envoyfilter.py ext_authz patch (same fields)",
    ),
    Feature(
        ("service.store", "service.redis_url", "service.ledger_down", "service.alert_webhook"),
        SERVICE,
        SERVICE,
    ),
    Feature(("regions.auth",), "listener TLS / mTLS, api-key via ext_authz", "Gateway TLS MUTUAL, PeerAuthentication"),
    Feature(
        ("regions.jwt.issuer", "regions.jwt.audiences", "regions.jwt.jwks_uri"),
        "envoy/filters/jwt",
        "istio/security.py RequestAuthentication",
    ),
    Feature(
        tuple(
            f"{base}.{f}"
            for base in ("provider_defaults", "providers")
            for f in (
                "timeout",
                "connect_timeout",
                "outlier.consecutive_5xx",
                "outlier.interval",
                "outlier.ejection",
                "outlier.max_ejection_percent",
                "circuit_breakers.max_connections",
                "circuit_breakers.max_pending",
                "circuit_breakers.max_requests",
                "circuit_breakers.max_retries",
            )
        ),
        "envoy/clusters.py outlier_detection, circuit_breakers, connect_timeout; route timeout",
        "istio/destinationrule.py outlierDetection, connectionPool; VirtualService timeout",
    ),
    Feature(
        ("providers.schema_", "providers.api_key_env", "models.upstream_name"),
        "upstream ext_proc on translating chains + " + SERVICE,
        "EnvoyFilter CLUSTER patch (upstream ext_proc) + " + SERVICE,
    ),
    Feature(
        ("providers.endpoints.url", "providers.endpoints.region", "providers.endpoints.weight"),
        "envoy/clusters.py endpoints (locality, load_balancing_weight, TLS)",
        "ServiceEntry hosts / mock Deployments, DestinationRule locality failover and TLS origination",
    ),
    Feature(
        ("models.provider", "models.failover"),
        "envoy/routes.py route → aggregate chain cluster (priorities)",
        "VirtualService route to the chain's first provider; DestinationRule localityLbSetting failover",
    ),
    Feature(("models.hedge.after",), "route hedge_policy + per_try_timeout", "EnvoyFilter HTTP_ROUTE hedge_policy"),
    Feature(
        ("models.canary.model", "models.canary.weight", "models.canary.header"),
        "weighted_clusters; header-matched .beta route",
        "VirtualService weighted destinations; header-matched .beta route",
    ),
    Feature(
        ("models.mirror.model", "models.mirror.percent"),
        "request_mirror_policies",
        "VirtualService mirror + mirrorPercentage",
    ),
    Feature(("models.downgrade",), "x-meshgen-route header route + " + SERVICE, "x-meshgen-route match + " + SERVICE),
    Feature(
        ("models.price.input_per_mtok", "models.price.output_per_mtok", "models.max_tokens_default"),
        SERVICE,
        SERVICE,
    ),
    Feature(("models.affinity.header",), "route hash_policy (ring hash)", "DestinationRule consistentHash"),
    Feature(
        ("models.retry.attempts", "models.retry.per_try_timeout", "models.timeout"),
        "route retry_policy, timeout",
        "VirtualService retries, timeout",
    ),
    Feature(
        (
            "tenants.keys",
            "tenants.limits.tpm",
            "tenants.limits.tpd",
            "tenants.limits.usd_per_day",
            "tenants.alerts_at",
            "tenants.non_critical.header",
            "tenants.non_critical.value",
            "tenants.non_critical.queue_max_wait",
        ),
        SERVICE,
        SERVICE,
    ),
    Feature(("tenants.models",), "envoy/filters/rbac", "AuthorizationPolicy tenant-models"),
    Feature(("tenants.limits.rpm",), "local rate limit per tenant", "the data-plane service's admission limit"),
    Feature(
        ("chaos.target.provider", "chaos.target.region", "chaos.delay", "chaos.abort", "chaos.percent"),
        "chaos hop listener with runtime-switched faults",
        "VirtualService chaos-<cluster> on the provider hop (never with retries, MG313)",
    ),
    Feature(("slos.objective", "slos.window", "slos.threshold"), "Prometheus rules", "Prometheus rules"),
    Feature(
        ("observability.otlp_endpoint", "observability.sample_percent"),
        "HCM OpenTelemetry tracer",
        "Telemetry tracing randomSamplingPercentage",
    ),
    Feature(
        ("lab.base_port",),
        "generated/local/ loopback ports",
        NotSupported("the lab's loopback ports; in a cluster every Service has its own address"),
    ),
)


def feature_of(field: str) -> Feature | None:
    return next((f for f in FEATURES if field in f.fields), None)
