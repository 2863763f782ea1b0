"""The lab's webhook receiver for Alertmanager::

    python -m meshgen.lab.alert_sink --host 127.0.0.1 --port PORT

Accepts Alertmanager's webhook POSTs on any path, prints one JSON line per notification (its receiver, status and
each alert's labels: what a pager would get) and keeps them: ``GET /notifications`` answers the list received so
far, ``GET /healthz`` ``ok``. Runs until SIGTERM or SIGINT (exit 0). Lab-only: nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["main"]

MAX_KEPT = 1000


class _Sink(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.lock = threading.Lock()
        self.notifications: list[dict[str, Any]] = []


class _Handler(BaseHTTPRequestHandler):
    server: _Sink

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/healthz":
            self._answer(200, b"ok", "text/plain")
        elif self.path == "/notifications":
            with self.server.lock:
                body = json.dumps(self.server.notifications).encode()
            self._answer(200, body)
        else:
            self._answer(404, b"{}")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("content-length") or 0)
        try:
            notification = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            self._answer(400, b'{"error": "not JSON"}')
            return
        if not isinstance(notification, dict):
            self._answer(400, b'{"error": "not a JSON object"}')
            return
        with self.server.lock:
            self.server.notifications = [*self.server.notifications[-(MAX_KEPT - 1) :], notification]
        line = {
            "event": "alert_notification",
            "receiver": notification.get("receiver"),
            "status": notification.get("status"),
            "alerts": [a.get("labels", {}) for a in notification.get("alerts", []) if isinstance(a, dict)],
        }
        print(json.dumps(line, sort_keys=True), flush=True)
        self._answer(200, b"{}")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Quiet: one line per notification is printed by do_POST."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshgen.lab.alert_sink", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        server = _Sink((args.host, args.port))
    except OSError as error:
        print(f"alert sink: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: types.FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"alert sink ready on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
