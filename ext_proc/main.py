"""Command line: ``python -m ext_proc --config service.json [--host H] [--port P]``.

Nothing happens at import; :func:`main` loads the config, builds the :class:`~ext_proc.server.Server`,
prints ``meshgen-service listening on HOST:PORT`` to stderr once it accepts connections, and returns 0
after SIGTERM or SIGINT. A bad config file returns 1 with a message naming the file and the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Final

import grpc

from ext_proc import tokens
from ext_proc.accesslog import OnUsage, OnUsages, UsageRecord, serve_grpc
from ext_proc.config import ConfigError, ServiceConfig, load_config
from ext_proc.ledger import Ledger
from ext_proc.processor import ExternalProcessor, Settle
from ext_proc.queueing import HoldQueue
from ext_proc.requestlog import RequestLog
from ext_proc.server import Server
from ext_proc.store.base import Store
from ext_proc.store.redis import RedisStore
from ext_proc.store.sqlite import SqliteStore
from ext_proc.tracing import Tracer

__all__ = ["main"]

PROG = "meshgen-service"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="meshgen data-plane service (ext_authz over HTTP/1.1)")
    parser.add_argument("--config", required=True, help="service.json written by 'meshgen build'")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=18090, help="port to listen on, 0 for any free one")
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="refuse larger request bodies with 413 (default: the config's max_request_bytes)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="port of the access-log gRPC service Envoy reports usage to (default: none, usage not settled)",
    )
    parser.add_argument(
        "--ledger",
        default="meshgen-ledger.sqlite",
        help="SQLite ledger file when the config's store is sqlite (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; argparse already printed why
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    logger = _configure_logging(args.log_level)
    return asyncio.run(_serve(config, args, logger))


def _configure_logging(level: str) -> logging.Logger:
    """One JSON object per line on stderr (the messages are already JSON)."""
    logger = logging.getLogger("ext_proc")
    logger.setLevel(level)
    logger.propagate = False
    if not any(getattr(h, "_meshgen_service", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._meshgen_service = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger


async def _open_store(config: ServiceConfig, ledger_path: str) -> Store:
    if config.store == "redis":
        return RedisStore.from_url(config.redis_url)
    return SqliteStore.open(ledger_path)


async def _sweep(ledger: Ledger, logger: logging.Logger) -> None:
    """Settle overdue reservations at their estimate, a few times per settle window."""
    while True:
        await asyncio.sleep(min(5.0, ledger.settle_after_s / 4))
        try:
            for settled in await ledger.sweep():
                logger.info(
                    json.dumps({"event": "settled_estimated", "tenant": settled.tenant, "model": settled.model})
                )
        except Exception as exc:  # a store hiccup must not end the sweeps
            logger.error(json.dumps({"event": "sweep_failed", "error": type(exc).__name__}))


RECONCILE_EVERY_S = 1.0


async def _reconcile(ledger: Ledger, logger: logging.Logger, every_s: float = RECONCILE_EVERY_S) -> None:
    """While the ledger is degraded (its store down), probe the store about once a second; when it answers, the
    ledger replays what it counted meanwhile and leaves degraded mode (:meth:`Ledger.reconcile`)."""
    while True:
        await asyncio.sleep(every_s)
        if not ledger.degraded:
            continue
        try:
            await ledger.reconcile()
        except Exception as exc:  # a bug, not the store being down (reconcile handles that): keep trying
            logger.error(json.dumps({"event": "reconcile_failed", "error": type(exc).__name__}))


STREAM_SETTLE_BATCH_S: Final = 0.002
"""How long a stream's settle waits for others to share its ledger transaction."""


def stream_settle(ledger: Ledger, requests: RequestLog | None = None) -> Settle:
    """The streaming path's settle → :meth:`Ledger.settle_many`; a cut stream's tokenizer count is marked estimated.
    The settles of streams ending within :data:`STREAM_SETTLE_BATCH_S` of each other share one ledger call (one store
    transaction, budget stages checked once per tenant): one per stream cost the service ~10 % of a stream's CPU.
    The counts also wait in ``requests`` for the request's access-log entry (its log line)."""
    batch: list[tuple[UsageRecord, asyncio.Future[object]]] = []

    async def flush() -> None:
        taken = batch.copy()
        batch.clear()
        try:
            results = await ledger.settle_many([usage for usage, _ in taken])
        except Exception as exc:  # noqa: BLE001 (each waiting settle raises it: the processor logs it)
            for _, waiter in taken:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for (_, waiter), result in zip(taken, results, strict=True):
            if not waiter.done():
                waiter.set_result(result)

    async def settle(
        reservation: str, served_model: str | None, input_tokens: int, output_tokens: int, estimated: bool
    ) -> object:
        if requests is not None:
            requests.stream_settled(reservation, served_model, input_tokens, output_tokens, estimated)
        usage = UsageRecord(
            reservation=reservation,
            tenant=None,
            request_model=None,
            served_model=served_model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            status=200,
            has_usage=True,
            estimated=estimated,
        )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[object] = loop.create_future()
        if not batch:
            loop.call_later(STREAM_SETTLE_BATCH_S, start_flush)
        batch.append((usage, waiter))
        return await waiter

    flushing: set[asyncio.Task[None]] = set()

    def start_flush() -> None:
        task = asyncio.get_running_loop().create_task(flush())
        flushing.add(task)
        task.add_done_callback(flushing.discard)

    return settle


def settle_and_log(ledger: Ledger, requests: RequestLog, queue: HoldQueue) -> tuple[OnUsage, OnUsages]:
    """The access log's callbacks: settle in the ledger, then one line (and span) per request; the queue learns
    which providers are saturated."""

    async def on_usage(record: UsageRecord) -> object:
        queue.saw((record,))
        settled = await ledger.settle(record)
        requests.finished([record])
        return settled

    async def on_usages(records: Sequence[UsageRecord]) -> object:
        queue.saw(records)
        settled = await ledger.settle_many(records)
        requests.finished(records)
        return settled

    return on_usage, on_usages


async def _serve(config: ServiceConfig, args: argparse.Namespace, logger: logging.Logger) -> int:
    host, port = args.host, args.port
    tokens.load()
    store = await _open_store(config, args.ledger)
    ledger = Ledger(config, store, logger=logger)
    tracer = Tracer(config.tracing, logger=logger) if config.tracing is not None else None
    requests = RequestLog(config, logger=logger, tracer=tracer)
    server = Server(config, max_body_bytes=args.max_body_bytes, logger=logger, ledger=ledger, requests=requests)
    on_usage, on_usages = settle_and_log(ledger, requests, server.queue)
    access_log: grpc.aio.Server | None = None
    sweeper = asyncio.create_task(_sweep(ledger, logger))
    reconciler = asyncio.create_task(_reconcile(ledger, logger))
    try:
        if args.grpc_port is not None:
            processor = ExternalProcessor(
                config, stream_settle(ledger, requests), logger=logger, observe_ttft=ledger.metrics.ttft.observe
            )
            access_log = await serve_grpc(
                host,
                args.grpc_port,
                on_usage=on_usage,
                on_usages=on_usages,
                processor=processor,
                logger=logger,
            )
            print(f"{PROG} access log and ext_proc on {host}:{args.grpc_port}", file=sys.stderr, flush=True)
        bound_host, bound_port = await server.start(host, port)
    except OSError as exc:
        print(f"{PROG}: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        await _shutdown((sweeper, reconciler), access_log, store, ledger, tracer)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"{PROG} listening on {shown}:{bound_port}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await server.close()
        await _shutdown((sweeper, reconciler), access_log, store, ledger, tracer)
    return 0


async def _shutdown(
    loops: tuple[asyncio.Task[None], ...],
    access_log: grpc.aio.Server | None,
    store: Store,
    ledger: Ledger,
    tracer: Tracer | None = None,
) -> None:
    for task in loops:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if access_log is not None:
        await access_log.stop(grace=1.0)  # Envoy's last batch still settles
    if ledger.degraded and not await ledger.reconcile():  # one last try: what was counted locally dies with us
        logging.getLogger("ext_proc").error(
            json.dumps({"event": "ledger_lost_local", "reservations": len(ledger.local)})
        )
    await store.close()
    if tracer is not None:  # the last spans go out (bounded by the exporter's timeout)
        await asyncio.get_running_loop().run_in_executor(None, tracer.shutdown)
