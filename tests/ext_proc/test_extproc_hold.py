"""The first-token gate of hedged streams (ext_proc/hold.py), without Envoy (tests/behaviour/test_hedging.py runs
it through Envoy)."""

from __future__ import annotations

import random

import pytest

from ext_proc.hold import FirstToken
from meshgen.lab.answers import anthropic_events, sse_chunks

OPENING_OPENAI = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
OPENING_ANTHROPIC = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":7}}}\n\n'


@pytest.mark.parametrize(
    "body",
    [sse_chunks(1, "m", "one two", {}), anthropic_events(1, "m", "one two")],
    ids=["openai", "anthropic"],
)
def test_the_first_token_is_seen_wherever_the_chunks_split(body: bytes) -> None:
    rng = random.Random(3)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(body)), 12))
        gate = FirstToken()
        seen_at = next(
            (i for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(body)], strict=True)) if gate.feed(body[a:b])),
            None,
        )
        assert seen_at is not None and gate.seen


@pytest.mark.parametrize("opening", [OPENING_OPENAI, OPENING_ANTHROPIC, b": keep-alive\n\n", b"data: [DONE]\n\n"])
def test_an_event_before_the_first_token_does_not_release_the_hold(opening: bytes) -> None:
    gate = FirstToken()
    assert not gate.feed(opening)
    assert gate.feed(b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')
