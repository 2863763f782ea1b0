"""``MockAdmin``: the mocks' admin API (``admin.py``) from Python, for tests, the lab and `meshgen chaos`::

    admin = MockAdmin("http://127.0.0.1:18019")
    admin.fault("provider.openai.*", "status=500")
    ...
    assert admin.count("provider.anthropic.*") == 3
    admin.clear_faults()

Standard library only (``urllib``); every call is bounded by ``timeout``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode

from meshgen.lab.providers.server import Fault, RecordedRequest

__all__ = ["MockAdmin", "MockAdminError"]


class MockAdminError(RuntimeError):
    """The admin API refused a call (its ``error`` message), or did not answer."""


class MockAdmin:
    def __init__(self, base_url: str, *, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None, **query: str | int | None) -> Any:
        params = {k: v for k, v in query.items() if v is not None}
        url = f"{self.base_url}{path}" + (f"?{urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                pass
            raise MockAdminError(f"{method} {path}: {e.code} {detail}") from None
        except OSError as e:
            raise MockAdminError(f"{method} {path}: {e}") from None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=self.timeout) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise MockAdminError(f"{self.base_url}/healthz did not answer within {timeout}s")
            time.sleep(0.05)

    def labels(self) -> dict[str, int]:
        return dict(self._call("GET", "/labels")["labels"])

    # ---- faults -------------------------------------------------------------------------------------------------
    def fault(self, scope: str, mock: str, percent: int = 100) -> list[Fault]:
        """Add a global fault: ``mock`` (the ``x-mock`` grammar) on the labels matching ``scope``, on ``percent``
        of their requests; every fault now set."""
        return self._faults(self._call("POST", "/faults", {"scope": scope, "mock": mock, "percent": percent}))

    def faults(self) -> list[Fault]:
        return self._faults(self._call("GET", "/faults"))

    def clear_faults(self, scope: str | None = None) -> list[Fault]:
        return self._faults(self._call("DELETE", "/faults", scope=scope))

    @staticmethod
    def _faults(answer: Any) -> list[Fault]:
        return [Fault(f["scope"], f["mock"], f["percent"]) for f in answer["faults"]]

    # ---- what was received --------------------------------------------------------------------------------------
    def requests(
        self, label: str | None = None, *, since: int = 0, max_body: int | None = None
    ) -> list[RecordedRequest]:
        """Recorded requests in arrival order (``label`` a glob); bodies cut at ``max_body`` bytes (64 KiB)."""
        got = self._call("GET", "/requests", label=label, since=since or None, max_body=max_body)
        return [
            RecordedRequest(
                label=r["label"],
                port=r["port"],
                method=r["method"],
                path=r["path"],
                headers=r["headers"],
                header_list=tuple((n, v) for n, v in r["header_list"]),
                body=r["body"].encode(),
                time=r["time"],
                seq=r["seq"],
                outcome=r["outcome"],
            )
            for r in got["requests"]
        ]

    def count(self, label: str | None = None) -> int:
        return len(self.requests(label, max_body=0))

    def counts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self._call("GET", "/counts").items()}

    def clear_requests(self) -> int:
        return int(self._call("DELETE", "/requests")["cleared"])

    def wait_for(self, label: str | None, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Poll until at least ``n`` requests matched ``label``."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.requests(label)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"wait_for({label!r}, {n}): only {len(got)} after {timeout}s; counts={self.counts()}"
                )
            time.sleep(0.02)
