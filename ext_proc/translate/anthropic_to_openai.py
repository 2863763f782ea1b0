"""An Anthropic client's message served by an OpenAI-schema provider (OpenAI, or Ollama's OpenAI route).

- :func:`request`: ``/v1/messages`` body → ``/v1/chat/completions`` body (``system`` as the first message,
  ``tool_use`` blocks as ``tool_calls``, ``tool_result`` blocks as ``tool`` messages; a stream asks for
  ``stream_options.include_usage`` so its usage can be reported);
- :func:`response`: a ``chat.completion`` (or OpenAI error) → an Anthropic ``message`` (or Anthropic's error);
- :class:`Stream`: ``chat.completion.chunk`` events → Anthropic's ``message_start`` … ``message_stop``.
"""

from __future__ import annotations

import json
from typing import Any, Final

from ext_proc.translate.common import (
    DONE,
    SseReader,
    TranslationError,
    dumps,
    index_of,
    json_object,
    obj,
    parse_data,
    sse_event,
    text_of,
)

__all__ = ["PATH", "Stream", "request", "response", "stream"]

PATH: Final = "/v1/chat/completions"

STOP_REASONS: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES: Final = {
    "invalid_request_error": "invalid_request_error",
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "server_error": "api_error",
}


# ---- request ------------------------------------------------------------------------------------------------


def _part(block: dict[str, Any]) -> dict[str, Any] | None:
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return {"type": "text", "text": block["text"]}
    if block.get("type") == "image" and isinstance(block.get("source"), dict):
        source = block["source"]
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        else:
            url = str(source.get("url", ""))
        return {"type": "image_url", "image_url": {"url": url}}
    return None


def _messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise TranslationError(f"a message with role {role!r} cannot be sent to an OpenAI-schema provider")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        return []
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_result":  # each result is a message of its own, before the user's text
            result = block.get("content")
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text_of(result)})
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name", "")),
                        "arguments": dumps(block.get("input", {})).decode(),
                    },
                }
            )
        else:
            part = _part(block)
            if part is not None:
                parts.append(part)
    if role == "assistant":
        if parts or calls:
            text = "".join(p.get("text", "") for p in parts)
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    elif parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out


def _tool(tool: Any) -> dict[str, Any] | None:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        return None
    fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))


def request(body: bytes, *, model: str, max_tokens: int) -> bytes:
    """The Anthropic messages request ``body`` as an OpenAI chat request for ``model``."""
    req = json_object(body, "the request")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslationError("the request has no messages")
    out_messages: list[dict[str, Any]] = []
    system = text_of(req.get("system"))
    if system:
        out_messages.append({"role": "system", "content": system})
    for message in messages:
        if not isinstance(message, dict):
            raise TranslationError("a message is not a JSON object")
        out_messages += _messages(message)
    out: dict[str, Any] = {"model": model, "messages": out_messages}
    limit = req.get("max_tokens")
    out["max_tokens"] = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else max_tokens
    for key in ("temperature", "top_p"):
        if isinstance(req.get(key), int | float) and not isinstance(req.get(key), bool):
            out[key] = req[key]
    if isinstance(req.get("stop_sequences"), list) and req["stop_sequences"]:
        out["stop"] = req["stop_sequences"]
    tools = [t for t in map(_tool, req.get("tools") or ()) if t is not None]
    if tools:
        out["tools"] = tools
        choice = _tool_choice(req.get("tool_choice"))
        if choice is not None:
            out["tool_choice"] = choice
    metadata = req.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if req.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return dumps(out)


# ---- response -----------------------------------------------------------------------------------------------


def error(payload: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``{"error": {"message", "type", "code"}}`` in Anthropic's shape."""
    err = obj(payload.get("error"))
    kind = str(err.get("type") or "server_error")
    return {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(kind, "api_error"), "message": str(err.get("message", ""))},
    }


def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    return {"input_tokens": usage.get("prompt_tokens") or 0, "output_tokens": usage.get("completion_tokens") or 0}


def response(body: bytes) -> bytes:
    """An OpenAI answer (completion or error) as Anthropic's; a body that is not JSON passes unchanged."""
    try:
        completion = json_object(body, "the response")
    except TranslationError:
        return body
    if "error" in completion:
        return dumps(error(completion))
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = obj(choice.get("message"))
    content: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            try:
                args = json.loads(call["function"].get("arguments") or "{}")
            except ValueError:
                args = {"arguments": call["function"].get("arguments")}
            content.append(
                {"type": "tool_use", "id": call.get("id"), "name": call["function"].get("name"), "input": args}
            )
    msg = {
        "id": str(completion.get("id", "")),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model"),
        "content": content,
        "stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None,
        "usage": _usage(completion.get("usage")),
    }
    return dumps(msg)


# ---- stream -------------------------------------------------------------------------------------------------


class Stream:
    """OpenAI SSE → Anthropic SSE, one stream. Anthropic reports the output count in ``message_delta``, which
    comes after OpenAI's usage chunk (or at ``[DONE]`` when there is none)."""

    __slots__ = ("_block", "_finish", "_reader", "_started", "_stopped", "_tools", "_usage")

    def __init__(self) -> None:
        self._reader = SseReader()
        self._started = False
        self._block: tuple[str, int] | None = None
        """The content block open now: ("text", index) or ("tool", OpenAI tool call index)."""
        self._tools: dict[int, int] = {}
        """OpenAI tool call index → Anthropic content block index."""
        self._finish: str | None = None
        self._usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
        self._stopped = False

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._event(data) for data in self._reader.feed(chunk))

    def finish(self) -> bytes:
        """The end of the provider's stream: an unterminated last event; a stream that had no ``[DONE]`` ends
        without ``message_stop``, so the client sees it was incomplete."""
        return b"".join(self._event(data) for data in self._reader.finish())

    def _next_index(self) -> int:
        return 0 if self._block is None else self._block_index() + 1

    def _block_index(self) -> int:
        assert self._block is not None
        kind, index = self._block
        return index if kind == "text" else self._tools[index]

    def _close_block(self) -> bytes:
        if self._block is None:
            return b""
        event = sse_event({"type": "content_block_stop", "index": self._block_index()}, "content_block_stop")
        return event

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": str(chunk.get("id", "")),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse_event({"type": "message_start", "message": message}, "message_start")

    def _stop(self) -> bytes:
        self._stopped = True
        out = self._close_block()
        self._block = None
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": STOP_REASONS.get(str(self._finish), "end_turn"), "stop_sequence": None},
            "usage": self._usage,
        }
        return out + sse_event(delta, "message_delta") + sse_event({"type": "message_stop"}, "message_stop")

    def _event(self, data: bytes | None) -> bytes:
        if self._stopped:
            return b""
        if data == DONE:
            return self._stop() if self._started else b""
        chunk = parse_data(data)
        if chunk is None:
            return b""
        if "error" in chunk:
            self._stopped = True
            return sse_event(error(chunk), "error")
        out = b"" if self._started else self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self._usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = obj(choice.get("delta"))
            if isinstance(delta.get("content"), str) and delta["content"]:
                if self._block is None or self._block[0] != "text":
                    index = self._next_index()
                    out += self._close_block()
                    self._block = ("text", index)
                    start = {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    }
                    out += sse_event(start, "content_block_start")
                text = {
                    "type": "content_block_delta",
                    "index": self._block_index(),
                    "delta": {"type": "text_delta", "text": delta["content"]},
                }
                out += sse_event(text, "content_block_delta")
            for call in delta.get("tool_calls") or ():
                if not isinstance(call, dict):
                    continue
                fn = obj(call.get("function"))
                number = index_of(call)
                if number not in self._tools:
                    index = self._next_index()
                    out += self._close_block()
                    self._tools[number] = index
                    self._block = ("tool", number)
                    block: dict[str, Any] = {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": fn.get("name"),
                        "input": {},
                    }
                    out += sse_event(
                        {"type": "content_block_start", "index": index, "content_block": block}, "content_block_start"
                    )
                if fn.get("arguments"):
                    partial = {"type": "input_json_delta", "partial_json": str(fn["arguments"])}
                    event = {"type": "content_block_delta", "index": self._tools[number], "delta": partial}
                    out += sse_event(event, "content_block_delta")
            if choice.get("finish_reason") is not None:
                self._finish = str(choice["finish_reason"])
        return out


def stream(*, include_usage: bool = True) -> Stream:
    """``include_usage`` is OpenAI's: Anthropic's stream always reports its usage."""
    del include_usage
    return Stream()
