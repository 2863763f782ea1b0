"""The mock providers as a process of their own::

    python -m meshgen.lab.providers --listen LABEL=PORT [--listen LABEL=PORT ...] [--host 127.0.0.1] \\
        --admin-port PORT [--require-auth GLOB[=KEY] ...] [--strict-schema GLOB ...]

Serves every ``LABEL=PORT`` and the admin API on ``--admin-port`` (``GET /healthz`` on each), prints one line
``mock providers ready: ...`` when all listen, then one line per answered request (``LABEL METHOD PATH OUTCOME
MS``; ``--quiet`` leaves them out), and runs until SIGTERM or SIGINT: exit 0. Exit 1 when a port
cannot be bound, 2 on a bad command line.

``--require-auth GLOB[=KEY]`` makes the labels matching GLOB refuse requests without the provider's credential
(with exactly KEY when given) and ``--strict-schema GLOB`` refuse bodies that are not the endpoint's schema, each
with the provider's real error. Both are off by default (Envoy strips the client's key; a provider's own key is
only set where a chain crosses schemas) and, unlike global faults, survive ``DELETE /faults``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from meshgen.lab.mock_header import MOCK_HEADER, MockHeaderError, format_items
from meshgen.lab.providers.server import MockProviders, RecordedRequest

__all__ = ["main"]


def _listen(value: str) -> tuple[str, int]:
    label, sep, port = value.rpartition("=")
    if not sep or not label or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected LABEL=PORT, got {value!r}")
    return label, int(port)


def _require_auth(value: str) -> tuple[str, str]:
    scope, sep, key = value.partition("=")
    if not scope:
        raise argparse.ArgumentTypeError(f"expected GLOB or GLOB=KEY, got {value!r}")
    return scope, format_items([("auth_key", key)]) if sep and key else "auth=required"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meshgen.lab.providers",
        description="Mock OpenAI, Anthropic and Ollama providers, steerable per request (x-mock) and globally.",
    )
    p.add_argument("--listen", action="append", type=_listen, required=True, metavar="LABEL=PORT")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--admin-port", type=int, required=True, metavar="PORT")
    p.add_argument("--require-auth", action="append", type=_require_auth, default=[], metavar="GLOB[=KEY]")
    p.add_argument("--strict-schema", action="append", default=[], metavar="GLOB")
    p.add_argument("--quiet", action="store_true", help="no line per answered request")
    return p


def _access_line(r: RecordedRequest) -> None:
    ms = (time.monotonic() - r.time) * 1000
    x_mock = r.headers.get(MOCK_HEADER)
    print(f"{r.label} {r.method} {r.path} {r.outcome} {ms:.0f}ms" + (f" x-mock={x_mock}" if x_mock else ""), flush=True)


async def _serve(mocks: MockProviders) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def ready() -> None:
        ports = ", ".join(f"{label}={port}" for label, port in mocks.labels.items())
        print(f"mock providers ready: {ports}; admin {mocks.admin_port}", flush=True)

    await mocks.serve(stop, ready)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    labels = dict(args.listen)
    settings = [*args.require_auth, *((scope, "schema=strict") for scope in args.strict_schema)]
    try:
        log = None if args.quiet else _access_line
        mocks = MockProviders(labels, host=args.host, admin_port=args.admin_port, settings=settings, access_log=log)
    except (ValueError, MockHeaderError) as e:
        print(f"mock providers: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(mocks))
    except OSError as e:
        print(f"mock providers could not listen: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
