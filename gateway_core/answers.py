"""What the gateway reads from a complete upstream answer: usage and the generated text."""

from __future__ import annotations

import json
import re
from typing import Any

from gateway_core.request import Framing, Route

_PROMPT_EVAL = re.compile(rb'"prompt_eval_count"\s*:\s*(\d+)')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')
# An upstream 400 message is passed on only when it cannot name a host, path or URL...
_SAFE_UPSTREAM_MESSAGE = re.compile(r"^[A-Za-z0-9 '\"._:,()\[\]-]{1,200}$")
# ...and names no address: no dotted numbers (IPs, host:port) and no "localhost".
_HOST_LIKE = re.compile(r"\d+\.\d+\.\d+|localhost|\.local\b|\.internal\b", re.IGNORECASE)


def safe_upstream_message(message: str | None) -> str | None:
    if isinstance(message, str) and _SAFE_UPSTREAM_MESSAGE.match(message) and not _HOST_LIKE.search(message):
        return message
    return None


def usage_of(route: Route, data: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a complete upstream JSON answer, or None when it has none."""
    if not isinstance(data, dict):
        return None
    if route.framing is Framing.OPENAI:
        usage = data.get("usage")
        if not isinstance(usage, dict):
            return None
        return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if route.path == "/api/embeddings":
        return None  # the legacy route reports no counts at all (reference §1.9)
    # Zero-valued counts are omitted upstream (omitempty), so absence means 0.
    return _count(data.get("prompt_eval_count")), _count(data.get("eval_count"))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def embedding_usage(route: Route, raw: bytes) -> tuple[int, int] | None:
    """Usage of an embeddings answer without parsing its vectors (they are most of the body and the
    gateway passes them through untouched). The counts follow the vectors, so search from the end;
    the object found is parsed as JSON, whatever its spacing."""
    if route.framing is Framing.OPENAI:
        at = raw.rfind(b'"usage"')
        found = _USAGE_OBJECT.match(raw, at) if at >= 0 else None
        if found is None:
            return None
        try:
            usage = json.loads(found.group(1))
        except ValueError:
            return None
        return _count(usage.get("prompt_tokens")), 0
    if route.path == "/api/embeddings":
        return None
    at = raw.rfind(b'"prompt_eval_count"')
    found = _PROMPT_EVAL.match(raw, at) if at >= 0 else None
    return (int(found.group(1)) if found else 0), 0


def answer_text(answer: Any) -> str:
    """The generated text of a complete answer (the same thing the stream relays collect)."""
    if not isinstance(answer, dict):
        return ""
    for choice in answer.get("choices") or []:
        if isinstance(choice, dict):
            text = (choice.get("message") or {}).get("content") or choice.get("text")
            if isinstance(text, str):
                return text
    message = answer.get("message")
    text = message.get("content") if isinstance(message, dict) else answer.get("response")
    return text if isinstance(text, str) else ""
