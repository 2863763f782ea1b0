"""One JSON log line per request — and, with tracing on, one span — never a prompt, a completion or a key.

Where each request's line comes from:

- **refused at admission** (401/403/404/400/413/429/503): the server, when it refuses (:meth:`RequestLog.refused`);
  no access-log entry follows, since nothing was reserved.
- **admitted**: the gRPC access log's entry for the finished request (:meth:`RequestLog.finished`, after the
  ledger settled the batch): the status the client got, tokens and cost (priced as the model that served it),
  whether admission downgraded or queued it. A stream's tokens come from the streaming path's settle, which ends
  before Envoy writes the entry; they wait here (:meth:`RequestLog.stream_settled`) until the entry comes, bounded
  in number and time.

The line::

    {"event": "request", "decision": "allowed" | "downgraded" | "queued" | "refused", "reason": <code> | null,
     "status": 200, "tenant": "team-a", "model": "gpt-4o", "model_served": "gpt-4o-mini", "provider": "openai",
     "input_tokens": 12, "output_tokens": 30, "cost_usd": 0.00033, "estimated": false, "queued_ms": null,
     "attempts": 1, "request_id": "…", "trace_id": "<32 hex>" | null}

``reason`` says why a request was refused (the error code: ``rate_limit_exceeded``, ``insufficient_quota``,
``model_not_allowed``, …, and the limit for a 429: ``rpm``/``tpm``/``tpd``/``usd_per_day``, ``queue_timeout``)
or, for a downgrade, the model asked for. ``trace_id`` is the gateway's trace (from ``traceparent``), so a line
leads to its trace.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ext_proc.accesslog import UsageRecord
from ext_proc.config import ServiceConfig
from ext_proc.errors import ApiError, LimitExceeded
from ext_proc.tracing import Tracer, trace_id_of

__all__ = ["RequestLog"]

STREAM_KEEP: Final = 10_000
"""Stream settles waiting for their access-log entry, at most (the oldest go first)."""
STREAM_KEEP_S: Final = 600.0


@dataclass(frozen=True, slots=True)
class _Streamed:
    served_model: str | None
    input_tokens: int
    output_tokens: int
    estimated: bool
    at: float


class RequestLog:
    def __init__(
        self,
        config: ServiceConfig,
        *,
        logger: logging.Logger | None = None,
        tracer: Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger if logger is not None else logging.getLogger("ext_proc")
        self._tracer = tracer
        self._clock = clock
        self._models = config.models
        self._by_upstream = {m.upstream_name: name for name, m in config.models.items()} | {
            name: name for name in config.models
        }
        self._streamed: OrderedDict[str, _Streamed] = OrderedDict()
        self._batch: list[str] | None = None
        """The lines of the access-log batch being logged: one log record (one write) for the whole batch, since
        a record per line was a tenth of the service's CPU under load."""

    # --- admitted requests: the access log ---

    def stream_settled(
        self, reservation: str, served_model: str | None, input_tokens: int, output_tokens: int, estimated: bool
    ) -> None:
        """A stream's counts, for its request's line when the access-log entry comes."""
        now = self._clock()
        self._streamed[reservation] = _Streamed(served_model, input_tokens, output_tokens, estimated, now)
        while self._streamed:
            oldest = next(iter(self._streamed.values()))
            if len(self._streamed) <= STREAM_KEEP and oldest.at >= now - STREAM_KEEP_S:
                break
            self._streamed.popitem(last=False)

    def finished(self, records: Sequence[UsageRecord]) -> None:
        """One line (and span) per finished admitted request, the batch's lines in one record; never raises."""
        self._batch = lines = []
        try:
            for record in records:
                try:
                    self._finished(record)
                except Exception as exc:  # noqa: BLE001 (a log line must never cost a settle)
                    lines.append(json.dumps({"event": "request_log_error", "error": type(exc).__name__}))
        finally:
            self._batch = None
            if lines:
                self._log.info("\n".join(lines))

    def _finished(self, r: UsageRecord) -> None:
        streamed = self._streamed.pop(r.reservation, None)
        served = r.served_model
        tokens_in: int | None = r.input_tokens if r.has_usage else None
        tokens_out: int | None = r.output_tokens if r.has_usage else None
        estimated = r.estimated
        if streamed is not None and not r.has_usage:
            served = streamed.served_model or served
            tokens_in, tokens_out, estimated = streamed.input_tokens, streamed.output_tokens, streamed.estimated
        requested = r.downgraded_from or r.request_model
        model_served = self._by_upstream.get(served or "") or served
        if model_served is None and r.status and r.status < 400:
            model_served = r.request_model
        spec = self._models.get(model_served or "") or self._models.get(r.request_model or "")
        cost = None
        if tokens_in is not None and tokens_out is not None:
            price = spec.price if spec is not None else None
            cost = (
                0.0
                if price is None
                else round((tokens_in * price.input_per_mtok + tokens_out * price.output_per_mtok) / 1e6, 9)
            )
        if r.downgraded_from is not None:
            decision, reason = "downgraded", r.downgraded_from
        elif r.queued_ms is not None:
            decision, reason = "queued", None
        else:
            decision, reason = "allowed", None
        provider = r.served_by or (spec.provider if spec is not None else None)
        trace_id = trace_id_of(r.traceparent)
        if self._tracer is not None:
            end_ns = r.start_ns + r.duration_ns if r.start_ns is not None and r.duration_ns is not None else None
            attributes: dict[str, str | int | float | bool] = {
                "gen_ai.operation.name": "chat",
                "meshgen.decision": decision,
                "http.response.status_code": r.status,
            }
            _put(attributes, "gen_ai.system", provider)
            _put(attributes, "gen_ai.request.model", requested)
            _put(attributes, "gen_ai.response.model", served)
            _put(attributes, "gen_ai.usage.input_tokens", tokens_in)
            _put(attributes, "gen_ai.usage.output_tokens", tokens_out)
            _put(attributes, "meshgen.tenant", r.tenant)
            _put(attributes, "meshgen.model_served", model_served)
            _put(attributes, "meshgen.cost_usd", cost)
            _put(attributes, "meshgen.queued_ms", r.queued_ms)
            name = f"chat {requested}" if requested else "chat"
            made = self._tracer.span(
                name,
                traceparent=r.traceparent,
                start_ns=r.start_ns,
                end_ns=end_ns,
                attributes=attributes,
                error=r.status == 0 or r.status >= 500,
            )
            trace_id = trace_id or made
        self._line(
            decision=decision,
            reason=reason,
            status=r.status,
            tenant=r.tenant,
            model=requested,
            model_served=model_served,
            provider=provider,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=cost,
            estimated=estimated,
            queued_ms=r.queued_ms,
            attempts=r.attempts,
            request_id=r.request_id,
            trace_id=trace_id,
        )

    # --- refused at admission ---

    def refused(self, err: ApiError, status: int, traceparent: str | None = None) -> None:
        reason = err.reason if isinstance(err, LimitExceeded) else err.code
        trace_id = trace_id_of(traceparent)
        if self._tracer is not None and traceparent is not None:
            attributes: dict[str, str | int | float | bool] = {
                "gen_ai.operation.name": "chat",
                "meshgen.decision": "refused",
                "meshgen.reason": reason,
                "http.response.status_code": status,
            }
            _put(attributes, "gen_ai.request.model", err.model)
            _put(attributes, "meshgen.tenant", err.tenant)
            now = time.time_ns()
            self._tracer.span(
                f"chat {err.model}" if err.model else "chat",
                traceparent=traceparent,
                start_ns=now,
                end_ns=now,
                attributes=attributes,
                error=True,
            )
        self._line(
            decision="refused",
            reason=reason,
            status=status,
            tenant=err.tenant,
            model=err.model,
            trace_id=trace_id,
        )

    def _line(self, **fields: Any) -> None:
        line = json.dumps({"event": "request", **fields})
        if self._batch is None:
            self._log.info(line)
        else:
            self._batch.append(line)


def _put(attributes: dict[str, str | int | float | bool], key: str, value: str | int | float | None) -> None:
    if value is not None:
        attributes[key] = value
