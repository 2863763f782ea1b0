"""The policy file's vocabulary: pydantic models with ``extra="forbid"``.

Field shapes are checked here; cross-references (unknown models, failover cycles, duplicate keys) live in
``checks.py`` so that every error in a file is reported in one run. Fields marked *not yet rendered* are
validated now so a policy written today stays valid, and are compiled by a later issue.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(value: object) -> int:
    """'250ms' | '5s' | '2m' | '1h' | '30d' → milliseconds. Bare numbers are refused: their unit is a guess."""
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            ms = float(match.group(1)) * _UNIT_MS[match.group(2)]
            if ms > 0 and ms == int(ms):
                return int(ms)
    raise ValueError(f"bad duration {value!r}: use a positive number with a unit, e.g. 250ms, 5s, 2m, 1h, 30d")


Duration = Annotated[int, BeforeValidator(parse_duration)]
"""A duration in the file ('5s'), an integer of milliseconds once loaded."""

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$", max_length=63)]
HEADER_PATTERN = r"^[A-Za-z0-9-]+$"
HeaderName = Annotated[str, StringConstraints(pattern=HEADER_PATTERN)]
"""An HTTP header name the policy routes on; any case. No ``_``: Envoy drops headers with underscores."""
RESERVED_HEADER_PREFIXES = ("x-meshgen-", "x-envoy-")
"""The gateway strips client headers with these prefixes (any case) before routing (check MG401)."""
KeyHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
Percent = Annotated[float, Field(ge=0, le=100)]


def _sorted_unique(values: list[float]) -> list[float]:
    if sorted(set(values)) != values:
        raise ValueError("alert thresholds must be increasing and distinct, e.g. [0.8, 0.9, 1.0]")
    return values


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Jwt(Strict):
    """Not yet rendered (the JWT filter comes with the security issue)."""

    issuer: str
    audiences: list[str] = Field(min_length=1)
    jwks_uri: str | None = None


class Region(Strict):
    auth: Literal["api-key", "jwt", "mtls"] = "api-key"
    jwt: Jwt | None = None
    """Required when ``auth: jwt``. Not yet rendered."""


class Endpoint(Strict):
    url: Annotated[str, StringConstraints(pattern=r"^https?://[^/\s:]+(:\d{1,5})?/?$")]
    region: Name | None = None
    """Region the endpoint lives in; none means reachable from every region alike (cluster ``provider.<p>.global``)."""
    weight: int = Field(1, ge=1, le=128)


class Outlier(Strict):
    """As a provider's override, only the fields it sets (``model_fields_set``) replace ``provider_defaults``."""

    consecutive_5xx: int = Field(5, ge=1)
    interval: Duration = 10_000
    ejection: Duration = 30_000
    max_ejection_percent: int = Field(50, ge=1, le=100)


class CircuitBreakers(Strict):
    """As a provider's override, only the fields it sets (``model_fields_set``) replace ``provider_defaults``."""

    max_connections: int = Field(1024, ge=1)
    max_pending: int = Field(256, ge=1)
    max_requests: int = Field(1024, ge=1)
    max_retries: int = Field(1024, ge=1)
    """Retries and hedges in flight to this provider at once (a model's route allows the sum over its
    failover chain)."""


class ProviderDefaults(Strict):
    timeout: Duration = 30_000
    connect_timeout: Duration = 2_000
    outlier: Outlier = Outlier()
    circuit_breakers: CircuitBreakers = CircuitBreakers()


class Provider(Strict):
    schema_: Literal["openai", "anthropic"] = Field(alias="schema")
    endpoints: list[Endpoint] = Field(min_length=1)
    api_key_env: str | None = None
    """The data-plane service's environment variable holding the provider key (default `MESHGEN_KEY_<PROVIDER>`).
    Set on the requests of chains that cross schemas, where the upstream ext_proc rewrites each attempt."""
    timeout: Duration | None = None
    connect_timeout: Duration | None = None
    outlier: Outlier | None = None
    circuit_breakers: CircuitBreakers | None = None


class Hedge(Strict):
    after: Duration
    """Send a second attempt to the next failover target when the first has no response headers by then."""


class Canary(Strict):
    model: Name
    weight: Percent = 10
    header: dict[HeaderName, str] = Field(default_factory=lambda: {"X-Model-Version": "beta"}, max_length=1)


class Mirror(Strict):
    model: Name
    percent: Percent = 100


class Price(Strict):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class Affinity(Strict):
    header: HeaderName


class Retry(Strict):
    attempts: int = Field(2, ge=0, le=10)
    per_try_timeout: Duration | None = None


class ModelSpec(Strict):
    provider: Name
    upstream_name: str | None = None
    """Model name the provider knows; defaults to the key. Sent as the body's `model` by a chain that crosses
    schemas (every attempt is rewritten upstream) and on a budget downgrade; other chains pass the client's name."""
    failover: list[Name] | None = None
    hedge: Hedge | None = None
    canary: Canary | None = None
    mirror: Mirror | None = None
    downgrade: Name | None = None
    """Cheaper model served once the tenant's daily budget (USD, else tokens per day) is spent — even when the tenant's
    `models` do not list it: the downgrade is the operator's policy. Refused (429) when it does not fit the budget
    either."""
    price: Price | None = None
    """Not yet rendered (token economy issue)."""
    affinity: Affinity | None = None
    retry: Retry = Retry()
    max_tokens_default: int = Field(1024, ge=1)
    """Reservation size when a request names no max_tokens. Not yet rendered (token economy issue)."""
    timeout: Duration | None = None


class Limits(Strict):
    rpm: int | None = Field(None, ge=1)
    """Requests per minute, enforced by Envoy's local rate limit per gateway replica."""
    tpm: int | None = Field(None, ge=1)
    tpd: int | None = Field(None, ge=1)
    usd_per_day: float | None = Field(None, gt=0)
    """tpm, tpd and usd_per_day: enforced by the data-plane service's ledger."""


class NonCritical(Strict):
    """Requests carrying `header: value` wait up to `queue_max_wait` while the tenant is over its rpm or tpm, or while
    the model's provider is saturated, instead of a 429 (or the provider's refusal) at once (the service holds its
    admission answer; Envoy's ext_authz timeout is raised to outlast it)."""

    header: HeaderName = "x-priority"
    value: str = "low"
    queue_max_wait: Duration = 20_000


class Tenant(Strict):
    keys: list[KeyHash] = Field(min_length=1)
    models: list[Name]
    limits: Limits = Limits()
    alerts_at: Annotated[list[Annotated[float, Field(gt=0, le=1)]], AfterValidator(_sorted_unique)] = Field(
        default_factory=lambda: [0.8, 0.9, 1.0]
    )
    non_critical: NonCritical | None = None


class FaultTarget(Strict):
    provider: Name
    region: Name | None = None


class Fault(Strict):
    target: FaultTarget
    delay: Duration | None = None
    abort: int | None = Field(None, ge=200, le=599)
    percent: Percent = 100
    """Share of requests hit once the fault is switched on; compiled in at 0 %."""


class Slo(Strict):
    """Not yet rendered (Prometheus rules come with the observability issue)."""

    objective: float = Field(gt=0, lt=100)
    window: Duration = 30 * 86_400_000
    threshold: Duration | None = None
    """With a threshold this is a latency SLO: share of requests answered faster than it."""


class Service(Strict):
    """The data-plane service (``ext_proc/``) as Envoy sees it."""

    timeout: Duration = 250
    """Envoy's wait for an admission answer; raised to outlast the longest tenant `non_critical.queue_max_wait`."""
    failure_mode: Literal["open", "closed"] = "closed"
    max_request_bytes: int = Field(1_048_576, ge=1024, le=8 * 1024 * 1024)
    """The data-plane service refuses bodies over 8 MiB itself."""
    store: Literal["sqlite", "redis"] = "sqlite"
    """The ledger of tokens and dollars: SQLite for one service process, Redis for several replicas."""
    redis_url: str = Field("redis://127.0.0.1:6379/0", pattern=r"^rediss?://")
    ledger_down: Literal["count_locally", "refuse"] = "count_locally"
    """When the ledger's store (Redis, or a locked SQLite file) does not answer within its short timeout:
    `count_locally` keeps traffic flowing — each service process counts and enforces limits in its own memory,
    then replays what it counted into the store once it answers again (limits are per process meanwhile);
    `refuse` answers 503 `ledger_unavailable` until the store is back. Either way the service recovers by itself."""
    alert_webhook: str | None = Field(None, pattern=r"^https?://")
    """Budget stage alerts (each tenant's `alerts_at`) are also POSTed here as JSON, fire-and-forget."""


_OTLP_ENDPOINT = re.compile(r"^http://[^/\s:]+:\d{1,5}/?$")


def _otlp_endpoint(value: str) -> str:
    if not _OTLP_ENDPOINT.match(value):
        raise ValueError(
            f"bad OTLP endpoint {value!r}: use http://<host>:<port> of an OTLP/gRPC collector, "
            "e.g. http://otel-collector:4317"
        )
    return value


class Observability(Strict):
    """Tracing: every Envoy (its OpenTelemetry tracer) and the data-plane service (one span per request with the
    `gen_ai.*` attributes, never a prompt or a completion) send spans over OTLP/gRPC to `otlp_endpoint`.
    Unset: no tracing at all."""

    otlp_endpoint: Annotated[str, AfterValidator(_otlp_endpoint)] | None = None
    """An OTLP/gRPC collector, plain HTTP/2: `http://otel-collector:4317`."""
    sample_percent: Percent = 100
    """Share of requests Envoy starts a trace for (a client's sampled `traceparent` is always followed)."""


class Lab(Strict):
    """Where the `generated/local/` target puts things on this machine."""

    base_port: int = Field(18000, ge=1024, le=60000)


class Policy(Strict):
    api_version: Literal["meshgen/v1"] = Field(alias="apiVersion")
    name: Name
    service: Service = Service()
    regions: dict[Name, Region] = Field(min_length=1)
    provider_defaults: ProviderDefaults = ProviderDefaults()
    providers: dict[Name, Provider] = Field(min_length=1)
    models: dict[Name, ModelSpec] = Field(min_length=1)
    tenants: dict[Name, Tenant] = Field(default_factory=dict)
    chaos: dict[Name, Fault] = Field(default_factory=dict)
    slos: dict[Name, Slo] = Field(default_factory=dict)
    observability: Observability = Observability()
    lab: Lab = Lab()
