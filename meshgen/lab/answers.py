"""What a mock provider answers: response bodies, error bodies, SSE chunks and reason phrases (pure functions).

Defaults: 200, ``content-type: application/json``, an OpenAI ``chat.completion`` whose ``model`` echoes
the request's (``usage`` 7 + 3 = 10 tokens); on a ``/messages`` path an Anthropic ``message``
(``input_tokens`` 7, ``output_tokens`` 3); ``"stream": true`` in a chat-completions body answers SSE
chunks (a usage chunk only when ``stream_options.include_usage`` is true), and on a ``/messages`` path
Anthropic's SSE events (``message_start`` with ``input_tokens`` 7 and ``output_tokens`` 1, one
``content_block_delta`` per word, a ``message_delta`` with the cumulative ``output_tokens`` 3).
``words=N`` makes the reply N words long (N content chunks); the usage stays 7 + 3.
An error status answers an OpenAI/Anthropic-style error JSON; ``body=`` answers exactly that body.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from typing import Any

from meshgen.lab.mock_header import Behaviour

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_json(status: int, message: str, *, anthropic: bool) -> bytes:
    if anthropic:
        etype = _ERROR_TYPES.get(status, "overloaded_error" if status == 529 else "api_error")
        return json.dumps({"type": "error", "error": {"type": etype, "message": message}}).encode()
    etype = _ERROR_TYPES.get(status, "server_error")
    return json.dumps({"error": {"message": message, "type": etype, "code": status}}).encode()


def answer(label: str, seq: int, target: str, body: bytes, b: Behaviour) -> tuple[int, list[tuple[str, str]], bytes]:
    path = target.split("?", 1)[0]
    anthropic = path.rstrip("/").endswith("/messages")
    if b.body is not None:
        try:
            json.loads(b.body)
            ctype = "application/json"
        except ValueError:
            ctype = "text/plain"
        return b.status, [("content-type", ctype)], b.body
    if b.status >= 400:
        msg = f"mock upstream {label} answered {b.status}"
        return (
            b.status,
            [("content-type", "application/json")],
            error_json(b.status, msg, anthropic=anthropic),
        )
    req: Any = None
    with contextlib.suppress(ValueError):
        req = json.loads(body) if body else None
    req = req if isinstance(req, dict) else {}
    model = req.get("model") if isinstance(req.get("model"), str) else "mock-model"
    text = f"mock reply from {label}" if b.words is None else " ".join(f"w{i}" for i in range(b.words))
    if anthropic and req.get("stream") is True:
        return b.status, [("content-type", "text/event-stream")], anthropic_events(seq, model, text)
    if anthropic:
        msg_obj = {
            "id": f"msg_mock_{seq}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": 3},
        }
        return b.status, [("content-type", "application/json")], json.dumps(msg_obj).encode()
    if req.get("stream") is True:
        return b.status, [("content-type", "text/event-stream")], sse_chunks(seq, model, text, req)
    completion = {
        "id": f"chatcmpl-mock-{seq}",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": dict(USAGE),
    }
    return b.status, [("content-type", "application/json")], json.dumps(completion).encode()


def sse_chunks(seq: int, model: str, text: str, req: Mapping[str, Any]) -> bytes:
    opts = req.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    base = {"id": f"chatcmpl-mock-{seq}", "object": "chat.completion.chunk", "created": 0, "model": model}

    def chunks() -> Iterator[dict[str, Any]]:
        yield base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        for word in text.split(" "):
            yield base | {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
        yield base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        if include_usage:
            yield base | {"choices": [], "usage": dict(USAGE)}

    events = [f"data: {json.dumps(c)}\n\n" for c in chunks()] + ["data: [DONE]\n\n"]
    return "".join(events).encode()


def anthropic_events(seq: int, model: str, text: str) -> bytes:
    """Anthropic's streaming shape: usage input in ``message_start``, cumulative output in ``message_delta``."""
    message: dict[str, Any] = {
        "id": f"msg_mock_{seq}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 1},
    }
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
                "usage": {"output_tokens": 3},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()
