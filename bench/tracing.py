"""Benchmark (not a test): what tracing and the per-request log line cost the data-plane service, in µs of CPU.

1. **Admission (the hot path)**: the ext_authz HTTP/1.1 protocol fed N keep-alive requests as Envoy sends them
   (key, content-type, body; with tracing, also the ``traceparent`` Envoy injects), parsed and answered by the real
   :class:`~ext_proc.server.Server` with a ledger on the in-memory store; a fake transport collects the answers.
   Three runs: tracing off, tracing on without a ``traceparent`` (header scan only), tracing on with one.
2. **Settle time (off the request path)**: :meth:`RequestLog.finished` per access-log record — the JSON line
   (logged to a null handler) without a tracer, and with a tracer whose exporter encodes each batch to OTLP bytes
   (as the gRPC export would, without the network).

Each figure is the best of ``--runs`` runs of ``--requests`` requests (time.perf_counter, one process).

    .venv/bin/python bench/tracing.py [--requests 20000] [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from ext_proc.accesslog import UsageRecord
from ext_proc.config import ServiceConfig
from ext_proc.ledger import Ledger
from ext_proc.requestlog import RequestLog
from ext_proc.server import Server, _HttpProtocol
from ext_proc.store.memory import MemoryStore
from ext_proc.tracing import Tracer, encode_spans

KEY = "sk-bench-team"
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _config(tracing: bool) -> ServiceConfig:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "policy": "bench",
        "failure_mode": "closed",
        "models": {
            "gpt-4o": {
                "provider": "openai",
                "upstream_name": "gpt-4o",
                "max_tokens_default": 64,
                "price": {"input_per_mtok": 2.5, "output_per_mtok": 10},
            }
        },  # fmt: skip
        "tenants": {"team": {"key_hashes": [hashlib.sha256(KEY.encode()).hexdigest()], "models": ["gpt-4o"]}},
    }
    if tracing:
        doc["tracing"] = {"otlp_endpoint": "http://127.0.0.1:4317"}
    return ServiceConfig.model_validate(doc)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += 1

    def is_closing(self) -> bool:
        return False


def _request(traceparent: bool) -> bytes:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}).encode()
    head = (
        b"POST /authz/v1/chat/completions HTTP/1.1\r\nhost: meshgen-service\r\n"
        b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-type: application/json\r\n"
        b"x-request-id: 5f0c6a1e-0000-4000-8000-000000000000\r\nx-envoy-expected-rq-timeout-ms: 250\r\n"
    )
    if traceparent:
        head += b"traceparent: " + TRACEPARENT + b"\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def admission_us(tracing: bool, traceparent: bool, requests: int, runs: int) -> float:
    async def run() -> float:
        config = _config(tracing)
        ledger = Ledger(config, MemoryStore(), logger=logging.getLogger("bench.null"))
        server = Server(config, ledger=ledger, logger=logging.getLogger("bench.null"))
        protocol = _HttpProtocol(server)
        transport = _Transport()
        protocol.connection_made(transport)
        data = _request(traceparent)
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(requests):
                protocol.data_received(data)
            best = min(best, time.perf_counter() - start)
        assert transport.written == requests * runs, transport.written
        return best / requests * 1e6

    return asyncio.run(run())


class _EncodeOnly(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS


def settle_us(tracing: bool, requests: int, runs: int) -> float:
    config = _config(tracing)
    logger = logging.getLogger("bench.requests")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(_Null()))
    logger.setLevel(logging.INFO)
    tracer = Tracer(config.tracing, exporter=_EncodeOnly()) if config.tracing else None
    log = RequestLog(config, logger=logger, tracer=tracer)
    record = UsageRecord("r", "team", "gpt-4o", "gpt-4o", 12, 34, 200, True, request_id="x",
                         traceparent=TRACEPARENT.decode(), start_ns=time.time_ns(), duration_ns=1_000_000)  # fmt: skip
    batch = [record] * 100
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(requests // len(batch)):
            log.finished(batch)
        if tracer is not None:
            tracer.flush(60_000)  # the export thread's encoding is CPU too: counted
        best = min(best, time.perf_counter() - start)
    if tracer is not None:
        tracer.shutdown()
    return best / requests * 1e6


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures: dict[str, Callable[[], float]] = {
        "admission, tracing off": lambda: admission_us(False, False, args.requests, args.runs),
        "admission, tracing on, no traceparent": lambda: admission_us(True, False, args.requests, args.runs),
        "admission, tracing on, traceparent": lambda: admission_us(True, True, args.requests, args.runs),
        "settle: log line only (tracing off)": lambda: settle_us(False, args.requests, args.runs),
        "settle: log line + span + OTLP encoding": lambda: settle_us(True, args.requests, args.runs),
    }
    results = {name: round(measure(), 2) for name, measure in figures.items()}
    if args.json:
        json.dump(results, sys.stdout)
        print()
    else:
        for name, us in results.items():
            print(f"{name:45s} {us:8.2f} µs/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
