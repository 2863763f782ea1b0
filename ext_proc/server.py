"""The ext_authz HTTP/1.1 endpoint: a lean asyncio protocol over ``httptools``.

Envoy's ext_authz filter (``http_service``, ``path_prefix: /authz``, ``with_request_body``) sends one
``<METHOD> /authz/<original path>`` per client request, carrying the client's ``authorization``,
``x-api-key``, ``content-type`` and the tenants' non-critical headers (``x-priority``) and the raw request body
(at most the config's ``max_request_bytes``, unless the server is given another ``max_body_bytes``). With tracing on,
Envoy adds ``traceparent``; it is kept only for a refusal's log line and span (``ext_proc/requestlog.py``).

- ``/authz`` and ``/authz/…``: admission. 200 with ``x-meshgen-tenant`` and no body allows the request; any other
  status denies it, and Envoy passes status and body on to the client. When the budget moved the request to the
  model's downgrade, the 200 also carries ``x-meshgen-route: <downgrade>`` (Envoy routes on it) and
  ``x-meshgen-downgraded-from: <requested>``. A non-critical request refused by rpm or tpm, or whose model's
  provider is saturated, is held (``ext_proc/queueing.py``) before it is answered; its 200 then also carries
  ``x-meshgen-queued-ms`` (how long it waited, to Envoy's metadata: the request's log line). A stream's 200 carries
  ``x-meshgen-prompt-tokens`` (the prompt's estimate, to Envoy's metadata: ext_proc settles a stream cut before its
  usage with it). A refusal is logged here, one line per request (:class:`~ext_proc.requestlog.RequestLog`); an
  admitted request is logged when its access-log entry comes.
- ``GET``/``HEAD /healthz``: 200 ``ok`` (readiness).
- ``GET /metrics``: Prometheus text exposition (``ext_proc/metrics.py``).
- anything else: 404 JSON.

Connections are keep-alive. Each request is answered as soon as its last byte is parsed, inside the parser
callback, so pipelined requests are answered in order. Malformed HTTP gets a 400 and the connection closes.
Responses are assembled from bytes precomputed at config load; the hot path is one header scan, one sha256,
one ``json.loads`` and a few dict lookups.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
import types
from collections.abc import Awaitable, Coroutine, Generator, Sequence
from typing import Any, Final

import httptools

from ext_proc.accesslog import PROMPT_TOKENS_KEY
from ext_proc.admission import Admission, Admitted, api_key_from_headers
from ext_proc.config import ServiceConfig
from ext_proc.errors import (
    ApiError,
    LimitExceeded,
    MalformedRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    ServiceUnavailable,
)
from ext_proc.ledger import Ledger, Reserved
from ext_proc.metrics import CONTENT_TYPE, Metrics
from ext_proc.queueing import HELD_LIMITS, HoldQueue
from ext_proc.requestlog import RequestLog

__all__ = ["Server"]

_REASONS: Final = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    424: b"Failed Dependency",
    413: b"Payload Too Large",
    429: b"Too Many Requests",
    503: b"Service Unavailable",
}
_KEEP_ALIVE_END: Final = b"\r\n"
_KEEP_ALIVE_10_END: Final = b"connection: keep-alive\r\n\r\n"  # HTTP/1.0 keep-alive must be announced
_CLOSE_END: Final = b"connection: close\r\n\r\n"
_AUTHZ_PREFIX: Final = b"/authz/"
_NO_BODY: Final = b"\r\ncontent-length: 0\r\n"
_PROMPT: Final = f"\r\n{PROMPT_TOKENS_KEY}: ".encode()
_TRACE_HEADER: Final = b"traceparent"

Answer = tuple[bytes, bytes] | Coroutine[Any, Any, tuple[bytes, bytes]]
"""(head without the final blank line, body), or a coroutine making it."""
Reply = tuple[bytes, bytes]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Reply], yielded: Any) -> Generator[Any, Any, Reply]:
    """Await the rest of `coro`, which was started outside a task and suspended on `yielded` (what an awaited
    future yields to its task): every value and exception the task sends goes on to `coro`."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # the task's cancellation, or a future's exception: coro sees it
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


def _head(status: int, headers: tuple[tuple[str, str], ...], content_length: int) -> bytes:
    """Status line and headers, without the blank line that ends them (the protocol adds ``connection``)."""
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS[status])]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    lines.append(b"content-length: %d" % content_length)
    return b"\r\n".join(lines) + b"\r\n"


class Server:
    """Serves admission for one :class:`ServiceConfig` until :meth:`close`.

    ``max_body_bytes`` defaults to ``config.max_request_bytes``; ``admission`` to ``Admission(config)``
    (tests pass their own).
    """

    def __init__(
        self,
        config: ServiceConfig,
        *,
        max_body_bytes: int | None = None,
        logger: logging.Logger | None = None,
        admission: Admission | None = None,
        ledger: Ledger | None = None,
        metrics: Metrics | None = None,
        queue: HoldQueue | None = None,
        requests: RequestLog | None = None,
    ):
        self.config = config
        self.max_body_bytes = config.max_request_bytes if max_body_bytes is None else max_body_bytes
        self._log = logger if logger is not None else logging.getLogger("ext_proc")
        self._admission = admission if admission is not None else Admission(config)
        self._ledger = ledger
        self.inline_answers = ledger is not None and ledger.inline
        """Run an answer's coroutine at once, outside a task (:attr:`Ledger.inline`)."""
        if metrics is None:
            metrics = ledger.metrics if ledger is not None else Metrics(config)
        self.metrics = metrics
        self.queue = queue if queue is not None else HoldQueue(config, metrics)
        self.requests = requests if requests is not None else RequestLog(config, logger=self._log)
        self.priority_headers: frozenset[bytes] = self.queue.headers | (
            {_TRACE_HEADER} if config.tracing is not None else frozenset()
        )
        """Request headers kept for the rare paths (a hold, a refusal): the tenants' non-critical headers and, with
        tracing on, ``traceparent`` (a refusal's line and span name its trace). Without tracing the header scan is
        exactly what it was: tracing costs the hot path nothing."""
        self._allow: dict[str, bytes] = {
            tenant: _head(200, (("x-meshgen-tenant", tenant),), 0) for tenant in config.tenants
        }
        self._reserved: dict[str, bytes] = {
            tenant: _head(200, (("x-meshgen-tenant", tenant),), 0).removesuffix(b"content-length: 0\r\n")
            + b"x-meshgen-reservation: "
            for tenant in config.tenants
        }
        """Per tenant: the head of an admitted request up to its reservation id."""
        self._healthz = _head(200, (("content-type", "text/plain"),), 2), b"ok"
        self._server: asyncio.Server | None = None
        self._connections: set[_HttpProtocol] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0 picks a free one); return the address actually bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpProtocol(self), host, port, reuse_address=True, backlog=1024
        )
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop listening and close every connection (responses already written are flushed first)."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.close()
        await self._server.wait_closed()
        self._server = None

    # --- request handling: returns (head without the final blank line, body) ---

    def handle(
        self,
        method: bytes,
        url: bytes,
        authorization: bytes | None,
        x_api_key: bytes | None,
        body: bytes,
        content_type: bytes | None = None,
        priority: Sequence[tuple[bytes, bytes]] = (),
    ) -> Answer:
        """The answer now, or (when the ledger must be asked) a coroutine that makes it."""
        try:
            query = url.find(b"?")
            path = url if query < 0 else url[:query]
            if path.startswith(_AUTHZ_PREFIX) or path == b"/authz":
                try:
                    key = api_key_from_headers(authorization, x_api_key)
                    admitted = self._admission.admit(key, body, content_type)
                except ApiError as err:
                    return self.refusal(err, priority)
                if self._ledger is None:
                    return self._allow[admitted.tenant], b""
                return self._reserve(admitted, priority)
            if path == b"/metrics":
                if method == b"GET":
                    payload = self.metrics.exposition()
                    return _head(200, (("content-type", CONTENT_TYPE),), len(payload)), payload
                return self.refusal(MethodNotAllowed())
            if path == b"/healthz":
                if method == b"GET":
                    return self._healthz
                if method == b"HEAD":
                    return self._healthz[0], b""
                return self.refusal(MethodNotAllowed())
            return self.refusal(NotFound())
        except Exception as exc:
            self.log_internal_error(exc)
            return self.refusal(ServiceUnavailable())

    async def _reserve(self, admitted: Admitted, priority: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
        ledger = self._ledger
        assert ledger is not None

        def attempt() -> Coroutine[Any, Any, Reserved]:
            return ledger.reserve(admitted.tenant, admitted.model, admitted.request)

        held_since: float | None = None
        try:
            if self.queue.saturated_for(admitted.model) > 0:
                wait_s = self.queue.max_wait(admitted.tenant, priority)
                if wait_s is not None:  # non-critical: wait for the provider before reserving
                    held_since = time.monotonic()
                    await self.queue.wait_for_provider(admitted.tenant, admitted.model, wait_s)
            try:
                reserved = await attempt()
            except LimitExceeded as err:
                wait_s = self.queue.max_wait(admitted.tenant, priority) if err.limit in HELD_LIMITS else None
                if wait_s is None:
                    raise
                if held_since is None:
                    held_since = time.monotonic()
                else:  # both waits together stay within queue_max_wait (Envoy's timeout is rendered to outlast it)
                    wait_s = max(0.0, wait_s - (time.monotonic() - held_since))
                reserved = await self.queue.hold(admitted.tenant, wait_s, err, attempt)
        except ApiError as err:
            return self.refusal(err, priority)
        except Exception as exc:
            self.log_internal_error(exc)
            return self.refusal(ServiceUnavailable(), priority)
        stream = admitted.request.get("stream") is True
        if reserved.downgraded_from is None and held_since is None:
            head = self._reserved[admitted.tenant] + reserved.reservation.encode("latin-1")
            if stream:
                head += _PROMPT + b"%d" % reserved.prompt_tokens
            return head + _NO_BODY, b""
        headers: tuple[tuple[str, str], ...] = (
            ("x-meshgen-tenant", admitted.tenant),
            ("x-meshgen-reservation", reserved.reservation),
        )
        if stream:
            headers += ((PROMPT_TOKENS_KEY, str(reserved.prompt_tokens)),)
        if reserved.downgraded_from is not None:
            headers += (("x-meshgen-route", reserved.model), ("x-meshgen-downgraded-from", reserved.downgraded_from))
        if held_since is not None:  # to Envoy's metadata only: the request's log line says it waited
            headers += (("x-meshgen-queued-ms", str(round((time.monotonic() - held_since) * 1000))),)
        return _head(200, headers, 0), b""

    def refusal(self, err: ApiError, headers: Sequence[tuple[bytes, bytes]] = ()) -> tuple[bytes, bytes]:
        """The answer to a refused request, its log line (and, with tracing, its span: ``headers`` are the kept
        request headers, :attr:`priority_headers`)."""
        body = err.body()
        traceparent = next((v.decode("latin-1") for n, v in headers if n == _TRACE_HEADER), None)
        self.requests.refused(err, err.status, traceparent)
        self.metrics.refused(err.tenant, err.reason if isinstance(err, LimitExceeded) else err.code)
        status = err.status if err.authz_status is None else err.authz_status
        return _head(status, (("content-type", "application/json"), *err.headers), len(body)), body

    def log_internal_error(self, exc: BaseException) -> None:
        # Type and stack frames only: an exception's message or locals may quote the request body or a key.
        frames = [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)]
        self._log.error(json.dumps({"event": "internal_error", "error": type(exc).__name__, "stack": frames}))


class _HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_authorization",
        "_body",
        "_body_size",
        "_closing",
        "_content_type",
        "_parser",
        "_pending",
        "_priority",
        "_server",
        "_transport",
        "_url",
        "_x_api_key",
    )

    def __init__(self, server: Server):
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._closing = False
        self._url = b""
        self._authorization: bytes | None = None
        self._x_api_key: bytes | None = None
        self._content_type: bytes | None = None
        self._priority: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._pending: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server._connections.discard(self)
        if self._pending is not None:
            self._pending.cancel()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(MalformedRequest())
        except httptools.HttpParserCallbackError as exc:  # our bug in a callback, not the client's
            if not self._closing:
                self._server.log_internal_error(exc.__context__ or exc)
                self._reject(ServiceUnavailable())
        except httptools.HttpParserError:
            self._reject(MalformedRequest())
        if self._closing and self._pending is None:
            self.close()

    def pause_writing(self) -> None:  # the client is not reading its answers: stop reading its requests
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self._url = b""
        self._authorization = None
        self._x_api_key = None
        self._content_type = None
        if self._priority:
            self._priority = []
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"authorization":
            if self._authorization is None:
                self._authorization = value
        elif name == b"x-api-key":
            if self._x_api_key is None:
                self._x_api_key = value
        elif name == b"content-type":
            if self._content_type is None:
                self._content_type = value
        elif name in self._server.priority_headers:
            self._priority.append((name, value))

    def on_headers_complete(self) -> None:
        if self._parser.should_upgrade():  # Upgrade or CONNECT: not something Envoy's ext_authz sends
            self._reject(MalformedRequest())

    def on_body(self, chunk: bytes) -> None:
        if self._closing:
            return
        self._body_size += len(chunk)
        if self._body_size > self._server.max_body_bytes:
            self._body = []
            self._reject(RequestTooLarge())
            return
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if self._closing:  # refused mid-message, or a message pipelined after one that closes
            return
        body = self._body
        answer = self._server.handle(
            self._parser.get_method(),
            self._url,
            self._authorization,
            self._x_api_key,
            body[0] if len(body) == 1 else b"".join(body),
            self._content_type,
            self._priority,
        )
        self._body = []
        if self._parser.should_keep_alive():
            end = _KEEP_ALIVE_END if self._parser.get_http_version() == "1.1" else _KEEP_ALIVE_10_END
        else:
            end = _CLOSE_END
            self._closing = True
        self._send(answer, end)

    def _reject(self, err: ApiError) -> None:
        """Answer ``err`` and close the connection once it is written; ignore whatever else arrives."""
        if self._closing:
            return
        self._closing = True
        self._send(self._server.refusal(err), _CLOSE_END)

    def _send(self, answer: Answer, end: bytes) -> None:
        """Write an answer now if nothing is ahead of it; otherwise after those ahead, so pipelined requests
        are answered in order even when one waits for the ledger. With nothing ahead and a ledger whose store
        never suspends (SQLite, memory: :attr:`Ledger.inline`), a coroutine answer is run at once, here: when it
        finishes without suspending its answer is written now, without a task; otherwise (a hold) a task
        finishes it."""
        if self._pending is None and (isinstance(answer, tuple) or self._server.inline_answers):
            if isinstance(answer, tuple):
                reply = answer
            else:
                try:
                    yielded = answer.send(None)
                except StopIteration as done:
                    reply = done.value
                else:
                    self._pending = asyncio.ensure_future(self._send_later(None, _resume(answer, yielded), end))
                    return
            assert self._transport is not None
            self._transport.write(reply[0] + end + reply[1])
            return
        self._pending = asyncio.ensure_future(self._send_later(self._pending, answer, end))

    async def _send_later(
        self, ahead: asyncio.Future[None] | None, answer: Reply | Awaitable[Reply], end: bytes
    ) -> None:
        if ahead is not None:
            await ahead
        head, payload = answer if isinstance(answer, tuple) else await answer
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(head + end + payload)
        if self._pending is asyncio.current_task():
            self._pending = None
            if self._closing:
                self.close()
