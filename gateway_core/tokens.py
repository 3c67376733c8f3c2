"""Token estimates for admission (SPEC §4.2, §6.2); settlement always uses Ollama's real counts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# About four characters a token for the Latin-script text most prompts carry; each chat message
# also costs a few template tokens. Overestimating slightly keeps budget overspend bounded.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def estimate_text(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _texts(content: Any) -> Iterable[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                yield part
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def estimate_messages(messages: Any) -> int:
    if not isinstance(messages, list):
        return 1
    total = 0
    for message in messages:
        if isinstance(message, dict):
            total += TOKENS_PER_MESSAGE + sum(estimate_text(t) for t in _texts(message.get("content")))
    return max(total, 1)


def estimate_inputs(*values: Any) -> int:
    """Prompt strings, or lists of them (generate, completions, embeddings)."""
    return max(sum(estimate_text(t) for v in values for t in _texts(v)), 1)


def estimate_chunks(chunks: int) -> int:
    """Completion tokens of a stream cut short: one relayed chunk is about one token (SPEC §6.2)."""
    return max(chunks, 0)
