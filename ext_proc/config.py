"""The data-plane service's config contract: ``service.json``, written by ``meshgen build``.

This module is the single definition of that file. ``meshgen`` imports it to render the file; the service
imports it to read the file. It depends on pydantic and the standard library only.

Every model is frozen and rejects unknown fields, so a file written by a newer meshgen fails loudly here
instead of being half understood. A breaking change to the layout bumps ``schema_version``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "Limits",
    "ModelConfig",
    "NonCritical",
    "Price",
    "ProviderConfig",
    "ServiceConfig",
    "TenantConfig",
    "TracingConfig",
    "load_config",
]

SCHEMA_VERSION = 1

# sha256 of an API key, as 64 lowercase hex characters. Plaintext keys never appear in the contract.
KeyHash = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# Tenant names travel in the ``x-meshgen-tenant`` header and in stat names: keep them header- and stat-safe.
TenantName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Price(_Frozen):
    """USD per million tokens."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class ModelConfig(_Frozen):
    provider: str = Field(min_length=1)
    upstream_name: str = Field(min_length=1)
    downgrade: ModelName | None = None
    max_tokens_default: int = Field(ge=1)
    price: Price | None = None
    hedged: bool = False
    """Its route hedges: an answer from a later attempt on another provider is a hedge won (metrics)."""


class ProviderConfig(_Frozen):
    """A provider as the translating upstream ext_proc sees it."""

    api: Literal["openai", "anthropic"]
    """The provider's API schema: which chat endpoint, auth headers and body shape each attempt gets."""
    key_env: EnvName
    """The environment variable of this service holding the provider's API key (never the key itself). Unset or
    empty: attempts to this provider go without credentials."""


class Limits(_Frozen):
    """Per-tenant limits; ``None`` means unlimited."""

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    tpd: int | None = Field(default=None, ge=1)
    usd_per_day: float | None = Field(default=None, ge=0)


class NonCritical(_Frozen):
    """How a tenant marks requests that may wait in a queue, and for how long at most."""

    header: HeaderName
    value: str = Field(min_length=1)
    queue_max_wait_ms: int = Field(ge=0)


class TenantConfig(_Frozen):
    key_hashes: tuple[KeyHash, ...] = Field(min_length=1)
    models: tuple[ModelName, ...]
    limits: Limits = Limits()
    alerts_at: tuple[Annotated[float, Field(gt=0)], ...] = ()
    non_critical: NonCritical | None = None


class TracingConfig(_Frozen):
    """Spans of the service (one per request, ``gen_ai.*`` attributes, never content) over OTLP/gRPC."""

    otlp_endpoint: Annotated[str, StringConstraints(pattern=r"^http://[^/\s]+$")]
    """``http://host:port`` of an OTLP/gRPC collector (plain HTTP/2)."""
    service_name: str = Field("meshgen-service", min_length=1)


class ServiceConfig(_Frozen):
    schema_version: Literal[1]
    generated_by: str | None = None
    """The header `meshgen build` writes (JSON has no comments): which policy and meshgen version made it."""
    policy: str = Field(min_length=1)
    failure_mode: Literal["open", "closed"]
    models: dict[ModelName, ModelConfig]
    tenants: dict[TenantName, TenantConfig]
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=8 * 1024 * 1024)
    """Largest request body admitted (413 above it): Envoy's ext_authz ``with_request_body.max_request_bytes``."""
    store: Literal["sqlite", "redis"] = "sqlite"
    """Where the ledger lives: a SQLite file for one service process, Redis for several replicas."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    ledger_down: Literal["count_locally", "refuse"] = "count_locally"
    """The store does not answer (Redis down, SQLite locked past its busy timeout): ``count_locally`` reserves in
    this process's memory and replays into the store when it answers again; ``refuse`` answers 503
    ``ledger_unavailable`` meanwhile. Either way the store is probed about once a second and recovery is automatic."""
    settle_after_ms: int = Field(120_000, ge=1000)
    """A reservation whose usage has not arrived this long after admission is settled at its estimate."""
    alert_webhook: Annotated[str, StringConstraints(pattern=r"^https?://")] | None = None
    """Budget stage alerts are POSTed here as JSON (fire-and-forget, short timeout), besides the metric and log."""
    providers: dict[str, ProviderConfig] = {}
    """Every provider a translating chain reaches, by the name its endpoints carry in metadata (`meshgen.provider`)."""
    translated_chains: dict[ModelName, dict[str, ModelName]] = {}
    """Chains that cross schemas: model → {provider → the chain's model that provider serves}. The upstream
    ext_proc on `model.<m>.chain` learns each attempt's provider from the chosen endpoint's metadata and sends it
    that model's ``upstream_name`` in that provider's schema."""

    tracing: TracingConfig | None = None
    """None: no spans, and nothing on the request path looks for a trace context."""

    @model_validator(mode="after")
    def _check_references(self) -> ServiceConfig:
        problems: list[str] = []
        for name, model in self.models.items():
            if model.downgrade is not None and model.downgrade not in self.models:
                problems.append(f"models.{name}.downgrade: unknown model {model.downgrade!r}")
        for name, chain in self.translated_chains.items():
            if name not in self.models:
                problems.append(f"translated_chains.{name}: unknown model")
            for provider, target in chain.items():
                if provider not in self.providers:
                    problems.append(f"translated_chains.{name}.{provider}: unknown provider")
                if target not in self.models:
                    problems.append(f"translated_chains.{name}.{provider}: unknown model {target!r}")
        for name, model in self.models.items():
            if name in self.translated_chains and model.provider not in self.providers:
                problems.append(f"models.{name}.provider: unknown provider {model.provider!r}")
        owner: dict[str, str] = {}
        for tenant_name, tenant in self.tenants.items():
            for i, model_name in enumerate(tenant.models):
                if model_name not in self.models:
                    problems.append(f"tenants.{tenant_name}.models[{i}]: unknown model {model_name!r}")
            for i, key_hash in enumerate(tenant.key_hashes):
                other = owner.setdefault(key_hash, tenant_name)
                if other != tenant_name:
                    problems.append(f"tenants.{tenant_name}.key_hashes[{i}]: key hash already used by tenant {other!r}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class ConfigError(Exception):
    """``service.json`` is missing, unreadable or does not match this contract. The message names the file."""


def load_config(path: str | Path) -> ServiceConfig:
    """Read and validate ``service.json``; raise :class:`ConfigError` naming the file and every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, not {type(data).__name__}")
    if "schema_version" not in data:
        raise ConfigError(f"{path}: schema_version is missing; this service reads schema_version {SCHEMA_VERSION}")
    version = data["schema_version"]
    if version != SCHEMA_VERSION or type(version) is not int:
        raise ConfigError(
            f"{path}: schema_version is {version!r}, this service reads schema_version {SCHEMA_VERSION}; "
            "rebuild the config with a meshgen that matches this service"
        )
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid config:\n{_format_errors(exc)}") from None


def _format_errors(exc: ValidationError) -> str:
    """One line per problem: ``  tenants.team-a.key_hashes[0]: <what is wrong>``."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ""
        for part in err["loc"]:
            if isinstance(part, int):
                where += f"[{part}]"
            elif part == "[key]":
                where += " (the name)"
            else:
                where += f".{part}" if where else part
        message = err["msg"].removeprefix("Value error, ")
        if where:
            lines.append(f"  {where}: {message}")
        else:  # cross-reference checks: each line already says where
            lines += [f"  {line}" for line in message.splitlines()]
    return "\n".join(lines)
