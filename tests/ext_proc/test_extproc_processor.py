"""The streaming and rewrite logic of the ext_proc servicer, without Envoy (tests/behaviour/test_streaming.py runs
it through Envoy)."""

from __future__ import annotations

import json
import random

import pytest

from ext_proc.processor import rewrite_request
from ext_proc.sse import SseCounter
from ext_proc.tokens import count_text
from meshgen.lab.answers import anthropic_events, sse_chunks


def split(body: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(body)), rng.randint(0, min(40, len(body) - 1))))
    return [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]


def replay(counter: SseCounter, parts: list[bytes]) -> bytes:
    return b"".join(counter.feed(p) for p in parts) + counter.finish()


@pytest.mark.parametrize("asked", [False, True])
def test_openai_usage_is_read_at_any_split_and_hidden_unless_asked(asked: bool) -> None:
    body = sse_chunks(1, "gpt-x", "one two three", {"stream_options": {"include_usage": True}})
    expected = body if asked else sse_chunks(1, "gpt-x", "one two three", {})
    rng = random.Random(4)
    for _ in range(200):
        counter = SseCounter("openai", hide_usage=not asked)
        assert replay(counter, split(body, rng)) == expected
        assert (counter.input_tokens, counter.output_tokens, counter.model) == (7, 3, "gpt-x")


def test_openai_content_is_never_held_back() -> None:
    body = sse_chunks(1, "m", "one two three", {"stream_options": {"include_usage": True}})
    finish = body.index(b'"finish_reason": "stop"')
    counter = SseCounter("openai", hide_usage=True)
    for i in range(finish):  # byte by byte up to the last content: every byte out at once
        assert counter.feed(body[i : i + 1]) == body[i : i + 1]


def test_crlf_event_ends_and_single_byte_pieces() -> None:
    body = sse_chunks(1, "m", "a b", {"stream_options": {"include_usage": True}}).replace(b"\n", b"\r\n")
    counter = SseCounter("openai", hide_usage=True)
    out = replay(counter, [body[i : i + 1] for i in range(len(body))])
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\r\n\r\n")
    assert (counter.input_tokens, counter.output_tokens) == (7, 3)


def test_every_terminator_ends_an_event_whichever_comes_first() -> None:
    body = sse_chunks(1, "m", "a b c", {"stream_options": {"include_usage": True}})
    events = body.split(b"\n\n")[:-1]
    ends = [b"\r\r", b"\n\n", b"\r\n\r\n"]
    mixed = b"".join(e + ends[i % 3] for i, e in enumerate(events))
    rng = random.Random(7)
    for parts in ([mixed], *(split(mixed, rng) for _ in range(50))):
        counter = SseCounter("openai")
        assert replay(counter, parts) == mixed
        assert (counter.events, counter.input_tokens, counter.output_tokens) == (len(events) - 1, 7, 3)


def test_anthropic_input_from_message_start_and_the_last_cumulative_output() -> None:
    body = anthropic_events(1, "claude-x", "hello there")
    rng = random.Random(5)
    for _ in range(100):
        counter = SseCounter("anthropic", hide_usage=True)  # never hides anything on Anthropic
        assert replay(counter, split(body, rng)) == body
        assert (counter.input_tokens, counter.output_tokens, counter.model) == (7, 3, "claude-x")


def test_anthropic_cached_prompt_tokens_are_input_too() -> None:
    cached = {"cache_creation_input_tokens": 20, "cache_read_input_tokens": 100}
    start = {
        "type": "message_start",
        "message": {"model": "m", "usage": {"input_tokens": 5, "output_tokens": 1} | cached},
    }
    delta = {"type": "message_delta", "usage": {"output_tokens": 3}}
    body = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in (start, delta))
    counter = SseCounter("anthropic")
    replay(counter, [body])
    assert (counter.input_tokens, counter.output_tokens) == (125, 3)


def test_a_cut_stream_is_estimated_from_the_text_streamed() -> None:
    body = sse_chunks(1, "m", "alpha beta gamma delta", {})
    counter = SseCounter("openai")
    counter.feed(body[: body.index(b"gamma")])
    assert not counter.has_usage
    assert counter.estimated_output_tokens() > 0


@pytest.mark.parametrize("whole", [False, True], ids=["split", "one-chunk"])
@pytest.mark.parametrize("schema", ["openai", "anthropic"])
def test_a_cut_stream_counts_every_content_event_text_parsed_late_or_not(schema: str, whole: bool) -> None:
    # Text that looks like the markers a chunk is parsed on, escaped as JSON escapes it inside a string.
    text = 'say "usage": {1} and "finish_reason": "x" and "type": "message_delta" \u00e9 ok'
    words = [f"{w} " for w in text.split(" ")]
    body = sse_chunks(1, "m", "".join(words), {}) if schema == "openai" else anthropic_events(1, "m", "".join(words))
    cut = body.index(b"data: [DONE]") if schema == "openai" else body.index(b"event: message_delta")
    counter = SseCounter(schema)
    assert replay(counter, [body[:cut]] if whole else split(body[:cut], random.Random(3))) == body[:cut]
    assert counter.input_tokens is None or schema == "anthropic"
    assert counter.events > len(words)
    assert counter.estimated_output_tokens() == count_text("".join(words))


def test_rewrite_sets_the_model_and_asks_for_usage() -> None:
    new, request, asked = rewrite_request(
        json.dumps({"model": "dear", "stream": True, "stream_options": {"x": 1}}).encode(),
        model="cheap-2024",
        ask_usage=True,
    )
    assert new is not None and request is not None and not asked
    assert json.loads(new) == {"model": "cheap-2024", "stream": True, "stream_options": {"x": 1, "include_usage": True}}


def test_rewrite_leaves_a_body_alone_when_nothing_changes() -> None:
    body = json.dumps({"model": "m", "stream_options": {"include_usage": True}}).encode()
    assert rewrite_request(body, model="m", ask_usage=True)[::2] == (None, True)
    assert rewrite_request(b"not json", model="m", ask_usage=True) == (None, None, False)
    assert rewrite_request(b"[1]", model="m", ask_usage=False) == (None, None, False)
