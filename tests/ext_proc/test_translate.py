"""The schema translators (ext_proc/translate/): requests, JSON answers, errors and SSE streams, both ways."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct, Value

from ext_proc.config import ServiceConfig
from ext_proc.sse import SseCounter
from ext_proc.translate import PATHS, TranslationError, anthropic_to_openai, openai_to_anthropic, translator
from ext_proc.translate.attempt import Plan, Planner, provider_of
from meshgen.lab.answers import anthropic_events, sse_chunks

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def loads(body: bytes) -> Any:
    return json.loads(body)


def data_events(stream: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body (``[DONE]`` as the string)."""
    out: list[Any] = []
    for event in stream.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[6:]
                out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def names(stream: bytes) -> list[str]:
    return [line[7:].decode() for line in stream.split(b"\n") if line.startswith(b"event: ")]


def feed_in(translate: Any, body: bytes, pieces: list[int]) -> bytes:
    """``body`` fed in pieces of the given sizes (the rest in one), then finished."""
    out, at = b"", 0
    for size in pieces:
        out += translate.feed(body[at : at + size])
        at += size
    return out + translate.feed(body[at:]) + translate.finish()


# ---- OpenAI client → Anthropic provider -------------------------------------------------------------------


def test_openai_request_becomes_an_anthropic_request() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And "},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                ],
            },
        ],
        "temperature": 0.2,
        "stop": "END",
        "tools": TOOLS,
        "tool_choice": "required",
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
    }
    out = loads(openai_to_anthropic.request(json.dumps(body).encode(), model="claude-sonnet-4-5", max_tokens=512))
    assert out == {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.\n\nUse metric.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}],
            },
            {
                "role": "user",  # the tool result and the next user turn merged: Anthropic wants turns alternating
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "text", "text": "And "},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
                ],
            },
        ],
        "max_tokens": 512,
        "temperature": 0.2,
        "stop_sequences": ["END"],
        "tools": [
            {
                "name": "weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "description": "Weather in a city",
            }
        ],
        "tool_choice": {"type": "any"},
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }


def test_the_clients_max_tokens_wins_over_the_default() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 77}
    assert loads(openai_to_anthropic.request(json.dumps(body).encode(), model="c", max_tokens=4096))["max_tokens"] == 77


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1]",
        b'{"model": "m"}',
        b'{"messages": [{"role": "system", "content": "only"}]}',
        b'{"messages": [{"role": "wizard", "content": "x"}]}',
    ],
    ids=["not-json", "not-object", "no-messages", "only-system", "unknown-role"],
)
def test_requests_that_cannot_be_translated(body: bytes) -> None:
    with pytest.raises(TranslationError):
        openai_to_anthropic.request(body, model="c", max_tokens=1)


def test_anthropic_answer_becomes_a_chat_completion() -> None:
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 11, "output_tokens": 5, "cache_read_input_tokens": 2},
    }
    out = loads(openai_to_anthropic.response(json.dumps(answer).encode()))
    assert out["object"] == "chat.completion" and out["model"] == "claude-sonnet-4-5"
    assert out["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ]
    assert out["usage"] == {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}


@pytest.mark.parametrize(
    ("kind", "openai_type"),
    [
        ("rate_limit_error", "rate_limit_exceeded"),
        ("overloaded_error", "server_error"),
        ("invalid_request_error", "invalid_request_error"),
    ],
    ids=["429", "529", "400"],
)
def test_anthropic_errors_take_openais_shape(kind: str, openai_type: str) -> None:
    error = {"type": "error", "error": {"type": kind, "message": "nope"}}
    assert loads(openai_to_anthropic.response(json.dumps(error).encode())) == {
        "error": {"message": "nope", "type": openai_type, "code": kind}
    }


def test_a_body_that_is_not_json_passes_unchanged() -> None:
    assert openai_to_anthropic.response(b"upstream connect error") == b"upstream connect error"
    assert anthropic_to_openai.response(b"<html>") == b"<html>"


ANTHROPIC_STREAM = anthropic_events(1, "claude-sonnet-4-5", "one two three")


def _expected_openai_stream(include_usage: bool) -> list[Any]:
    return data_events(feed_in(openai_to_anthropic.Stream(include_usage=include_usage), ANTHROPIC_STREAM, []))


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_anthropic_stream_becomes_chat_completion_chunks(include_usage: bool) -> None:
    events = _expected_openai_stream(include_usage)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "claude-sonnet-4-5" for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]) == "one two three "
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    assert events[-1] == "[DONE]"
    if include_usage:
        assert events[-2]["choices"] == [] and events[-2]["usage"] == {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "total_tokens": 10,
        }
    else:
        assert all("usage" not in e for e in events[:-1])


def test_stream_translation_does_not_depend_on_where_chunks_are_cut() -> None:
    whole = feed_in(openai_to_anthropic.Stream(), ANTHROPIC_STREAM, [])
    for at in range(1, len(ANTHROPIC_STREAM)):
        assert feed_in(openai_to_anthropic.Stream(), ANTHROPIC_STREAM, [at]) == whole, at
    assert feed_in(openai_to_anthropic.Stream(), ANTHROPIC_STREAM, [1] * len(ANTHROPIC_STREAM)) == whole
    crlf = ANTHROPIC_STREAM.replace(b"\n", b"\r\n")
    assert feed_in(openai_to_anthropic.Stream(), crlf, [3] * (len(crlf) // 3)) == whole


def test_the_translated_stream_is_counted_like_a_providers() -> None:
    counter = SseCounter("openai")
    counter.feed(feed_in(openai_to_anthropic.Stream(), ANTHROPIC_STREAM, [7] * 50))
    counter.finish()
    assert (counter.input_tokens, counter.output_tokens, counter.model) == (7, 3, "claude-sonnet-4-5")


def test_a_cut_anthropic_stream_never_ends_with_done() -> None:
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: content_block_stop")]
    out = feed_in(openai_to_anthropic.Stream(), cut, [])
    assert b"[DONE]" not in out and b"one two three" not in out  # content arrived, but no end: the client sees a cut


def test_an_error_event_becomes_an_openai_error_chunk() -> None:
    stream = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n'
    assert data_events(feed_in(openai_to_anthropic.Stream(), stream, [5])) == [
        {"error": {"message": "busy", "type": "server_error", "code": "overloaded_error"}}
    ]


def test_anthropic_tool_use_stream_becomes_tool_call_deltas() -> None:
    events = [
        {
            "type": "message_start",
            "message": {"id": "msg_2", "model": "c", "usage": {"input_tokens": 9, "output_tokens": 1}},
        },
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {}},
        },
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"city":'}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '"Oslo"}'}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}},
        {"type": "message_stop"},
    ]
    body = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    out = data_events(feed_in(openai_to_anthropic.Stream(), body, [13] * 40))
    calls = [c for e in out[:-1] if e["choices"] for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_9",
        "type": "function",
        "function": {"name": "weather", "arguments": ""},
    }
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Oslo"}'
    assert out[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert out[-2]["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


# ---- Anthropic client → OpenAI-schema provider ------------------------------------------------------------


def test_anthropic_request_becomes_an_openai_request() -> None:
    body = {
        "model": "claude-main",
        "system": [{"type": "text", "text": "Be brief."}],
        "max_tokens": 300,
        "stop_sequences": ["END"],
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "3C"}]},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
        "tools": [{"name": "weather", "description": "Weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": "weather"},
        "metadata": {"user_id": "u-2"},
        "stream": True,
    }
    out = loads(anthropic_to_openai.request(json.dumps(body).encode(), model="gpt-4o-2026", max_tokens=4096))
    assert out == {
        "model": "gpt-4o-2026",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "3C"},
            {"role": "user", "content": "Thanks"},
        ],
        "max_tokens": 300,
        "stop": ["END"],
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "parameters": {"type": "object"}, "description": "Weather"},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "user": "u-2",
        "stream": True,
        "stream_options": {"include_usage": True},  # Anthropic's stream always reports usage: ask for it
    }


def test_openai_answer_becomes_an_anthropic_message() -> None:
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-2026",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hi",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }
    out = loads(anthropic_to_openai.response(json.dumps(completion).encode()))
    assert out == {
        "id": "chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o-2026",
        "content": [{"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "c1", "name": "f", "input": {}}],
        "stop_reason": "max_tokens",
        "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 2},
    }


def test_openai_errors_take_anthropics_shape() -> None:
    error = {"error": {"message": "slow down", "type": "rate_limit_exceeded", "code": 429}}
    assert loads(anthropic_to_openai.response(json.dumps(error).encode())) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


OPENAI_STREAM = sse_chunks(1, "gpt-4o-2026", "one two", {"stream_options": {"include_usage": True}})


def test_openai_stream_becomes_anthropic_events() -> None:
    out = feed_in(anthropic_to_openai.Stream(), OPENAI_STREAM, [])
    assert names(out) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    events = data_events(out)
    assert events[0]["message"]["model"] == "gpt-4o-2026"
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == "one two "
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    assert events[-2]["usage"] == {"input_tokens": 7, "output_tokens": 3}
    counter = SseCounter("anthropic")  # the gateway's counter reads the translated stream's usage
    counter.feed(out)
    assert (counter.input_tokens, counter.output_tokens) == (7, 3)


def test_openai_stream_translation_does_not_depend_on_where_chunks_are_cut() -> None:
    whole = feed_in(anthropic_to_openai.Stream(), OPENAI_STREAM, [])
    for at in range(1, len(OPENAI_STREAM)):
        assert feed_in(anthropic_to_openai.Stream(), OPENAI_STREAM, [at]) == whole, at


def test_a_cut_openai_stream_never_ends_with_message_stop() -> None:
    cut = OPENAI_STREAM[: OPENAI_STREAM.index(b'"finish_reason": "stop"')]
    assert b"message_stop" not in feed_in(anthropic_to_openai.Stream(), cut, [])


def test_openai_tool_call_stream_becomes_tool_use_blocks() -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    chunks = [
        base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Checking"}}]},
        base
        | {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "weather", "arguments": ""},
                            }
                        ]
                    },
                }
            ]
        },
        base
        | {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Rome"}'}}]}}
            ]
        },
        base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    body = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    events = data_events(feed_in(anthropic_to_openai.Stream(), body, [9] * 80))
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"]
    assert [s["index"] for s in starts] == [0, 1]
    args = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["index"] == 1]
    assert "".join(args) == '{"city":"Rome"}'
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_translators_by_schema_pair() -> None:
    assert translator("openai", "anthropic") is openai_to_anthropic
    assert translator("anthropic", "openai") is anthropic_to_openai
    assert translator("openai", "openai") is None
    assert PATHS == {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


# ---- one attempt ------------------------------------------------------------------------------------------

HOST_METADATA = (
    'filter_metadata { key: "meshgen" value { fields { key: "endpoint" value { string_value: '
    '"provider.anthropic.global.ep0" } } fields { key: "provider" value { string_value: "anthropic" } } } }'
)


def test_the_attempts_provider_is_read_from_envoys_text_metadata() -> None:
    assert provider_of(HOST_METADATA) == "anthropic"
    assert provider_of("") is None


def _plan(api: str, client: str, key: str) -> Plan:
    return Plan(
        provider="p",
        api=api,
        client=client,
        model="m-upstream",
        max_tokens=99,
        key=key,
        translator=translator(client, api),
    )


@pytest.mark.parametrize(
    ("api", "key", "set_", "remove"),
    [
        (
            "anthropic",
            "sk-a",
            {":path": "/v1/messages", "anthropic-version": "2023-06-01", "x-api-key": "sk-a"},
            ("accept-encoding", "authorization"),
        ),
        (
            "anthropic",
            "",
            {":path": "/v1/messages", "anthropic-version": "2023-06-01"},
            ("accept-encoding", "authorization", "x-api-key"),
        ),
        (
            "openai",
            "sk-o",
            {":path": "/v1/chat/completions", "authorization": "Bearer sk-o"},
            ("accept-encoding", "x-api-key", "anthropic-version"),
        ),
        (
            "openai",
            "",
            {":path": "/v1/chat/completions"},
            ("accept-encoding", "x-api-key", "anthropic-version", "authorization"),
        ),
    ],
    ids=["anthropic", "anthropic-no-key", "openai", "openai-no-key"],
)
def test_every_attempt_sets_every_provider_header(
    api: str, key: str, set_: dict[str, str], remove: tuple[str, ...]
) -> None:
    assert _plan(api, "openai", key).headers() == (set_, remove)


def test_a_same_schema_attempt_gets_its_models_name() -> None:
    plan = _plan("openai", "openai", "")
    body = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    assert loads(plan.request(body)) == {"model": "m-upstream", "messages": []}
    same = json.dumps({"model": "m-upstream"}).encode()
    assert plan.request(same) is same
    with pytest.raises(TranslationError):
        plan.request(b"nope")


def test_plans_come_from_the_contract_and_the_environment() -> None:
    config = ServiceConfig.model_validate(
        {
            "schema_version": 1,
            "policy": "p",
            "failure_mode": "closed",
            "models": {
                "gpt-4o": {"provider": "openai", "upstream_name": "gpt-4o", "max_tokens_default": 1024},
                "claude": {"provider": "anthropic", "upstream_name": "claude-x", "max_tokens_default": 512},
            },
            "tenants": {},
            "providers": {
                "openai": {"api": "openai", "key_env": "K_OPENAI"},
                "anthropic": {"api": "anthropic", "key_env": "K_ANTHROPIC"},
            },
            "translated_chains": {"gpt-4o": {"openai": "gpt-4o", "anthropic": "claude"}},
        }
    )
    planner = Planner(config, {"K_ANTHROPIC": "sk-ant"})
    attributes = {"meshgen.translate": Struct(fields={"xds.upstream_host_metadata": Value(string_value=HOST_METADATA)})}
    plan = planner.plan("gpt-4o", attributes)
    assert plan is not None
    assert (plan.provider, plan.api, plan.client, plan.model, plan.max_tokens, plan.key) == (
        "anthropic",
        "anthropic",
        "openai",
        "claude-x",
        512,
        "sk-ant",
    )
    assert plan.translator is openai_to_anthropic
    assert planner.plan("claude", attributes) is None  # not a translating chain
    assert planner.plan("gpt-4o", {}) is None  # no metadata


def test_the_contract_refuses_unknown_chain_references() -> None:
    with pytest.raises(ValueError, match="unknown provider"):
        ServiceConfig.model_validate(
            {
                "schema_version": 1,
                "policy": "p",
                "failure_mode": "closed",
                "models": {"m": {"provider": "openai", "upstream_name": "m", "max_tokens_default": 1}},
                "tenants": {},
                "translated_chains": {"m": {"openai": "m"}},
            }
        )
