"""Envoy's ext_proc (gRPC, ``envoy.service.ext_proc.v3.ExternalProcessor``) for the few requests whose body must be
streamed or rewritten. Every other request never opens a stream here (the filter is disabled at the HCM and only
enabled per route: PERF-FACTS.md, a gRPC stream into Python costs ~0.3 ms of CPU).

What a stream does is set per route by Envoy, in the stream's initial gRPC metadata:

- ``x-meshgen-jobs``: ``count`` (a streaming request: count its SSE usage and settle the reservation), ``rewrite``
  (a budget downgrade re-routed by the ``x-meshgen-route`` header: the body's ``model`` becomes the target model's
  ``upstream_name``), or both, comma-separated;
- ``x-meshgen-schema``: ``openai`` or ``anthropic`` (the route's provider).

Messages, per request. A stream that is only counted gets nothing but its response body: Envoy's Lua filter on
its route has already asked an OpenAI provider for usage, and the first message's ``metadata_context`` carries
what the request headers and body would have told (each message costs ~0.1 ms of CPU and a round trip of time to
first token). A re-routed request (``rewrite``) gets all three:

1. request headers (SEND, ``rewrite`` only): the reservation (``x-meshgen-reservation``, allowed through by
   ext_authz) and the route header; answered at once, unchanged.
2. request body (BUFFERED, ``rewrite`` only): ``model`` rewritten, and for an OpenAI stream
   ``stream_options.include_usage`` set so the provider reports usage; content-length follows the new body
   (ENVOY-FACTS §2: a body mutated without it is a local 500).
3. response body (STREAMED, ``count`` only): each chunk passes on as it came (or without the usage event the client
   did not ask for, :mod:`ext_proc.sse`). Without the request messages, the first chunk's metadata gives the
   reservation and the prompt's estimate (ext_authz's namespace: admission's answer) and, in ``meshgen.stream``
   (set by the route's Lua filter), ``hide_usage`` (the filter asked for usage the client did not), the request id
   and the request's start (``start_ms``, for time to first token). At ``end_of_stream`` the reservation is settled
   with the provider's usage; when it never came — the stream was cut (Envoy closes our stream without
   ``end_of_stream``, ENVOY-FACTS §6) or carried no usage — the output is counted from the streamed text with the
   tokenizer and the settle is marked estimated. A stream that never produced an event is left to the access log (an
   error status releases the reservation) or the sweep (the reserved estimate).

Settling runs in a task of its own: it never delays a chunk.

``translate`` (with ``x-meshgen-chain: <model>``) is the upstream ext_proc of a chain that crosses schemas, one
stream per attempt (:mod:`ext_proc.translate.attempt`): request headers set the attempt provider's path and auth,
the buffered request body is translated (content-length follows), the response headers drop content-length when
the answer will be translated, and the streamed response body comes back in the client's schema — SSE event by
event, a JSON answer (or error) whole at its end.

``hold`` (with ``x-meshgen-hold-ms``) is the upstream ext_proc of the stream twin of a hedged chain: each attempt's
response headers wait for its first token, so Envoy hedges streams on time to first token (:mod:`ext_proc.hold`);
alone it leaves the stream once the token came, with ``translate`` it goes on translating.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2

from ext_proc.accesslog import AUTHZ_NAMESPACE, PROMPT_TOKENS_KEY, RESERVATION_KEY
from ext_proc.config import ServiceConfig
from ext_proc.hold import hold_first_token
from ext_proc.sse import SseCounter
from ext_proc.tokens import estimate_prompt_tokens
from ext_proc.translate import StreamTranslator
from ext_proc.translate.attempt import Plan, Planner
from ext_proc.translate.common import TranslationError

__all__ = ["CHAIN_KEY", "JOBS_KEY", "SCHEMA_KEY", "ExternalProcessor", "Settle", "rewrite_request"]

JOBS_KEY: Final = "x-meshgen-jobs"
SCHEMA_KEY: Final = "x-meshgen-schema"
CHAIN_KEY: Final = "x-meshgen-chain"
HOLD_KEY: Final = "x-meshgen-hold-ms"
STREAM_NAMESPACE: Final = "meshgen.stream"
_ROUTE: Final = "x-meshgen-route"
_REQUEST_ID: Final = "x-request-id"


class Settle(Protocol):
    """Settle one streamed request's reservation. ``served_model`` is the provider's model name from the stream
    (None when it named none); ``estimated`` when the counts are the tokenizer's, not the provider's."""

    def __call__(
        self, reservation: str, served_model: str | None, input_tokens: int, output_tokens: int, estimated: bool
    ) -> Awaitable[object]: ...


def rewrite_request(
    body: bytes, *, model: str | None, ask_usage: bool
) -> tuple[bytes | None, dict[str, Any] | None, bool]:
    """The request body with ``model`` replaced (when given) and, with ``ask_usage``, OpenAI's
    ``stream_options.include_usage`` turned on.

    Returns (new body or None when unchanged, the parsed request or None when not a JSON object, whether the client
    had asked for include_usage itself)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None, None, False
    if not isinstance(request, dict):
        return None, None, False
    options = request.get("stream_options")
    asked = isinstance(options, dict) and options.get("include_usage") is True
    changed = False
    if model is not None and request.get("model") != model:
        request["model"] = model
        changed = True
    if ask_usage and not asked:
        request["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        changed = True
    if not changed:
        return None, request, asked
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode(), request, asked


def _header(headers: Any, name: str) -> str | None:
    for h in headers.headers.headers:
        if h.key == name:
            return h.raw_value.decode("latin-1") if h.raw_value else str(h.value)
    return None


def _set_header(name: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode("latin-1")),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _body_reply(data: bytes) -> Any:
    mutation = pb.BodyMutation(body=data) if data else pb.BodyMutation(clear_body=True)
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation)))


def _immediate(status: int, body: bytes) -> Any:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=[_set_header("content-type", "application/json")]),
            body=body,
            details="meshgen_translation_failed",
        )
    )


_REQUEST_ONLY: Final = processing_mode_pb2.ProcessingMode(
    request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
    response_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
)
_CONTINUE_HEADERS: Final = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_CONTINUE_REQUEST_BODY: Final = pb.ProcessingResponse(request_body=pb.BodyResponse())
_CONTINUE_RESPONSE_HEADERS: Final = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_CONTINUE_RESPONSE_BODY: Final = pb.ProcessingResponse(response_body=pb.BodyResponse())
_CONTINUE: Final = {
    "request_headers": _CONTINUE_HEADERS,
    "request_body": _CONTINUE_REQUEST_BODY,
    "response_headers": _CONTINUE_RESPONSE_HEADERS,
    "response_body": _CONTINUE_RESPONSE_BODY,
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


class _Attempt:
    """What a held attempt's processing found out: whether its answer is translated."""

    __slots__ = ("translating",)

    def __init__(self) -> None:
        self.translating = False


async def _pass_through(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Every message answered unchanged: what a hold alone needs around it."""
    async for message in messages:
        yield _CONTINUE[message.WhichOneof("request")]


class _Stream:
    """One request's state across its messages."""

    __slots__ = (
        "counter",
        "count",
        "prompt_tokens",
        "request",
        "request_id",
        "reservation",
        "rewrite_to",
        "schema",
        "settled",
        "started",
    )

    def __init__(self, schema: str, count: bool) -> None:
        self.schema = schema
        self.count = count
        self.reservation: str | None = None
        self.request_id: str | None = None
        self.rewrite_to: str | None = None
        self.request: dict[str, Any] | None = None
        self.prompt_tokens: int | None = None
        self.counter = SseCounter(schema)
        self.settled = False
        self.started: float | None = None
        """When the request started (Unix time, s); cleared once the first response chunk is timed."""

    def read_metadata(self, context: Any) -> None:
        """What a counted stream's first response chunk brings instead of the request messages (module doc)."""
        namespaces = context.filter_metadata
        authz = namespaces[AUTHZ_NAMESPACE].fields if AUTHZ_NAMESPACE in namespaces else {}
        ours = namespaces[STREAM_NAMESPACE].fields if STREAM_NAMESPACE in namespaces else {}
        self.reservation = _string_field(authz, RESERVATION_KEY)
        prompt = _string_field(authz, PROMPT_TOKENS_KEY)
        self.prompt_tokens = int(prompt) if prompt is not None and prompt.isdigit() else None
        self.request_id = _string_field(ours, "request_id")
        self.counter.hide_usage = _string_field(ours, "hide_usage") == "1" and self.schema == "openai"
        start = ours.get("start_ms")
        if start is not None and start.WhichOneof("kind") == "number_value":
            self.started = start.number_value / 1000


def _string_field(fields: Any, key: str) -> str | None:
    value = fields.get(key)
    if value is None or value.WhichOneof("kind") != "string_value":
        return None
    return str(value.string_value) or None


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``ExternalProcessor/Process``: one gRPC stream per request on the routes that enable the filter."""

    def __init__(
        self,
        config: ServiceConfig,
        settle: Settle,
        *,
        logger: logging.Logger | None = None,
        observe_ttft: Callable[[float], None] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """``environ`` holds the provider keys of translating chains (each provider's ``key_env``); default: this
        process's environment, read once here."""
        self._planner = Planner(config, os.environ if environ is None else environ)
        self._upstream_names: dict[str, str] = {name: m.upstream_name for name, m in config.models.items()}
        self._settle = settle
        self._observe_ttft = observe_ttft
        self._log = logger or logging.getLogger("ext_proc")
        self._tasks: set[asyncio.Task[None]] = set()

    async def Process(  # noqa: N802 (the gRPC method's name)
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        metadata: Mapping[str, str] = dict(context.invocation_metadata() or ())
        jobs = {j.strip() for j in str(metadata.get(JOBS_KEY, "count")).split(",")}
        chain = str(metadata.get(CHAIN_KEY, ""))
        if "hold" in jobs:
            attempt = _Attempt()
            process = (
                functools.partial(self._translate, chain=chain, attempt=attempt)
                if "translate" in jobs
                else _pass_through
            )
            hold_ms = int(metadata.get(HOLD_KEY, "0") or 0)
            # Once the first token came, an attempt that is not translated needs nothing more from us.
            async for response in hold_first_token(
                request_iterator, process, hold_ms=hold_ms, close_after=lambda: not attempt.translating
            ):
                yield response
            return
        if "translate" in jobs:
            async for response in self._translate(request_iterator, chain):
                yield response
            return
        stream = _Stream(str(metadata.get(SCHEMA_KEY, "openai")), "count" in jobs)
        rewrite = "rewrite" in jobs
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    stream.started = time.time()
                    stream.reservation = _header(message.request_headers, RESERVATION_KEY)
                    stream.request_id = _header(message.request_headers, _REQUEST_ID)
                    if rewrite:
                        route = _header(message.request_headers, _ROUTE)
                        stream.rewrite_to = self._upstream_names.get(route or "")
                    yield _CONTINUE_HEADERS
                elif kind == "request_body":
                    yield self._request_body(stream, message.request_body)
                elif kind == "response_headers":
                    yield _CONTINUE_RESPONSE_HEADERS
                elif kind == "response_body":
                    body = message.response_body
                    if stream.reservation is None and not stream.settled and message.HasField("metadata_context"):
                        stream.read_metadata(message.metadata_context)
                    if stream.started is not None and self._observe_ttft is not None:
                        self._observe_ttft(max(0.0, time.time() - stream.started))
                        stream.started = None
                    yield self._response_body(stream, body)
                    if body.end_of_stream:
                        self._finish(stream, cut=False)
                        return
                elif kind == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                    self._finish(stream, cut=False)
                    return
        finally:
            self._finish(stream, cut=True)  # no-op after a clean end

    async def _translate(
        self, request_iterator: AsyncIterator[Any], chain: str, *, attempt: _Attempt | None = None
    ) -> AsyncIterator[Any]:
        """One attempt of a translating chain (module docstring). A translator's bug fails the attempt (the gRPC
        stream errors; Envoy applies the filter's failure mode), logged without the request's content."""
        try:
            async for response in self._translate_attempt(request_iterator, chain, attempt):
                yield response
        except Exception as exc:
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)]
            self._log.error(
                json.dumps(
                    {"event": "translate_error", "chain": chain, "error": type(exc).__name__} | {"stack": frames}
                )
            )
            raise

    async def _translate_attempt(
        self, request_iterator: AsyncIterator[Any], chain: str, attempt: _Attempt | None
    ) -> AsyncIterator[Any]:
        """``attempt``: its headers are held for a hedge (ext_proc/hold.py), which must know whether it translates."""
        plan: Plan | None = None
        client_body = b""
        translating = False
        out: StreamTranslator | None = None
        held = bytearray()  # a JSON answer being translated: whole at its end
        async for message in request_iterator:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                plan = self._planner.plan(chain, message.attributes)
                if plan is None:
                    self._log.error(json.dumps({"event": "translate_unplanned", "chain": chain}))
                    yield _CONTINUE_HEADERS
                    continue
                set_, remove = plan.headers()
                mutation = pb.HeaderMutation(
                    set_headers=[_set_header(k, v) for k, v in set_.items()], remove_headers=list(remove)
                )
                yield pb.ProcessingResponse(
                    request_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation)),
                    # An attempt in the client's own schema has nothing to translate back: its answer skips us
                    # (unless its headers are held for a hedge: ext_proc/hold.py).
                    mode_override=None if plan.translator is not None or attempt is not None else _REQUEST_ONLY,
                )
            elif kind == "request_body":
                client_body = message.request_body.body
                if plan is None:
                    yield _CONTINUE_REQUEST_BODY
                    continue
                try:
                    new = plan.request(client_body)
                except TranslationError as error:
                    yield _immediate(400, plan.error(400, f"cannot send this request to {plan.provider}: {error}"))
                    return
                common = pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(set_headers=[_set_header("content-length", str(len(new)))]),
                    body_mutation=pb.BodyMutation(body=new),
                )
                yield pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
            elif kind == "response_headers":
                translating = plan is not None and plan.translator is not None
                if attempt is not None:
                    attempt.translating = translating
                if not translating:
                    yield _CONTINUE_RESPONSE_HEADERS
                    continue
                assert plan is not None
                content_type = _header(message.response_headers, "content-type") or ""
                if content_type.startswith("text/event-stream"):
                    out = plan.stream(client_body)
                mutation = pb.HeaderMutation(remove_headers=["content-length"])
                yield pb.ProcessingResponse(
                    response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))
                )
            elif kind == "response_body":
                body = message.response_body
                if not translating:
                    yield _CONTINUE_RESPONSE_BODY
                elif out is not None:
                    data = out.feed(body.body)
                    if body.end_of_stream:
                        data += out.finish()
                    yield _body_reply(data)
                else:
                    assert plan is not None and plan.translator is not None
                    held += body.body
                    yield _body_reply(plan.translator.response(bytes(held)) if body.end_of_stream else b"")
                if body.end_of_stream:
                    return
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            elif kind == "response_trailers":
                yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                return

    def _request_body(self, stream: _Stream, body: Any) -> Any:
        ask_usage = stream.count and stream.schema == "openai"
        new, request, asked = rewrite_request(body.body, model=stream.rewrite_to, ask_usage=ask_usage)
        stream.request = request
        if ask_usage and not asked:
            stream.counter.hide_usage = True
        if new is None:
            return _CONTINUE_REQUEST_BODY
        common = pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[_set_header("content-length", str(len(new)))]),
            body_mutation=pb.BodyMutation(body=new),
        )
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    def _response_body(self, stream: _Stream, body: Any) -> Any:
        if not stream.count:
            return _CONTINUE_RESPONSE_BODY
        chunk = body.body
        out = stream.counter.feed(chunk)
        if body.end_of_stream:
            tail = stream.counter.finish()
            if tail:
                out = out + tail
        if out is chunk:
            return _CONTINUE_RESPONSE_BODY
        mutation = pb.BodyMutation(body=out) if out else pb.BodyMutation(clear_body=True)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation)))

    def _finish(self, stream: _Stream, *, cut: bool) -> None:
        if stream.settled or not stream.count:
            return
        stream.settled = True
        counter = stream.counter
        if stream.reservation is None or counter.events == 0:
            return  # nothing streamed: the access log (error status) or the sweep (reserved estimate) settles it
        # OpenAI's usage is the stream's last event: once it came, a cut after it changes nothing. Anthropic's
        # output count grows with every message_delta, so only a whole stream's is final.
        if counter.has_usage and (not cut or stream.schema == "openai"):
            assert counter.input_tokens is not None and counter.output_tokens is not None
            self._spawn(stream, counter.input_tokens, counter.output_tokens, False)
            return
        input_tokens = counter.input_tokens
        if input_tokens is None and stream.request is not None:
            input_tokens = estimate_prompt_tokens(stream.request)
        if input_tokens is None:
            input_tokens = stream.prompt_tokens
        if input_tokens is None:
            self._log.info(
                json.dumps(
                    {"event": "stream_unsettled", "reservation": stream.reservation, "request_id": stream.request_id}
                )
            )
            return  # the sweep settles it at the reserved estimate
        output_tokens = counter.output_tokens if counter.has_usage and counter.output_tokens is not None else 0
        output_tokens = max(output_tokens, counter.estimated_output_tokens())
        self._spawn(stream, input_tokens, output_tokens, True)

    def _spawn(self, stream: _Stream, input_tokens: int, output_tokens: int, estimated: bool) -> None:
        reservation, model = stream.reservation, stream.counter.model
        assert reservation is not None
        line = {
            "event": "stream_settled",
            "reservation": reservation,
            "request_id": stream.request_id,
            "model": model,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "estimated": estimated,
        }
        self._log.info(json.dumps(line))
        task = asyncio.get_running_loop().create_task(
            self._deliver(reservation, model, input_tokens, output_tokens, estimated)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self, reservation: str, model: str | None, input_tokens: int, output_tokens: int, estimated: bool
    ) -> None:
        try:
            await self._settle(reservation, model, input_tokens, output_tokens, estimated)
        except Exception as exc:  # noqa: BLE001 (a failed settle leaves the reservation to the sweep)
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)]
            line = {"event": "stream_settle_error", "reservation": reservation, "error": type(exc).__name__}
            self._log.error(json.dumps(line | {"stack": frames}))

    async def drain(self) -> None:
        """Wait for the settles under way (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
