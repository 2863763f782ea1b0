"""The lab's mock LLM providers: one header-steerable mock listening on many loopback ports at once.

`meshgen lab up` starts one on every provider endpoint port of the `local` target; the tests use the same mock.
Each port carries a label (``provider.openai.us-east.ep0``) so a test can assert *which* upstream
a request reached through the real Envoy, with which headers and body::

    with MockProviders({"provider.openai.us-east.ep0": 18101, "provider.ollama.us-east.ep0": 18102}) as up:
        ...send through Envoy with header  x-mock: status=503@provider.openai.*;delay_ms=50
        assert up.count("provider.ollama.us-east.ep0") == 1

The ``x-mock`` request header steers each answer (grammar and precedence: ``mock_header.py``); what is
answered by default, on an error status and for streaming requests: ``answers.py``.
Every answer carries ``x-served-by: <label>`` and a Content-Length.
``GET /healthz`` answers 200 and is not recorded (Envoy health checks do not disturb counts).

The server is asyncio in one background thread: any number of concurrent connections, HTTP/1.1 keep-alive,
chunked request bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshgen.lab.answers import answer, error_json, reason_phrase
from meshgen.lab.lifecycle import Managed
from meshgen.lab.mock_header import MOCK_HEADER, Behaviour, MockHeaderError, apply_item, parse_mock_header

__all__ = ["Behaviour", "MockHeaderError", "MockProviders", "MockUpstream", "RecordedRequest", "parse_mock_header"]

_MAX_HEAD = 256 * 1024


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the mock received it."""

    label: str
    port: int
    method: str
    path: str
    #: lower-cased names; a repeated header's values are joined with ", "
    headers: dict[str, str]
    #: every header line in arrival order, names lower-cased
    header_list: tuple[tuple[str, str], ...]
    body: bytes
    #: ``time.monotonic()`` on arrival (before any ``delay_ms``)
    time: float

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.body)


class _TrackedProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol that keeps its transport in a shared set until the connection is lost."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        transports: set[asyncio.BaseTransport],
    ) -> None:
        super().__init__(reader, cb)
        self._transports = transports
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transports.discard(self._transport)
        super().connection_lost(exc)


@dataclass
class _Overrides:
    pattern: str
    kv: dict[str, str] = field(default_factory=dict)


class MockProviders(Managed):
    """Mock LLM providers on ``{label: port}``; a context manager that serves from a background thread."""

    def __init__(self, labels: Mapping[str, int], *, host: str = "127.0.0.1") -> None:
        if len(set(labels.values())) != len(labels):
            raise ValueError(f"MockProviders: two labels share a port: {dict(labels)}")
        self._labels = dict(labels)
        self.host = host
        self._cond = threading.Condition()
        self._records: list[RecordedRequest] = []
        self._overrides: list[_Overrides] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> MockProviders:
        if self._thread is not None:
            raise RuntimeError("MockProviders already started")
        self._thread = threading.Thread(target=self._run, name="mock-providers", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"MockProviders did not start within {timeout}s")
        if self._start_error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise RuntimeError(f"MockProviders could not listen: {self._start_error}") from self._start_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"MockProviders thread did not stop within {timeout}s")
        self._thread = None

    # ---- addresses -------------------------------------------------------------------------------------
    @property
    def labels(self) -> dict[str, int]:
        return dict(self._labels)

    def port(self, label: str) -> int:
        return self._labels[label]

    def url(self, label: str) -> str:
        return f"http://{self.host}:{self._labels[label]}"

    # ---- records ---------------------------------------------------------------------------------------
    def requests(self, label: str | None = None) -> list[RecordedRequest]:
        """Recorded requests in arrival order; ``label`` may be a glob (``provider.openai.*``)."""
        with self._cond:
            return [r for r in self._records if label is None or fnmatch.fnmatchcase(r.label, label)]

    def count(self, label: str | None = None) -> int:
        return len(self.requests(label))

    def counts(self) -> dict[str, int]:
        """Requests per label, every label present (0 when none), for readable assertion diffs."""
        out = dict.fromkeys(self._labels, 0)
        for r in self.requests():
            out[r.label] += 1
        return out

    def clear(self) -> None:
        with self._cond:
            self._records.clear()

    def wait_for(self, label: str | None, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``n`` requests matched ``label`` (a glob), e.g. an async mirror leg."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self._records if label is None or fnmatch.fnmatchcase(r.label, label)]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"wait_for({label!r}, {n}): only {len(got)} after {timeout}s; counts={self._counts()}"
                    )
                self._cond.wait(left)

    def _counts(self) -> dict[str, int]:
        out = dict.fromkeys(self._labels, 0)
        for r in self._records:
            out[r.label] += 1
        return out

    # ---- programmatic behaviour ------------------------------------------------------------------------
    def set(
        self,
        label: str,
        *,
        status: int | None = None,
        delay_ms: int | None = None,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
        drop: bool | None = None,
    ) -> None:
        """Override behaviour for ``label`` (a glob) until ``reset()``; the ``x-mock`` header wins over it."""
        kv: dict[str, str] = {}
        if status is not None:
            kv["status"] = str(status)
        if delay_ms is not None:
            kv["delay_ms"] = str(delay_ms)
        if body is not None:
            kv["body"] = body
        if drop is not None:
            kv["drop"] = "1" if drop else "0"
        for k, v in (headers or {}).items():
            kv[f"header.{k.lower()}"] = v
        b = Behaviour()
        for k, v in kv.items():  # validate now, not at request time
            b = apply_item(b, k, v)
        with self._cond:
            self._overrides.append(_Overrides(label, kv))

    def reset(self) -> None:
        """Drop every ``set()`` override."""
        with self._cond:
            self._overrides.clear()

    def _base_behaviour(self, label: str) -> Behaviour:
        b = Behaviour()
        with self._cond:
            overrides = list(self._overrides)
        for o in overrides:
            if fnmatch.fnmatchcase(label, o.pattern):
                for k, v in o.kv.items():
                    b = apply_item(b, k, v)
        return b

    # ---- server ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 — reported to start()
            if not self._ready.is_set():
                self._start_error = e
                self._ready.set()
            else:
                raise

    async def _main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        conns: set[asyncio.Task[None]] = set()
        transports: set[asyncio.BaseTransport] = set()
        servers: list[asyncio.Server] = []

        def factory(label: str, port: int) -> Callable[[], asyncio.Protocol]:
            async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                task = asyncio.current_task()
                assert task is not None
                conns.add(task)
                try:
                    await self._serve_connection(label, port, reader, writer)
                except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
                    pass
                finally:
                    conns.discard(task)
                    writer.close()
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await writer.wait_closed()

            return lambda: _TrackedProtocol(asyncio.StreamReader(limit=_MAX_HEAD), on_connect, transports)

        try:
            for label, port in self._labels.items():
                server = await loop.create_server(
                    factory(label, port), self.host, port, reuse_address=True, backlog=512
                )
                servers.append(server)
        except BaseException:
            for s in servers:
                s.close()
                await s.wait_closed()
            raise
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            # Stop accepting, then let connections already accepted reach their handler (closing a server
            # while an accept is in flight leaks that socket on 3.11), then cancel handlers, close the rest.
            for s in servers:
                for sock in s.sockets:
                    loop.remove_reader(sock.fileno())
            current = asyncio.current_task()
            for _ in range(200):
                if not asyncio.all_tasks() - conns - {current}:
                    break
                await asyncio.sleep(0.005)
            for s in servers:
                s.close()
            for t in list(conns):
                t.cancel()
            await asyncio.gather(*conns, return_exceptions=True)
            # connections accepted whose handler task has not started yet are only known by their transport
            for tr in list(transports):
                tr.close()
            for _ in range(100):
                if not transports:
                    break
                await asyncio.sleep(0.01)
            for s in servers:
                await s.wait_closed()

    async def _serve_connection(
        self, label: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # peer closed between requests
            except asyncio.LimitOverrunError:
                await self._write(writer, 431, [("content-type", "text/plain")], b"header too large\n", False)
                return
            lines = head.decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                await self._write(writer, 400, [("content-type", "text/plain")], b"bad request line\n", False)
                return
            header_list: list[tuple[str, str]] = []
            for line in lines[1:]:
                if not line:
                    continue
                name, _, value = line.partition(":")
                header_list.append((name.strip().lower(), value.strip()))
            headers: dict[str, str] = {}
            for name, value in header_list:
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            body = await self._read_body(reader, headers)
            conn_hdr = headers.get("connection", "").lower()
            keep_alive = "close" not in conn_hdr if version == "HTTP/1.1" else "keep-alive" in conn_hdr

            if target.split("?", 1)[0] == "/healthz":
                await self._write(writer, 200, [("content-type", "text/plain")], b"ok\n", keep_alive, label)
                if not keep_alive:
                    return
                continue

            with self._cond:
                self._seq += 1
                seq = self._seq
                self._records.append(
                    RecordedRequest(
                        label=label,
                        port=port,
                        method=method,
                        path=target,
                        headers=headers,
                        header_list=tuple(header_list),
                        body=body,
                        time=time.monotonic(),
                    )
                )
                self._cond.notify_all()

            mock_value = ";".join(v for n, v in header_list if n == MOCK_HEADER)
            try:
                b = parse_mock_header(mock_value, label, self._base_behaviour(label))
            except MockHeaderError as e:
                payload = error_json(400, str(e), anthropic=False)
                await self._write(
                    writer,
                    400,
                    [("content-type", "application/json"), ("x-mock-error", str(e))],
                    payload,
                    keep_alive,
                    label,
                )
                if not keep_alive:
                    return
                continue
            if b.delay_ms:
                await asyncio.sleep(b.delay_ms / 1000)
            if b.drop:
                writer.transport.abort()
                return
            status, out_headers, payload = answer(label, seq, target, body, b)
            if b.chunk_bytes or b.cut is not None:
                await self._write_pieces(writer, status, [*out_headers, *b.headers], payload, keep_alive, label, b)
                if b.cut is not None:
                    writer.transport.abort()
                    return
            else:
                await self._write(writer, status, [*out_headers, *b.headers], payload, keep_alive, label)
            if not keep_alive:
                return

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        length = int(headers.get("content-length", "0") or 0)
        return await reader.readexactly(length) if length else b""

    @classmethod
    async def _write_pieces(
        cls,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
        label: str,
        b: Behaviour,
    ) -> None:
        """Headers (announcing the whole length), then the body in ``chunk_bytes`` pieces, stopping after ``cut``."""
        await cls._write(writer, status, headers, b"", keep_alive, label, content_length=len(body))
        sent = body if b.cut is None else body[: b.cut]
        size = b.chunk_bytes or len(sent) or 1
        for start in range(0, len(sent), size):
            if start and b.chunk_delay_ms:
                await asyncio.sleep(b.chunk_delay_ms / 1000)
            writer.write(sent[start : start + size])
            await writer.drain()

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
        label: str | None = None,
        *,
        content_length: int | None = None,
    ) -> None:
        names = {n.lower() for n, _ in headers}
        lines = [f"HTTP/1.1 {status} {reason_phrase(status)}"]
        lines += [f"{n}: {v}" for n, v in headers if n.lower() not in {"content-length", "connection"}]
        if label is not None and "x-served-by" not in names:
            lines.append(f"x-served-by: {label}")
        lines.append(f"content-length: {len(body) if content_length is None else content_length}")
        lines.append(f"connection: {'keep-alive' if keep_alive else 'close'}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()


MockUpstream = MockProviders
"""The name the test kit has always used."""
