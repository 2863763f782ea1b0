"""Command line: ``python -m ext_proc --config service.json [--host H] [--port P]``.

Nothing happens at import; :func:`main` loads the config, builds the :class:`~ext_proc.server.Server`,
prints ``meshgen-service listening on HOST:PORT`` to stderr once it accepts connections, and returns 0
after SIGTERM or SIGINT. A bad config file returns 1 with a message naming the file and the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from ext_proc.config import ConfigError, ServiceConfig, load_config
from ext_proc.server import Server

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
    return asyncio.run(_serve(config, args.host, args.port, args.max_body_bytes, logger))


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


async def _serve(
    config: ServiceConfig, host: str, port: int, max_body_bytes: int | None, logger: logging.Logger
) -> int:
    server = Server(config, max_body_bytes=max_body_bytes, logger=logger)
    try:
        bound_host, bound_port = await server.start(host, port)
    except OSError as exc:
        print(f"{PROG}: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
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
    return 0
