"""Caller JSON ⇄ upstream JSON for each inference route (SPEC §3.2, §4.9; reference §1, §2, §4)."""

from __future__ import annotations

import enum
import json
import re
from typing import Any

from attrs import frozen

from gateway_core.errors import InvalidRequest
from gateway_core.models import Scope
from gateway_core.tokens import estimate_inputs, estimate_messages


class Framing(enum.Enum):
    OPENAI = "openai"  # /v1: JSON, or SSE when stream is true (default false)
    NATIVE = "native"  # /api: NDJSON when stream is true (default true), or one JSON


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


# Runner-level options reload the model for everyone when they change (reference §1.10), and
# keep_alive / _debug_render_only control the shared server; callers do not get to set them.
_RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread",
                   "draft_num_predict")
_SERVER_CONTROLS = ("keep_alive", "_debug_render_only")


@frozen
class Operation:
    path: str
    scope: Scope
    framing: Framing
    kind: Kind

    def wants_stream(self, body: dict[str, Any]) -> bool:
        if self.kind is Kind.EMBEDDING:
            return False
        stream = body.get("stream", self.framing is Framing.NATIVE)
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be true or false.", param="stream")
        return stream

    def estimate_prompt(self, body: dict[str, Any]) -> int:
        if self.framing is Framing.OPENAI:
            if self.kind is Kind.CHAT:
                return estimate_messages(body.get("messages"))
            if self.kind is Kind.COMPLETION:
                return estimate_inputs(body.get("prompt"), body.get("suffix"))
            return estimate_inputs(body.get("input"))
        if self.kind is Kind.CHAT:
            return estimate_messages(body.get("messages"))
        if self.kind is Kind.COMPLETION:
            return estimate_inputs(body.get("prompt"), body.get("system"), body.get("suffix"))
        return estimate_inputs(body.get("input"), body.get("prompt"))

    def completion_allowance(self, body: dict[str, Any]) -> int | None:
        """The caller's own completion cap, or None when it left generation uncapped."""
        if self.kind is Kind.EMBEDDING:
            return 0
        if self.framing is Framing.OPENAI:
            for name in ("max_completion_tokens", "max_tokens"):
                value = body.get(name)
                if value is not None:
                    return _count(value, name)
            return None
        options = body.get("options")
        if isinstance(options, dict) and options.get("num_predict") is not None:
            value = _count(options["num_predict"], "options.num_predict", allow_negative=True)
            return None if value < 0 else value
        return None

    def upstream_body(self, body: dict[str, Any], model: str, stream: bool,
                      cap: int | None) -> dict[str, Any]:
        """The request the gateway itself sends; `cap` is the completion limit to enforce."""
        out = dict(body)
        out["model"] = model
        for name in _SERVER_CONTROLS:
            out.pop(name, None)
        if self.framing is Framing.OPENAI:
            if self.kind is not Kind.EMBEDDING:
                # Ollama ignores max_completion_tokens (reference §2.1): translate it.
                asked = out.pop("max_completion_tokens", None)
                if asked is not None and out.get("max_tokens") is None:
                    out["max_tokens"] = asked
                if cap is not None:
                    out["max_tokens"] = min(cap, out.get("max_tokens") or cap)
                out["stream"] = stream
                if stream:
                    out["stream_options"] = {"include_usage": True}
                else:
                    out.pop("stream_options", None)
            return out
        options = out.get("options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("'options' must be an object.", param="options")
        options = {k: v for k, v in (options or {}).items() if k not in _RUNNER_OPTIONS}
        if cap is not None and self.kind is not Kind.EMBEDDING:
            current = options.get("num_predict")
            options["num_predict"] = cap if current is None or current < 0 else min(cap, current)
        if options:
            out["options"] = options
        else:
            out.pop("options", None)
        if self.kind is not Kind.EMBEDDING:
            out["stream"] = stream
        return out


def _count(value: Any, name: str, allow_negative: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and not allow_negative):
        raise InvalidRequest(f"'{name}' must be a whole number of tokens.", param=name)
    return value


OPERATIONS: dict[str, Operation] = {
    "/v1/chat/completions": Operation("/v1/chat/completions", Scope.CHAT, Framing.OPENAI, Kind.CHAT),
    "/v1/completions": Operation("/v1/completions", Scope.CHAT, Framing.OPENAI, Kind.COMPLETION),
    "/v1/embeddings": Operation("/v1/embeddings", Scope.EMBEDDINGS, Framing.OPENAI, Kind.EMBEDDING),
    "/api/chat": Operation("/api/chat", Scope.CHAT, Framing.NATIVE, Kind.CHAT),
    "/api/generate": Operation("/api/generate", Scope.CHAT, Framing.NATIVE, Kind.COMPLETION),
    "/api/embed": Operation("/api/embed", Scope.EMBEDDINGS, Framing.NATIVE, Kind.EMBEDDING),
    "/api/embeddings": Operation("/api/embeddings", Scope.EMBEDDINGS, Framing.NATIVE, Kind.EMBEDDING),
}


def usage_of(op: Operation, data: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a complete upstream JSON answer, or None when it has none."""
    if not isinstance(data, dict):
        return None
    if op.framing is Framing.OPENAI:
        usage = data.get("usage")
        if not isinstance(usage, dict):
            return None
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    if op.path == "/api/embeddings":
        return None  # the legacy route reports no counts at all (reference §1.9)
    # Zero-valued counts are omitted upstream (omitempty), so absence means 0.
    return int(data.get("prompt_eval_count") or 0), int(data.get("eval_count") or 0)


_PROMPT_EVAL = re.compile(rb'"prompt_eval_count":\s*(\d+)')
_USAGE_OBJECT = re.compile(rb'"usage":\s*(\{[^{}]*\})')


def embedding_usage(op: Operation, raw: bytes) -> tuple[int, int] | None:
    """Usage of an embeddings answer without parsing its vectors (they are most of the body and the
    gateway passes them through untouched). The counts follow the vectors, so search from the end."""
    if op.framing is Framing.OPENAI:
        at = raw.rfind(b'"usage"')
        found = _USAGE_OBJECT.match(raw, at) if at >= 0 else None
        if found is None:
            return None
        usage = json.loads(found.group(1))
        return int(usage.get("prompt_tokens") or 0), 0
    if op.path == "/api/embeddings":
        return None
    at = raw.rfind(b'"prompt_eval_count"')
    found = _PROMPT_EVAL.match(raw, at) if at >= 0 else None
    return (int(found.group(1)) if found else 0), 0
