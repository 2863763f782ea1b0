"""The intermediate representation: one target-neutral, frozen, fully resolved model of the gateway.

Everything a renderer needs is decided here: defaults applied, names derived, order fixed, durations in
milliseconds. Renderers read only this, never the policy, so one IR renders identically for every target.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Endpoint(Frozen):
    name: str
    """`provider.openai.us-east.ep0`: the provider cluster name plus the endpoint's index in the policy."""
    host: str
    port: int
    tls: bool
    weight: int


class Outlier(Frozen):
    consecutive_5xx: int
    interval_ms: int
    ejection_ms: int
    max_ejection_percent: int


class Breakers(Frozen):
    max_connections: int
    max_pending: int
    max_requests: int
    max_retries: int


class Fault(Frozen):
    name: str
    """The policy's key (`openai-slow`); runtime keys `meshgen.chaos.<name>.{delay,abort}_percent` switch it."""
    delay_ms: int | None
    abort_status: int | None
    percent: float
    """The share `meshgen chaos` switches it to; compiled in at 0 %."""


class ProviderCluster(Frozen):
    """One provider's endpoints in one region: `provider.openai.us-east` (`.global` when unplaced)."""

    name: str
    provider: str
    region: str
    schema_: Literal["openai", "anthropic"]
    endpoints: tuple[Endpoint, ...]
    timeout_ms: int
    connect_timeout_ms: int
    outlier: Outlier
    breakers: Breakers
    faults: tuple[Fault, ...]
    """Faults aimed at this cluster; non-empty means a chaos hop sits in front of it."""
    key_env: str
    """The data-plane service's environment variable holding this provider's API key: the policy's `api_key_env`,
    else `MESHGEN_KEY_<PROVIDER>`. Only a translating chain's upstream ext_proc sets it on requests."""


class Hedge(Frozen):
    after_ms: int


class Canary(Frozen):
    model: str
    weight: float
    header_name: str
    header_value: str


class Mirror(Frozen):
    model: str
    percent: float


class Model(Frozen):
    name: str
    provider: str
    schema_: Literal["openai", "anthropic"]
    upstream_name: str
    failover: tuple[str, ...]
    """Failover models in order; one of another schema makes the chain translate (the upstream ext_proc)."""
    hedge: Hedge | None
    canary: Canary | None
    mirror: Mirror | None
    downgrade: str | None
    price_input_per_mtok: float | None
    price_output_per_mtok: float | None
    affinity_header: str | None
    retries: int
    per_try_timeout_ms: int
    """One attempt: the hedge delay, else `retry.per_try_timeout`, else the model's or provider's timeout."""
    timeout_ms: int
    """The whole request, every attempt included."""
    max_tokens_default: int


class Limits(Frozen):
    rpm: int | None
    tpm: int | None
    tpd: int | None
    usd_per_day: float | None


class NonCritical(Frozen):
    header: str
    value: str
    queue_max_wait_ms: int


class Tenant(Frozen):
    name: str
    key_hashes: tuple[str, ...]
    """Hex sha256 digests, sorted; the policy's `sha256:` prefix is dropped."""
    models: tuple[str, ...]
    limits: Limits
    alerts_at: tuple[float, ...]
    non_critical: NonCritical | None


class Jwt(Frozen):
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None


class Region(Frozen):
    name: str
    auth: Literal["api-key", "jwt", "mtls"]
    jwt: Jwt | None
    chains: tuple[tuple[str, tuple[str, ...]], ...]
    """(model, provider clusters in priority order) for this region: local clusters first, then other regions,
    then each failover model the same way (a cluster only once, for the first model that reaches it)."""


class Slo(Frozen):
    name: str
    objective: float
    window_ms: int
    threshold_ms: int | None


class Service(Frozen):
    timeout_ms: int
    """The admission call's timeout (Envoy's ext_authz): the policy's `service.timeout`, raised to the longest
    non-critical `queue_max_wait` plus a margin when a tenant's requests may be held that long. A maximum, not a
    delay: every other admission still answers in well under a millisecond."""
    failure_mode: Literal["open", "closed"]
    max_request_bytes: int
    store: Literal["sqlite", "redis"]
    redis_url: str
    ledger_down: Literal["count_locally", "refuse"]
    """The store does not answer: count in the service's memory and reconcile later, or refuse with 503."""
    alert_webhook: str | None
    settle_after_ms: int
    """How long after admission a request's usage may still arrive: the longest route timeout plus the access
    log's flush and a margin. Later, its reservation is settled at the estimate."""


class Tracing(Frozen):
    """Spans over OTLP/gRPC to one collector, from every Envoy and from the data-plane service."""

    otlp_host: str
    otlp_port: int
    sample_percent: float
    """Share of requests Envoy starts a trace for."""

    @property
    def otlp_endpoint(self) -> str:
        return f"http://{self.otlp_host}:{self.otlp_port}"


class Ports(Frozen):
    """Loopback ports of the `local` target, keyed by what listens there (`listener.us-east`, `admin.us-east`,
    `service`, `chaos.provider.openai.us-east`, `provider.openai.us-east.ep0`, and the lab's `mocks.admin`,
    `supervisor` (its metrics) and `prometheus`). Derived from `lab.base_port`;
    tests swap in free ports with `model_copy`."""

    by_name: tuple[tuple[str, int], ...]

    @cached_property
    def _index(self) -> dict[str, int]:
        return dict(self.by_name)

    def of(self, name: str) -> int:
        return self._index[name]


class Gateway(Frozen):
    name: str
    source: str
    """The policy file as given on the command line: named in every generated file's header."""
    regions: tuple[Region, ...]
    clusters: tuple[ProviderCluster, ...]
    models: tuple[Model, ...]
    tenants: tuple[Tenant, ...]
    slos: tuple[Slo, ...]
    service: Service
    ports: Ports
    tracing: Tracing | None = None
    """None: no tracing anywhere (the policy's `observability.otlp_endpoint` unset)."""

    @cached_property
    def _models(self) -> dict[str, Model]:
        return {m.name: m for m in self.models}

    @cached_property
    def _clusters(self) -> dict[str, ProviderCluster]:
        return {c.name: c for c in self.clusters}

    @cached_property
    def downgrade_targets(self) -> frozenset[str]:
        """Models the data-plane service may re-route a request to (the header route exists only for them)."""
        return frozenset(m.downgrade for m in self.models if m.downgrade)

    def model(self, name: str) -> Model:
        return self._models[name]

    def cluster(self, name: str) -> ProviderCluster:
        return self._clusters[name]
