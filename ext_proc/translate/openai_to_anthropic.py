"""An OpenAI client's chat completion served by an Anthropic provider.

- :func:`request`: ``/v1/chat/completions`` body → ``/v1/messages`` body (system messages lifted to ``system``,
  tool calls and tool results as ``tool_use`` / ``tool_result`` blocks, consecutive same-role messages merged as
  Anthropic wants them alternating, ``max_tokens`` always set since Anthropic requires it);
- :func:`response`: an Anthropic ``message`` (or error) → a ``chat.completion`` (or OpenAI's error shape);
- :class:`Stream`: Anthropic's SSE events → ``chat.completion.chunk`` events and ``data: [DONE]``; a usage chunk
  (``choices: []``) only when the request asked for ``stream_options.include_usage`` (the gateway's own counting
  asks for it, and hides it from a client that did not).
"""

from __future__ import annotations

import json
from typing import Any, Final

from ext_proc.translate.common import (
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

PATH: Final = "/v1/messages"

STOP_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "refusal": "content_filter",
}
_ERROR_TYPES: Final = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "invalid_request_error",
    "permission_error": "invalid_request_error",
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "rate_limit_exceeded",
    "api_error": "server_error",
    "overloaded_error": "server_error",
}


# ---- request ------------------------------------------------------------------------------------------------


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                blocks.append({"type": "text", "text": part["text"]})
            elif part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if isinstance(url, str):
                    blocks.append(_image(url))
    return blocks


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if isinstance(raw, str) and raw.strip() else {}
    except ValueError:
        return {"arguments": raw}
    return value if isinstance(value, dict) else {"value": value}


def _message(message: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    role = message.get("role")
    if role == "tool":
        result: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": str(message.get("tool_call_id", "")),
            "content": text_of(message.get("content")),
        }
        return "user", [result]
    if role == "assistant":
        blocks = _blocks(message.get("content"))
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                fn = call["function"]
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": str(call.get("id", "")),
                        "name": str(fn.get("name", "")),
                        "input": _arguments(fn.get("arguments")),
                    }
                )
        return "assistant", blocks
    if role in ("user", None):
        return "user", _blocks(message.get("content"))
    raise TranslationError(f"a message with role {role!r} cannot be sent to Anthropic")


def _tool(tool: Any) -> dict[str, Any] | None:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        return None
    fn = tool["function"]
    out: dict[str, Any] = {
        "name": fn.get("name"),
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": choice["function"].get("name")}
    return None


def request(body: bytes, *, model: str, max_tokens: int) -> bytes:
    """The OpenAI chat request ``body`` as an Anthropic messages request for ``model``."""
    req = json_object(body, "the request")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslationError("the request has no messages")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise TranslationError("a message is not a JSON object")
        if message.get("role") in ("system", "developer"):
            system.append(text_of(message.get("content")))
            continue
        role, blocks = _message(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise TranslationError("the request has no user or assistant message")
    out: dict[str, Any] = {"model": model, "messages": turns}
    if system:
        out["system"] = "\n\n".join(system)
    limit = req.get("max_completion_tokens", req.get("max_tokens"))
    out["max_tokens"] = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else max_tokens
    for key in ("temperature", "top_p"):
        if isinstance(req.get(key), int | float) and not isinstance(req.get(key), bool):
            out[key] = req[key]
    stop = req.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = [s for s in stop if isinstance(s, str)]
    tools = [t for t in map(_tool, req.get("tools") or ()) if t is not None]
    if tools:
        out["tools"] = tools
        choice = _tool_choice(req.get("tool_choice"))
        if choice is not None:
            out["tool_choice"] = choice
    if isinstance(req.get("user"), str):
        out["metadata"] = {"user_id": req["user"]}
    if req.get("stream") is True:
        out["stream"] = True
    return dumps(out)


# ---- response -----------------------------------------------------------------------------------------------


def _usage(usage: Any) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("input_tokens") or 0
    prompt += (usage.get("cache_read_input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0)
    completion = usage.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error(payload: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's ``{"type": "error", "error": {"type", "message"}}`` in OpenAI's shape."""
    err = obj(payload.get("error"))
    kind = str(err.get("type", "api_error"))
    return {"error": {"message": str(err.get("message", "")), "type": _ERROR_TYPES.get(kind, kind), "code": kind}}


def response(body: bytes) -> bytes:
    """An Anthropic answer (message or error) as OpenAI's; a body that is not JSON passes unchanged."""
    try:
        msg = json_object(body, "the response")
    except TranslationError:
        return body
    if msg.get("type") == "error" or "error" in msg:
        return dumps(error(msg))
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": dumps(block.get("input", {})).decode()},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    completion = {
        "id": f"chatcmpl-{msg.get('id', '')}",
        "object": "chat.completion",
        "created": 0,
        "model": msg.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": STOP_REASONS.get(str(msg.get("stop_reason")), "stop"),
            }
        ],
        "usage": _usage(msg.get("usage")),
    }
    return dumps(completion)


# ---- stream -------------------------------------------------------------------------------------------------


class Stream:
    """Anthropic SSE → OpenAI SSE, one stream. ``include_usage``: end with OpenAI's usage chunk."""

    __slots__ = ("_base", "_done", "_reader", "_tools", "_usage", "include_usage")

    def __init__(self, *, include_usage: bool = True) -> None:
        self.include_usage = include_usage
        self._reader = SseReader()
        self._base: dict[str, Any] = {"id": "chatcmpl-", "object": "chat.completion.chunk", "created": 0, "model": None}
        self._usage: dict[str, Any] = {}
        self._tools: dict[int, int] = {}
        """Anthropic content block index → OpenAI tool call index."""
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._event(parse_data(data)) for data in self._reader.feed(chunk))

    def finish(self) -> bytes:
        """The end of the provider's stream: an unterminated last event, then nothing more (a stream without
        ``message_stop`` ends without ``[DONE]``, so the client sees it was incomplete)."""
        return b"".join(self._event(parse_data(data)) for data in self._reader.finish())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse_event(self._base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def _event(self, event: dict[str, Any] | None) -> bytes:
        if event is None or self._done:
            return b""
        kind = event.get("type")
        if kind == "message_start":
            message = obj(event.get("message"))
            self._base = self._base | {"id": f"chatcmpl-{message.get('id', '')}", "model": message.get("model")}
            if isinstance(message.get("usage"), dict):
                self._usage.update(message["usage"])
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = obj(event.get("content_block"))
            if block.get("type") == "tool_use":
                index = self._tools.setdefault(index_of(event), len(self._tools))
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "content_block_delta":
            delta = obj(event.get("delta"))
            if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                return self._chunk({"content": delta["text"]})
            if delta.get("type") == "input_json_delta":
                index = self._tools.get(index_of(event), 0)
                call = {"index": index, "function": {"arguments": str(delta.get("partial_json", ""))}}
                return self._chunk({"tool_calls": [call]})
            return b""
        if kind == "message_delta":
            if isinstance(event.get("usage"), dict):
                self._usage.update({k: v for k, v in event["usage"].items() if v is not None})
            delta = obj(event.get("delta"))
            return self._chunk({}, STOP_REASONS.get(str(delta.get("stop_reason")), "stop"))
        if kind == "message_stop":
            self._done = True
            usage = sse_event(self._base | {"choices": [], "usage": _usage(self._usage)}) if self.include_usage else b""
            return usage + sse_event(b"[DONE]")
        if kind == "error":
            self._done = True
            return sse_event(error(event))
        return b""  # ping, content_block_stop, unknown events


def stream(*, include_usage: bool = True) -> Stream:
    return Stream(include_usage=include_usage)
