"""The mock providers' server: plain asyncio HTTP/1.1 on many ports (one label each) and an optional admin port.

``MockProviders`` serves from a background thread (``with MockProviders(...) as up:``, the tests' way) or on the
caller's event loop (``await up.serve(stop)``, the process's way: ``__main__.py``). Any number of concurrent
connections, HTTP/1.1 keep-alive, chunked request bodies; a stream whose faults are about timing is written
event by event with chunked transfer encoding, every other answer with a Content-Length.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from meshgen.lab.answers import Answer, answer, api_of, context_exceeded, error_json, reason_phrase
from meshgen.lab.lifecycle import Managed
from meshgen.lab.mock_checks import check_auth, check_schema
from meshgen.lab.mock_header import (
    MOCK_HEADER,
    Behaviour,
    MockHeaderError,
    apply_item,
    format_items,
    ignores_global,
    parse_items,
    parse_mock_header,
)
from meshgen.lab.providers import admin

__all__ = ["Fault", "MockProviders", "RecordedRequest"]

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
    #: ``time.monotonic()`` on arrival (before any ``delay_ms``), in the mock's process
    time: float
    #: 1, 2, … in arrival order across every label
    seq: int = 0
    #: how it was answered, once it was: ``"200"``, ``"500"``, ``"reset"``, ``"drop"``, ``"200 cut"`` (a byte cut),
    #: ``"200 cut_after"``, ``"200 stalled"``, ``"400 x-mock-error"``; None while answering (or the client left)
    outcome: str | None = None

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Fault:
    """Items of the ``x-mock`` grammar applied to the requests whose label matches ``scope`` (a glob): all of them,
    or ``percent`` of them, spread evenly and deterministically (20 → the 5th, 10th, 15th … matching request)."""

    scope: str
    mock: str
    percent: int = 100


@dataclass
class _Active:
    fault: Fault
    seen: int = 0
    """Matching requests so far."""

    def hits(self) -> bool:
        """Count one matching request; whether the fault applies to it."""
        self.seen += 1
        p = self.fault.percent
        return p >= 100 or (self.seen * p) // 100 > ((self.seen - 1) * p) // 100


def validate_mock(mock: str) -> None:
    """Raise ``MockHeaderError`` unless every item of ``mock`` (scoped or not) is a known key with a good value."""
    for it in parse_items(mock):
        apply_item(Behaviour(), it.key, it.value)


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    version: str
    header_list: tuple[tuple[str, str], ...]
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        return "close" not in conn if self.version == "HTTP/1.1" else "keep-alive" in conn


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


class MockProviders(Managed):
    """Mock LLM providers on ``{label: port}``, and the admin API on ``admin_port`` when one is given.

    ``settings`` are faults that ``reset()`` / ``DELETE /faults`` leave in place (the process's ``--require-auth``
    and ``--strict-schema``), as ``(scope, mock)`` pairs. ``access_log`` is called with each request once its
    outcome is known.
    """

    def __init__(
        self,
        labels: Mapping[str, int],
        *,
        host: str = "127.0.0.1",
        admin_port: int | None = None,
        settings: Sequence[tuple[str, str]] = (),
        access_log: Callable[[RecordedRequest], object] | None = None,
    ) -> None:
        if len(set(labels.values())) != len(labels) or admin_port in labels.values():
            raise ValueError(f"MockProviders: two labels share a port: {dict(labels)} (admin {admin_port})")
        for _, mock in settings:
            validate_mock(mock)
        self._labels = dict(labels)
        self.host = host
        self.admin_port = admin_port
        self._settings = tuple(Fault(scope, mock) for scope, mock in settings)
        self._access_log = access_log
        self._cond = threading.Condition()
        self._records: list[RecordedRequest] = []
        self._faults: list[_Active] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ---- lifecycle (a background thread) --------------------------------------------------------------------
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

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            await self.serve(self._stop_event, self._ready.set)

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 — reported to start()
            if not self._ready.is_set():
                self._start_error = e
                self._ready.set()
            else:
                raise

    # ---- addresses ------------------------------------------------------------------------------------------
    @property
    def labels(self) -> dict[str, int]:
        return dict(self._labels)

    def port(self, label: str) -> int:
        return self._labels[label]

    def url(self, label: str) -> str:
        return f"http://{self.host}:{self._labels[label]}"

    @property
    def admin_url(self) -> str:
        if self.admin_port is None:
            raise RuntimeError("MockProviders has no admin port")
        return f"http://{self.host}:{self.admin_port}"

    # ---- records --------------------------------------------------------------------------------------------
    def requests(self, label: str | None = None, *, since: int = 0) -> list[RecordedRequest]:
        """Recorded requests in arrival order; ``label`` may be a glob (``provider.openai.*``); ``since`` a seq."""
        with self._cond:
            return [
                r for r in self._records if r.seq > since and (label is None or fnmatch.fnmatchcase(r.label, label))
            ]

    def count(self, label: str | None = None) -> int:
        return len(self.requests(label))

    def counts(self) -> dict[str, int]:
        """Requests per label, every label present (0 when none), for readable assertion diffs."""
        with self._cond:
            return self._counts()

    def clear(self) -> int:
        """Forget every recorded request; how many there were."""
        with self._cond:
            n = len(self._records)
            self._records.clear()
            return n

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

    # ---- global faults --------------------------------------------------------------------------------------
    def fault(self, scope: str, mock: str, percent: int = 100) -> None:
        """Apply ``mock`` (the ``x-mock`` grammar) to the requests to a label matching ``scope`` (``percent`` of them)
        until cleared; a request's own ``x-mock`` header wins key by key. Raises ``MockHeaderError`` on a bad
        ``mock`` and ``ValueError`` on a percent outside 1..100."""
        validate_mock(mock)
        if not 1 <= percent <= 100:
            raise ValueError(f"percent must be within 1..100, got {percent}")
        with self._cond:
            self._faults.append(_Active(Fault(scope, mock, percent)))

    def faults(self) -> list[Fault]:
        with self._cond:
            return [a.fault for a in self._faults]

    def clear_faults(self, scope: str | None = None) -> None:
        """Drop every global fault, or those set for exactly ``scope``."""
        with self._cond:
            self._faults = [a for a in self._faults if scope is not None and a.fault.scope != scope]

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
        kv: list[tuple[str, str]] = []
        if status is not None:
            kv.append(("status", str(status)))
        if delay_ms is not None:
            kv.append(("delay_ms", str(delay_ms)))
        if body is not None:
            kv.append(("body", body))
        if drop is not None:
            kv.append(("drop", "1" if drop else "0"))
        kv += [(f"header.{k.lower()}", v) for k, v in (headers or {}).items()]
        self.fault(label, format_items(kv))

    def reset(self) -> None:
        """Drop every global fault (``set()`` and ``fault()``); the settings stay."""
        self.clear_faults()

    def behaviour(self, label: str, mock_header: str = "", *, count: bool = False) -> Behaviour:
        """What a request to ``label`` carrying ``x-mock: <mock_header>`` is answered with (raises
        ``MockHeaderError`` when the header is bad). ``count``: the request is real, and counts towards the
        ``percent`` of the faults it matches (otherwise those below 100 % are left out)."""
        with self._cond:
            layers = [f for f in self._settings if fnmatch.fnmatchcase(label, f.scope)]
            if not ignores_global(mock_header, label):
                for a in self._faults:
                    if fnmatch.fnmatchcase(label, a.fault.scope) and (a.hits() if count else a.fault.percent >= 100):
                        layers.append(a.fault)
        b = Behaviour()
        for f in layers:
            b = parse_mock_header(f.mock, label, b)
        return parse_mock_header(mock_header, label, b)

    # ---- server ---------------------------------------------------------------------------------------------
    async def serve(self, stop: asyncio.Event, ready: Callable[[], object] | None = None) -> None:
        """Listen on every port, call ``ready()``, serve until ``stop`` is set, then close every connection."""
        loop = asyncio.get_running_loop()
        conns: set[asyncio.Task[None]] = set()
        transports: set[asyncio.BaseTransport] = set()
        servers: list[asyncio.Server] = []

        def factory(label: str | None, port: int) -> Callable[[], asyncio.Protocol]:
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

        listen: list[tuple[str | None, int]] = list(self._labels.items())
        if self.admin_port is not None:
            listen.append((None, self.admin_port))
        try:
            for label, port in listen:
                server = await loop.create_server(
                    factory(label, port), self.host, port, reuse_address=True, backlog=512
                )
                servers.append(server)
        except BaseException:
            for s in servers:
                s.close()
                await s.wait_closed()
            raise
        if ready is not None:
            ready()
        try:
            await stop.wait()
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
        self, label: str | None, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            req = await _read_request(reader, writer)
            if req is None:
                return
            if req.path == "/healthz":
                await _write(writer, 200, [("content-type", "text/plain")], b"ok\n", req.keep_alive, label)
                keep = req.keep_alive
            elif label is None:
                status, payload = admin.handle(self, req.method, req.target, req.body)
                await _write(writer, status, [("content-type", "application/json")], payload, req.keep_alive)
                keep = req.keep_alive
            else:
                keep = await self._answer(label, port, req, reader, writer)
            if not keep:
                return

    def _record(self, label: str, port: int, req: _Request) -> int:
        with self._cond:
            self._seq += 1
            self._records.append(
                RecordedRequest(
                    label=label,
                    port=port,
                    method=req.method,
                    path=req.target,
                    headers=req.headers,
                    header_list=req.header_list,
                    body=req.body,
                    time=time.monotonic(),
                    seq=self._seq,
                )
            )
            self._cond.notify_all()
            return self._seq

    async def _answer(
        self, label: str, port: int, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; whether the connection is still usable."""
        seq = self._record(label, port, req)
        keep_alive = req.keep_alive

        def outcome(what: str) -> None:
            self._set_outcome(seq, what)

        try:
            b = self.behaviour(label, ";".join(v for n, v in req.header_list if n == MOCK_HEADER), count=True)
        except MockHeaderError as e:
            payload = error_json(400, str(e))
            headers = [("content-type", "application/json"), ("x-mock-error", str(e))]
            outcome("400 x-mock-error")
            await _write(writer, 400, headers, payload, keep_alive, label)
            return keep_alive
        if b.delay_ms:
            await asyncio.sleep(b.delay_ms / 1000)
        if b.reset:
            outcome("reset")
            _reset(writer)
            return False
        if b.drop:
            outcome("drop")
            writer.transport.abort()
            return False
        ans = (
            check_auth(req.path, req.headers, b)
            or check_schema(req.method, req.path, req.headers, req.body, b)
            or (context_exceeded(api_of(req.path), b.prompt_tokens) if b.context_exceeded else None)
            or answer(label, seq, req.method, req.target, req.headers, req.body, b)
        )
        headers = [*ans.headers, *b.headers]
        if ans.events is not None and b.timed_stream:
            return await _write_events(reader, writer, ans, headers, keep_alive, label, b, outcome)
        if b.ttft_ms:  # a JSON answer: a real provider sends its headers with the finished body
            await asyncio.sleep(b.ttft_ms / 1000)
        # the outcome is noted before the last write, so a client that has its answer finds it
        if b.chunk_bytes or b.cut is not None:
            outcome(f"{ans.status} cut" if b.cut is not None else str(ans.status))
            await _write_pieces(writer, ans.status, headers, ans.payload, keep_alive, label, b)
            if b.cut is not None:
                writer.transport.abort()
                return False
            return keep_alive
        outcome(str(ans.status))
        await _write(writer, ans.status, headers, ans.payload, keep_alive, label)
        return keep_alive

    def _set_outcome(self, seq: int, what: str) -> None:
        done: RecordedRequest | None = None
        with self._cond:
            for i in range(len(self._records) - 1, -1, -1):
                if self._records[i].seq == seq:
                    done = self._records[i] = replace(self._records[i], outcome=what)
                    break
                if self._records[i].seq < seq:
                    break
            self._cond.notify_all()
        if done is not None and self._access_log is not None:
            self._access_log(done)


# ---- HTTP/1.1 ---------------------------------------------------------------------------------------------------
async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Request | None:
    """The next request on the connection, or None when it is over (closed, or a bad request answered)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # peer closed between requests
    except asyncio.LimitOverrunError:
        await _write(writer, 431, [("content-type", "text/plain")], b"header too large\n", False)
        return None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        await _write(writer, 400, [("content-type", "text/plain")], b"bad request line\n", False)
        return None
    header_list: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        header_list.append((name.strip().lower(), value.strip()))
    headers: dict[str, str] = {}
    for name, value in header_list:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    body = await _read_body(reader, headers)
    return _Request(method, target, version, tuple(header_list), headers, body)


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


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or overloaded provider's connection ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _head(
    status: int, headers: Sequence[tuple[str, str]], keep_alive: bool, label: str | None, framing: tuple[str, str]
) -> bytes:
    names = {n.lower() for n, _ in headers}
    lines = [f"HTTP/1.1 {status} {reason_phrase(status)}"]
    skip = {"content-length", "connection", "transfer-encoding"}
    lines += [f"{n}: {v}" for n, v in headers if n.lower() not in skip]
    if label is not None and "x-served-by" not in names:
        lines.append(f"x-served-by: {label}")
    lines.append(f"{framing[0]}: {framing[1]}")
    lines.append(f"connection: {'keep-alive' if keep_alive else 'close'}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write(
    writer: asyncio.StreamWriter,
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    keep_alive: bool,
    label: str | None = None,
    *,
    content_length: int | None = None,
) -> None:
    length = len(body) if content_length is None else content_length
    writer.write(_head(status, headers, keep_alive, label, ("content-length", str(length))) + body)
    await writer.drain()


async def _write_pieces(
    writer: asyncio.StreamWriter,
    status: int,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    keep_alive: bool,
    label: str,
    b: Behaviour,
) -> None:
    """Headers (announcing the whole length), then the body in ``chunk_bytes`` pieces, stopping after ``cut``."""
    await _write(writer, status, headers, b"", keep_alive, label, content_length=len(body))
    sent = body if b.cut is None else body[: b.cut]
    size = b.chunk_bytes or len(sent) or 1
    for start in range(0, len(sent), size):
        if start and b.chunk_delay_ms:
            await asyncio.sleep(b.chunk_delay_ms / 1000)
        writer.write(sent[start : start + size])
        await writer.drain()


async def _write_events(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    ans: Answer,
    headers: Sequence[tuple[str, str]],
    keep_alive: bool,
    label: str,
    b: Behaviour,
    outcome: Callable[[str], None],
) -> bool:
    """A stream event by event, chunked: headers at once, the first event ``ttft_ms`` later, ``event_delay_ms``
    apart; ``cut_after`` resets and ``stall_after`` stalls after that many events. Whether the connection lives."""
    writer.write(_head(ans.status, headers, keep_alive, label, ("transfer-encoding", "chunked")))
    await writer.drain()
    if b.ttft_ms:
        await asyncio.sleep(b.ttft_ms / 1000)
    events = ans.events or ()
    for i in range(len(events) + 1):
        if b.cut_after is not None and i >= b.cut_after:
            outcome(f"{ans.status} cut_after")
            _reset(writer)
            return False
        if b.stall_after is not None and i == b.stall_after:
            if b.stall_ms is None:
                outcome(f"{ans.status} stalled")
                while await reader.read(65536):  # until the client leaves (or the mock stops)
                    pass
                return False
            await asyncio.sleep(b.stall_ms / 1000)
        if i == len(events):
            break
        if i and b.event_delay_ms:
            await asyncio.sleep(b.event_delay_ms / 1000)
        writer.write(b"%x\r\n%s\r\n" % (len(events[i]), events[i]))
        await writer.drain()
    outcome(str(ans.status))
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return keep_alive
