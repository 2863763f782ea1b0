"""Usage of JSON responses from Envoy's gRPC access-log service (ALS): ``envoy.service.accesslog.v3``.

The gateway's ``envoy.access_loggers.http_grpc`` logger (log name ``meshgen.usage``) streams batches of
``HTTPAccessLogEntry`` here over one long-lived gRPC stream per Envoy worker, flushed every 0.5 s: no gRPC call
per request. Each entry's ``common_properties.metadata`` carries what this service needs, never a body or a key:

- ``envoy.filters.http.ext_authz``: ``x-meshgen-reservation``, ``x-meshgen-tenant`` (this service's admission answer),
  ``x-meshgen-downgraded-from`` and ``x-meshgen-queued-ms`` when admission downgraded or held the request;
- ``meshgen.req``: ``model`` (the request body's model);
- ``meshgen.resp``: ``prompt_tokens``/``completion_tokens`` (OpenAI) or ``input_tokens``/``output_tokens``
  (Anthropic), ``model`` (the model that served), lifted from a JSON response body by ``json_to_metadata``.

With tracing on, the entry's request headers carry ``traceparent`` (the gateway's span); its start and duration
time the service's span for the request (:mod:`ext_proc.tracing`).

Every entry with a reservation becomes one :class:`UsageRecord`; entries without one are ignored. The records of
one message go, in order, to the injected ``on_usages`` callback in one call (the ledger settles them in one
store transaction) or, without one, to ``on_usage`` one by one. A failing callback is logged (reservation and
error type only) and the stream goes on, so one bad record never costs a batch: when ``on_usages`` fails, the
message's records are delivered again one by one to ``on_usage`` (settling is idempotent).
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

__all__ = [
    "AUTHZ_NAMESPACE",
    "PROMPT_TOKENS_KEY",
    "REQUEST_NAMESPACE",
    "RESERVATION_KEY",
    "RESPONSE_NAMESPACE",
    "TENANT_KEY",
    "AccessLogServicer",
    "OnUsage",
    "OnUsages",
    "UsageRecord",
    "serve_grpc",
    "usage_from_entry",
]

AUTHZ_NAMESPACE: Final = "envoy.filters.http.ext_authz"
RESERVATION_KEY: Final = "x-meshgen-reservation"
TENANT_KEY: Final = "x-meshgen-tenant"
REQUEST_NAMESPACE: Final = "meshgen.req"
RESPONSE_NAMESPACE: Final = "meshgen.resp"
SERVED_BY_HEADER: Final = "x-meshgen-served-by"
DOWNGRADED_KEY: Final = "x-meshgen-downgraded-from"
QUEUED_KEY: Final = "x-meshgen-queued-ms"
PROMPT_TOKENS_KEY: Final = "x-meshgen-prompt-tokens"
"""A stream's prompt tokens as admission estimated them (ext_proc settles a stream cut before its usage with it)."""
TRACE_HEADER: Final = "traceparent"
RETRY_AFTER_HEADER: Final = "retry-after"

# (input, output) key pairs in meshgen.resp, first present wins.
_USAGE_KEYS: Final = (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"))
CACHED_INPUT_KEYS: Final = ("cache_creation_input_tokens", "cache_read_input_tokens")
"""Anthropic's cached prompt tokens, counted apart from its ``input_tokens``: part of the input all the same."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one finished request used, for settling its reservation."""

    reservation: str
    tenant: str | None
    request_model: str | None
    """The model the client asked for (request body)."""
    served_model: str | None
    """The model the provider says answered (response body); differs after a downgrade or a failover."""
    input_tokens: int
    output_tokens: int
    status: int
    """The HTTP status the client got; 0 when no response was sent (client gone, stream reset)."""
    has_usage: bool
    """False when the response carried no usage (an error, an SSE stream, a non-JSON body): tokens are then 0
    and the reservation should be settled some other way (released, or by the streaming path)."""
    estimated: bool = False
    """Counted by us (a stream cut before its usage, with the tokenizer), not reported by the provider."""
    attempts: int = 1
    """Upstream attempts Envoy made (retries and hedges included)."""
    served_by: str | None = None
    """The provider that answered (``x-meshgen-served-by``)."""
    request_id: str | None = None
    """Envoy's ``x-request-id``."""
    traceparent: str | None = None
    """The gateway's span (W3C ``traceparent``), logged only when tracing is on."""
    downgraded_from: str | None = None
    """The model asked for, when admission downgraded the request (``x-meshgen-downgraded-from``)."""
    queued_ms: int | None = None
    """How long admission held the request in the non-critical queue (``x-meshgen-queued-ms``)."""
    start_ns: int | None = None
    """When Envoy received the request (Unix time, ns)."""
    duration_ns: int | None = None
    """Until the last byte went to the client."""
    retry_after_s: float | None = None
    """The answer's Retry-After, in seconds (absent, or an HTTP date: None)."""
    overflow: bool = False
    """Envoy refused the request itself: the circuit breaker to the provider was full (response flag UO)."""


OnUsage = Callable[[UsageRecord], Awaitable[object]]
OnUsages = Callable[[Sequence[UsageRecord]], Awaitable[object]]


def _fields(filter_metadata: Any, namespace: str) -> Any | None:
    """The ``google.protobuf.Struct`` fields of one namespace, or None."""
    struct = filter_metadata.get(namespace)
    return None if struct is None else struct.fields


def _string(fields: Any | None, key: str) -> str | None:
    value = None if fields is None else fields.get(key)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return str(value.string_value) or None


def _count(fields: Any | None, key: str) -> int | None:
    """A token count: a non-negative finite number (json_to_metadata NUMBER), else None."""
    value = None if fields is None else fields.get(key)
    if value is None or value.WhichOneof("kind") != "number_value":
        return None
    number = float(value.number_value)
    if not math.isfinite(number) or number < 0:
        return None
    return int(number)


def usage_from_entry(entry: Any) -> UsageRecord | None:
    """One ``envoy.data.accesslog.v3.HTTPAccessLogEntry`` → its usage, or None without a reservation."""
    filter_metadata = entry.common_properties.metadata.filter_metadata
    authz = _fields(filter_metadata, AUTHZ_NAMESPACE)
    reservation = _string(authz, RESERVATION_KEY)
    if reservation is None:
        return None
    resp = _fields(filter_metadata, RESPONSE_NAMESPACE)
    input_tokens = output_tokens = 0
    has_usage = False
    if resp is not None:
        for in_key, out_key in _USAGE_KEYS:
            found_in, found_out = _count(resp, in_key), _count(resp, out_key)
            if found_in is not None or found_out is not None:
                input_tokens, output_tokens, has_usage = found_in or 0, found_out or 0, True
                if in_key == "input_tokens":
                    input_tokens += sum(_count(resp, key) or 0 for key in CACHED_INPUT_KEYS)
                break
    response = entry.response
    status = response.response_code.value if response.HasField("response_code") else 0
    common = entry.common_properties
    queued = _string(authz, QUEUED_KEY)
    return UsageRecord(
        reservation,
        _string(authz, TENANT_KEY),
        _string(_fields(filter_metadata, REQUEST_NAMESPACE), "model"),
        _string(resp, "model"),
        input_tokens,
        output_tokens,
        int(status),
        has_usage,
        attempts=max(1, int(common.upstream_request_attempt_count)),
        served_by=response.response_headers.get(SERVED_BY_HEADER) or None,
        request_id=entry.request.request_id or None,
        traceparent=entry.request.request_headers.get(TRACE_HEADER) or None,
        downgraded_from=_string(authz, DOWNGRADED_KEY),
        queued_ms=int(queued) if queued is not None and queued.isdigit() else None,
        start_ns=common.start_time.ToNanoseconds() if common.HasField("start_time") else None,
        duration_ns=_duration_ns(common),
        retry_after_s=_seconds(response.response_headers.get(RETRY_AFTER_HEADER)),
        overflow=common.response_flags.upstream_overflow,
    )


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _duration_ns(common: Any) -> int | None:
    for field in ("duration", "time_to_last_downstream_tx_byte"):
        if common.HasField(field):
            return int(getattr(common, field).ToNanoseconds())
    return None


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """``AccessLogService/StreamAccessLogs``: the HTTP entries with a reservation → ``on_usages`` (one call per
    message) or ``on_usage`` (one call per record)."""

    def __init__(
        self, on_usage: OnUsage, *, on_usages: OnUsages | None = None, logger: logging.Logger | None = None
    ) -> None:
        self._on_usage = on_usage
        self._on_usages = on_usages
        self._log = logger or logging.getLogger("ext_proc")

    async def StreamAccessLogs(  # noqa: N802 (the gRPC method's name)
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> Any:
        async for message in request_iterator:
            if message.WhichOneof("log_entries") != "http_logs":
                continue  # TCP entries: nothing to settle
            records = [r for r in map(usage_from_entry, message.http_logs.log_entry) if r is not None]
            if not records:
                continue
            if self._on_usages is not None and await self._deliver_all(records):
                continue
            for record in records:
                await self._deliver(record)
        return als_pb2.StreamAccessLogsResponse()

    async def _deliver_all(self, records: Sequence[UsageRecord]) -> bool:
        """True when ``on_usages`` took the batch; False (logged) when it failed and the records must go one by
        one."""
        assert self._on_usages is not None
        try:
            await self._on_usages(records)
        except Exception as exc:  # noqa: BLE001 (retried record by record: one bad record must not cost the batch)
            self._log.error(json.dumps(_error_line("usage_batch_error", exc) | {"records": len(records)}))
            return False
        return True

    async def _deliver(self, record: UsageRecord) -> None:
        try:
            await self._on_usage(record)
        except Exception as exc:  # noqa: BLE001 (one bad record must not end Envoy's stream and lose the batch)
            self._log.error(json.dumps(_error_line("usage_error", exc) | {"reservation": record.reservation}))


def _error_line(event: str, exc: BaseException) -> dict[str, Any]:
    frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)]
    return {"event": event, "error": type(exc).__name__, "stack": frames}


async def serve_grpc(
    host: str,
    port: int,
    *,
    on_usage: OnUsage,
    on_usages: OnUsages | None = None,
    processor: Any | None = None,
    logger: logging.Logger | None = None,
) -> grpc.aio.Server:
    """Start the service's gRPC port (the policy's ``service.grpc``): the access-log service and, when given,
    the ext_proc ``processor`` (an ``ExternalProcessorServicer``, :mod:`ext_proc.processor`) on one server. Stop
    it with ``await server.stop(grace)``. Raises OSError when the address cannot be bound."""
    # No SO_REUSEPORT: a second service on the same port must fail here, not silently share Envoy's streams.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = AccessLogServicer(on_usage, on_usages=on_usages, logger=logger)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
    if processor is not None:
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server
