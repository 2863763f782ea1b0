"""What a mock provider answers, in each provider's own shape (pure functions; ``mock_checks.py`` says when a
request is refused, ``providers/`` writes the answer and applies the timing faults).

Endpoints, by path (any method other than those below is answered as a chat request, as before):

- ``POST /v1/chat/completions`` — OpenAI (and Ollama's OpenAI route, the same shape): a ``chat.completion`` whose
  ``model`` echoes the request's, ``usage`` 7 + 3 = 10 tokens; with ``"stream": true`` SSE ``chat.completion.chunk``
  events (a role chunk, one chunk per word, a finish chunk, a usage chunk only when
  ``stream_options.include_usage`` is true) and ``data: [DONE]``.
- ``POST /v1/messages`` — Anthropic: a ``message`` with ``usage`` ``input_tokens`` 7, ``output_tokens`` 3; streaming:
  ``message_start`` (``input_tokens`` 7, ``output_tokens`` 1), one ``content_block_delta`` per word, a
  ``message_delta`` with the cumulative ``output_tokens`` 3, ``message_stop``.
- ``POST /api/chat`` — Ollama: streams unless ``"stream": false`` (Ollama's default), NDJSON lines
  ``{"model", "created_at", "message": {"role", "content"}, "done": false}``, then a ``"done": true`` line with
  ``done_reason``, the durations, ``prompt_eval_count`` 7 and ``eval_count`` 3; not streaming, that last line
  with the whole message.
- ``GET /v1/models`` — OpenAI's model list (Anthropic's shape when the request carries ``anthropic-version`` or
  ``x-api-key``); ``GET /api/tags`` — Ollama's.

The text is ``mock reply from <label>`` (``words=N``: ``w0 … wN-1``); the usage is exact and steerable
(``prompt_tokens=`` / ``completion_tokens=``). An error status answers the provider's error JSON;
``body=`` answers exactly that body.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from typing import Any

from meshgen.lab.mock_header import Behaviour

__all__ = [
    "MODELS",
    "USAGE",
    "Answer",
    "Api",
    "answer",
    "anthropic_events",
    "api_of",
    "context_exceeded",
    "error_answer",
    "error_json",
    "reason_phrase",
    "sse_chunks",
]

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet", "claude-haiku", "llama3", "mock-model")
"""What ``GET /v1/models`` lists (any model is answered: the mock echoes the request's)."""
CREATED_AT = "2024-01-01T00:00:00Z"
"""Ollama's ``created_at``, fixed so answers are deterministic."""
CONTEXT_LIMIT = 128_000

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
_OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


class Api(Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    OLLAMA = "ollama"


@dataclass(frozen=True)
class Answer:
    """One answer: a whole body, or a stream of events (SSE events or NDJSON lines, the last one the terminator)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    events: tuple[bytes, ...] | None = None

    @property
    def payload(self) -> bytes:
        return b"".join(self.events) if self.events is not None else self.body


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def api_of(path: str) -> Api:
    """The provider API a request path belongs to (OpenAI for anything unknown)."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/messages"):
        return Api.ANTHROPIC
    if path == "/api/chat" or path.startswith("/api/"):
        return Api.OLLAMA
    return Api.OPENAI


# ---- errors -------------------------------------------------------------------------------------------------------
def error_json(
    status: int,
    message: str,
    *,
    anthropic: bool = False,
    api: Api | None = None,
    etype: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """The provider's error body: OpenAI ``{"error": {message, type, param, code}}``, Anthropic
    ``{"type": "error", "error": {type, message}}``, Ollama ``{"error": message}``."""
    api = api or (Api.ANTHROPIC if anthropic else Api.OPENAI)
    if api is Api.ANTHROPIC:
        etype = etype or _ERROR_TYPES.get(status, "overloaded_error" if status == 529 else "api_error")
        return json.dumps({"type": "error", "error": {"type": etype, "message": message}}).encode()
    if api is Api.OLLAMA:
        return json.dumps({"error": message}).encode()
    etype = etype or _ERROR_TYPES.get(status, "server_error")
    code = code if code is not None else _OPENAI_CODES.get(status)
    return json.dumps({"error": {"message": message, "type": etype, "param": param, "code": code}}).encode()


def error_answer(
    api: Api,
    status: int,
    message: str,
    *,
    etype: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> Answer:
    body = error_json(status, message, api=api, etype=etype, code=code, param=param)
    return Answer(status, (("content-type", JSON), *headers), body)


def context_exceeded(api: Api, prompt_tokens: int) -> Answer:
    """Each provider's real answer to a prompt over the model's context window."""
    over = max(prompt_tokens, CONTEXT_LIMIT + 1)
    if api is Api.ANTHROPIC:
        return error_answer(api, 400, f"prompt is too long: {over} tokens > 200000 maximum")
    if api is Api.OLLAMA:
        return error_answer(api, 400, f"input length ({over} tokens) exceeds the model's context length")
    message = (
        f"This model's maximum context length is {CONTEXT_LIMIT} tokens. However, your messages resulted in "
        f"{over} tokens. Please reduce the length of the messages."
    )
    return error_answer(api, 400, message, code="context_length_exceeded", param="messages")


# ---- answers ------------------------------------------------------------------------------------------------------
def _request_json(body: bytes) -> dict[str, Any]:
    req: Any = None
    with contextlib.suppress(ValueError):
        req = json.loads(body) if body else None
    return req if isinstance(req, dict) else {}


def answer(
    label: str, seq: int, method: str, target: str, headers: Mapping[str, str], body: bytes, b: Behaviour
) -> Answer:
    """What ``label`` answers its ``seq``-th request, before faults that are about timing and connections."""
    path = target.split("?", 1)[0].rstrip("/")
    api = api_of(path)
    retry = (("retry-after", b.retry_after),) if b.retry_after is not None else ()
    if b.body is not None:
        try:
            json.loads(b.body)
            ctype = JSON
        except ValueError:
            ctype = "text/plain"
        return Answer(b.status, (("content-type", ctype), *retry), b.body)
    if b.status >= 400:
        return error_answer(api, b.status, f"mock upstream {label} answered {b.status}", headers=retry)
    if method == "GET" and path in {"/v1/models", "/models", "/api/tags"}:
        return Answer(b.status, (("content-type", JSON), *retry), model_list(path, headers))
    req = _request_json(body)
    model: str = req["model"] if isinstance(req.get("model"), str) else "mock-model"
    text = f"mock reply from {label}" if b.words is None else " ".join(f"w{i}" for i in range(b.words))
    prompt, completion = b.prompt_tokens, b.completion_tokens
    if api is Api.ANTHROPIC:
        if req.get("stream") is True:
            events = anthropic_event_list(seq, model, text, prompt, completion)
            return Answer(b.status, (("content-type", SSE), *retry), events=_stream_faults(api, events, b))
        return Answer(
            b.status, (("content-type", JSON), *retry), _dump(anthropic_message(seq, model, text, prompt, completion))
        )
    if api is Api.OLLAMA:
        if req.get("stream", True) is not False:
            lines = ollama_lines(model, text, prompt, completion)
            return Answer(b.status, (("content-type", NDJSON), *retry), events=_stream_faults(api, lines, b))
        final = ollama_final(model, prompt, completion, content=text)
        return Answer(b.status, (("content-type", "application/json; charset=utf-8"), *retry), _dump(final))
    if req.get("stream") is True:
        chunks = openai_events(seq, model, text, req, prompt, completion)
        return Answer(b.status, (("content-type", SSE), *retry), events=_stream_faults(api, chunks, b))
    return Answer(
        b.status, (("content-type", JSON), *retry), _dump(openai_completion(seq, model, text, prompt, completion))
    )


def _dump(obj: Any) -> bytes:
    return json.dumps(obj).encode()


_MALFORMED = {
    Api.OPENAI: b'data: {"id": "chatcmpl-mock", "choices": [{"delta": {"content": "trunc\n\n',
    Api.ANTHROPIC: b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"te\n\n',
    Api.OLLAMA: b'{"model": "mock", "message": {"role": "assistant", "cont\n',
}


def _stream_faults(api: Api, events: list[bytes], b: Behaviour) -> tuple[bytes, ...]:
    """``no_done`` drops the terminator; ``malformed_after`` inserts one event that is not JSON."""
    if b.no_done:
        events = events[:-1]
    if b.malformed_after is not None:
        at = min(b.malformed_after, len(events))
        events = [*events[:at], _MALFORMED[api], *events[at:]]
    return tuple(events)


def model_list(path: str, headers: Mapping[str, str]) -> bytes:
    if path == "/api/tags":
        models = [
            {"name": f"{m}:latest", "model": f"{m}:latest", "modified_at": CREATED_AT, "size": 0, "digest": ""}
            for m in MODELS
        ]
        return _dump({"models": models})
    if "anthropic-version" in headers or "x-api-key" in headers:
        data = [{"type": "model", "id": m, "display_name": m, "created_at": CREATED_AT} for m in MODELS]
        return _dump({"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]})
    return _dump(
        {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in MODELS]}
    )


# ---- OpenAI -------------------------------------------------------------------------------------------------------
def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_completion(seq: int, model: str, text: str, prompt: int = 7, completion: int = 3) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-mock-{seq}",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": _usage(prompt, completion),
    }


def openai_events(
    seq: int, model: str, text: str, req: Mapping[str, Any], prompt: int = 7, completion: int = 3
) -> list[bytes]:
    opts = req.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    base = {"id": f"chatcmpl-mock-{seq}", "object": "chat.completion.chunk", "created": 0, "model": model}
    chunks: list[dict[str, Any]] = [base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [base | {"choices": [{"index": 0, "delta": {"content": word + " "}}]} for word in text.split(" ")]
    chunks.append(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if include_usage:
        chunks.append(base | {"choices": [], "usage": _usage(prompt, completion)})
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def sse_chunks(seq: int, model: str, text: str, req: Mapping[str, Any]) -> bytes:
    """OpenAI's SSE stream for ``text``, as one body."""
    return b"".join(openai_events(seq, model, text, req))


# ---- Anthropic ----------------------------------------------------------------------------------------------------
def anthropic_message(seq: int, model: str, text: str, prompt: int = 7, completion: int = 3) -> dict[str, Any]:
    return {
        "id": f"msg_mock_{seq}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": completion},
    }


def anthropic_event_list(seq: int, model: str, text: str, prompt: int = 7, completion: int = 3) -> list[bytes]:
    """Anthropic's streaming shape: usage input in ``message_start``, cumulative output in ``message_delta``."""
    message = anthropic_message(seq, model, text, prompt, 1) | {"content": [], "stop_reason": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": message}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ("ping", {"type": "ping"}),
    ]
    for word in text.split(" "):
        delta = {"type": "text_delta", "text": word + " "}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": completion},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]


def anthropic_events(seq: int, model: str, text: str) -> bytes:
    """Anthropic's SSE stream for ``text``, as one body."""
    return b"".join(anthropic_event_list(seq, model, text))


# ---- Ollama -------------------------------------------------------------------------------------------------------
def ollama_final(model: str, prompt: int, completion: int, *, content: str = "") -> dict[str, Any]:
    """The ``"done": true`` object: the whole answer when not streaming, the stream's last line otherwise."""
    return {
        "model": model,
        "created_at": CREATED_AT,
        "message": {"role": "assistant", "content": content},
        "done_reason": "stop",
        "done": True,
        "total_duration": 1_000_000 * (prompt + completion),
        "load_duration": 1_000_000,
        "prompt_eval_count": prompt,
        "prompt_eval_duration": 1_000_000 * prompt,
        "eval_count": completion,
        "eval_duration": 1_000_000 * completion,
    }


def ollama_lines(model: str, text: str, prompt: int = 7, completion: int = 3) -> list[bytes]:
    lines = [
        {
            "model": model,
            "created_at": CREATED_AT,
            "message": {"role": "assistant", "content": word + " "},
            "done": False,
        }
        for word in text.split(" ")
    ]
    return [json.dumps(line).encode() + b"\n" for line in [*lines, ollama_final(model, prompt, completion)]]
