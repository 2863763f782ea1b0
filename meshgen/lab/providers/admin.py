"""The mocks' admin API (JSON over HTTP/1.1 on ``--admin-port``), for tests, the lab and `meshgen chaos`:

    GET    /healthz                          200 ``ok``
    GET    /labels                           {"labels": {label: port}}
    GET    /faults                           {"faults": [{"scope": GLOB, "mock": "status=500", "percent": 100}, ...]}
    POST   /faults  {"scope": GLOB, "mock", "percent": 1..100}
                                             add a global fault (scope ``*`` and percent 100 by default; a percent
                                              applies it to that share of the matching requests, evenly spread);
                                              400 {"error"} on bad grammar
    DELETE /faults[?scope=GLOB]              drop every global fault, or those set for exactly that scope
    GET    /requests[?label=GLOB][&since=SEQ][&max_body=BYTES]
                                             {"requests": [{seq, label, port, method, path, headers,
                                              header_list, body, body_length, time, outcome}]}; ``body`` is the
                                              body as text, cut at ``max_body`` (default 65536) bytes; ``outcome``
                                              how it was answered (``RecordedRequest.outcome``)
    DELETE /requests                         forget what was received: {"cleared": n}
    GET    /counts                           {label: n} for every label

``mock`` is the ``x-mock`` grammar (``mock_header.py``); a request's own ``x-mock`` header wins key by key, and
``global=off`` in it ignores the global faults altogether.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from meshgen.lab.mock_header import MockHeaderError

if TYPE_CHECKING:
    from meshgen.lab.providers.server import MockProviders, RecordedRequest

__all__ = ["DEFAULT_MAX_BODY", "handle", "record_json"]

DEFAULT_MAX_BODY = 65536


def record_json(r: RecordedRequest, max_body: int = DEFAULT_MAX_BODY) -> dict[str, Any]:
    return {
        "seq": r.seq,
        "label": r.label,
        "port": r.port,
        "method": r.method,
        "path": r.path,
        "headers": r.headers,
        "header_list": [list(h) for h in r.header_list],
        "body": r.body[:max_body].decode("utf-8", "replace"),
        "body_length": len(r.body),
        "time": r.time,
        "outcome": r.outcome,
    }


def _json(status: int, obj: Any) -> tuple[int, bytes]:
    return status, json.dumps(obj).encode()


def _faults(mocks: MockProviders) -> dict[str, Any]:
    return {"faults": [{"scope": f.scope, "mock": f.mock, "percent": f.percent} for f in mocks.faults()]}


def handle(mocks: MockProviders, method: str, target: str, body: bytes) -> tuple[int, bytes]:
    """Status and JSON body for one admin request."""
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    path = url.path.rstrip("/") or "/"
    try:
        if path == "/labels" and method == "GET":
            return _json(200, {"labels": mocks.labels})
        if path == "/counts" and method == "GET":
            return _json(200, mocks.counts())
        if path == "/faults":
            if method == "GET":
                return _json(200, _faults(mocks))
            if method == "POST":
                spec = json.loads(body or b"{}")
                if not isinstance(spec, dict) or not isinstance(spec.get("mock"), str):
                    return _json(400, {"error": 'expected {"scope": GLOB, "mock": "key=value;..."}'})
                scope = spec.get("scope", "*")
                if not isinstance(scope, str) or not scope:
                    return _json(400, {"error": "scope must be a non-empty label glob"})
                percent = spec.get("percent", 100)
                if not isinstance(percent, int) or isinstance(percent, bool) or not 1 <= percent <= 100:
                    return _json(400, {"error": f"percent must be an integer within 1..100, got {percent!r}"})
                mocks.fault(scope, spec["mock"], percent)
                return _json(200, _faults(mocks))
            if method == "DELETE":
                mocks.clear_faults(query.get("scope"))
                return _json(200, _faults(mocks))
        if path == "/requests":
            if method == "GET":
                since = int(query.get("since", "0"))
                max_body = int(query.get("max_body", str(DEFAULT_MAX_BODY)))
                records = mocks.requests(query.get("label"), since=since)
                return _json(200, {"requests": [record_json(r, max_body) for r in records]})
            if method == "DELETE":
                return _json(200, {"cleared": mocks.clear()})
        if path in {"/labels", "/counts", "/faults", "/requests"}:
            return _json(405, {"error": f"{method} {path} is not allowed"})
        return _json(404, {"error": f"no such admin endpoint: {path}"})
    except MockHeaderError as e:
        return _json(400, {"error": str(e)})
    except ValueError as e:  # bad JSON, bad integer
        return _json(400, {"error": str(e)})
