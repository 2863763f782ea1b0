"""The mock providers as a process of their own, for `meshgen lab up`'s supervisor::

    python -m meshgen.lab.mock_process --listen provider.openai.us-east.ep0=18018 [--listen ...] \\
        [--host 127.0.0.1] --admin-port 18019

A thin wrapper around the in-process ``MockProviders`` (``providers.py``), with the command line the providers'
own ``python -m meshgen.lab.providers`` takes. Its admin port answers ``GET /healthz`` (200 ``ok``) and
``GET /counts`` (requests per label, JSON). Runs until SIGTERM or SIGINT; exit 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from meshgen.lab.providers import MockProviders

__all__ = ["main"]


def _listen(value: str) -> tuple[str, int]:
    label, sep, port = value.rpartition("=")
    if not sep or not label or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected LABEL=PORT, got {value!r}")
    return label, int(port)


def _admin_handler(mocks: MockProviders) -> type[BaseHTTPRequestHandler]:
    class Admin(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/healthz":
                self._answer(200, b"ok", "text/plain")
            elif self.path == "/counts":
                self._answer(200, json.dumps(mocks.counts()).encode(), "application/json")
            else:
                self._answer(404, b'{"error": "not found"}', "application/json")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Admin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshgen.lab.mock_process", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", type=_listen, required=True, metavar="LABEL=PORT")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--admin-port", type=int, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with MockProviders(dict(args.listen), host=args.host) as mocks:
        admin = ThreadingHTTPServer((args.host, args.admin_port), _admin_handler(mocks))
        thread = threading.Thread(target=admin.serve_forever, name="mock-admin", daemon=True)
        thread.start()
        print(f"mock providers on {', '.join(f'{k}={v}' for k, v in args.listen)}; admin {args.admin_port}", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            admin.shutdown()
            admin.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
