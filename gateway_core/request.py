"""The caller's body, parsed once and validated strictly before admission (SPEC §3.5, §4.9).

Ollama decodes bodies with Go's encoding/json: keys bind case-insensitively under Unicode folding
and the last duplicate wins. Every decision the gateway takes (model, stream, caps, stripped
options) must be the one Ollama sees, so two keys that fold equal, or a look-alike spelling of a
field the gateway reads or controls, are refused rather than guessed about.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from attrs import frozen

from gateway_core.errors import InvalidRequest
from gateway_core.models import Scope
from gateway_core.request_fields import (
    FIELD_TYPES,
    FORWARDED_OPTIONS,
    MESSAGE_TYPES,
    OPTION_TYPES,
    TYPED_FIELDS,
    FieldType,
    mistyped,
)
from gateway_core.tokens import estimate_inputs, estimate_messages

MAX_DEPTH = 64


class Framing(enum.Enum):
    OPENAI = "openai"  # /v1: JSON, or SSE when stream is true (default false)
    NATIVE = "native"  # /api: NDJSON when stream is true (default true), or one JSON


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


# Runner-level options reload the model for everyone when they change (reference §1.10), and
# keep_alive / _debug_render_only control the shared server; callers do not get to set them.
RUNNER_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread",
                            "draft_num_predict", "low_vram", "f16_kv", "vocab_only", "use_mlock", "numa"})
_SERVER_CONTROLS = ("keep_alive", "_debug_render_only")
# Fields the gateway decides about or reads (for estimates and the prompt log): only their exact
# spelling is accepted, so what the gateway judged is what Ollama binds.
_CONTROLLED = frozenset({"model", "stream", "stream_options", "options", "keep_alive", "max_tokens",
                         "max_completion_tokens", "num_predict", "_debug_render_only", "messages",
                         "prompt", "input", "suffix", "system"}) | RUNNER_OPTIONS | TYPED_FIELDS
_CONTROLLED_OPTIONS = frozenset({"num_predict"}) | RUNNER_OPTIONS
_MESSAGE_FIELDS = frozenset({"role", "content"})
# A message whose keys are all among these exact spellings cannot hold a folded twin: the common
# case skips the per-key check.
_PLAIN_MESSAGE_KEYS = frozenset({"role", "content", "images", "name", "tool_calls", "tool_call_id",
                                 "tool_name", "thinking"})


def fold(key: str) -> str:
    if key.isascii():
        return key.lower()  # the same result for ASCII, without three passes
    return _unicode_fold(key)


def _unicode_fold(key: str) -> str:
    """Go's per-rune ToUpper(ToLower(r)), then Python's full case folding: every pair Go binds
    as equal (long s→S, Kelvin sign→K) folds equal here, and a little more (ß/ss), which only refuses."""
    return key.lower().upper().casefold()


_CONTROLLED_FOLDED = {fold(k): k for k in _CONTROLLED}
_OPTIONS_FOLDED = {fold(k): k for k in _CONTROLLED_OPTIONS}
_MESSAGE_FOLDED = {fold(k): k for k in _MESSAGE_FIELDS}


@frozen
class Route:
    path: str
    scope: Scope
    framing: Framing
    kind: Kind


ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route("/v1/chat/completions", Scope.CHAT, Framing.OPENAI, Kind.CHAT),
    "/v1/completions": Route("/v1/completions", Scope.CHAT, Framing.OPENAI, Kind.COMPLETION),
    "/v1/embeddings": Route("/v1/embeddings", Scope.EMBEDDINGS, Framing.OPENAI, Kind.EMBEDDING),
    "/api/chat": Route("/api/chat", Scope.CHAT, Framing.NATIVE, Kind.CHAT),
    "/api/generate": Route("/api/generate", Scope.CHAT, Framing.NATIVE, Kind.COMPLETION),
    "/api/embed": Route("/api/embed", Scope.EMBEDDINGS, Framing.NATIVE, Kind.EMBEDDING),
    "/api/embeddings": Route("/api/embeddings", Scope.EMBEDDINGS, Framing.NATIVE, Kind.EMBEDDING),
}


@frozen
class CallerRequest:
    """One validated caller request. `body` is the parsed object; it is never mutated."""

    route: Route
    model: str
    stream: bool
    cap: int | None  # the caller's own completion cap; None: uncapped (the reserve applies)
    prompt_estimate: int
    wants_usage: bool  # /v1 streams: the caller asked for the usage chunk
    body: dict[str, Any]

    def prompt_text(self) -> str:
        """What the caller sent, as they wrote it: plain text stays text, structures stay readable."""
        b = self.body
        prompt = b.get("messages") or b.get("prompt") or b.get("input") or ""
        return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)

    def upstream_body(self, model: str, budget_cap: int | None) -> bytes:
        """The request the gateway itself sends; *budget_cap* is the budget's completion limit."""
        out = dict(self.body)
        out["model"] = model
        for name in _SERVER_CONTROLS:
            out.pop(name, None)
        route = self.route
        cap = _binding_cap(self.cap, budget_cap)
        if route.framing is Framing.OPENAI:
            if route.kind is not Kind.EMBEDDING:
                # Ollama ignores max_completion_tokens (reference §2.1): the binding cap goes in max_tokens.
                out.pop("max_completion_tokens", None)
                out.pop("max_tokens", None)
                if cap is not None:
                    out["max_tokens"] = cap
                out["stream"] = self.stream
                if self.stream:
                    out["stream_options"] = {"include_usage": True}
                else:
                    out.pop("stream_options", None)
        else:
            # Only the documented per-request options go on: runner options would reload the model
            # for everyone, and an unknown key may be one in some backend build.
            options = {k: v for k, v in (out.get("options") or {}).items() if k in FORWARDED_OPTIONS}
            options.pop("num_predict", None)  # embeddings generate nothing: no cap to send
            if route.kind is not Kind.EMBEDDING:
                if cap is not None:
                    options["num_predict"] = cap
                out["stream"] = self.stream
            if options:
                out["options"] = options
            else:
                out.pop("options", None)
        return json.dumps(out, separators=(",", ":"), allow_nan=False).encode()


def _binding_cap(caller: int | None, budget: int | None) -> int | None:
    """Never below 1 (Ollama reads 0 as "no limit"); within 1..what the budget left."""
    caps = [c for c in (caller, budget) if c is not None]
    return max(min(caps), 1) if caps else None


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"The request body contains a non-finite number ({name}).")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidRequest("The request body contains a number too large to represent.")
    return value


def decode(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, finite numbers only, no nesting deeper than MAX_DEPTH."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8.") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise InvalidRequest(f"The request body is nested deeper than {MAX_DEPTH} levels.") from None
    except ValueError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if type(data) is dict or type(data) is list:  # a bare null, number or string has no depth
        _check_depth(data)
    return data


def _check_depth(data: Any) -> None:
    # Iterative, descending only into containers: json.loads has already paid for the values.
    if type(data) is not dict and type(data) is not list:
        return  # a scalar: refused as "not an object" by the caller of decode
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"The request body is nested deeper than {MAX_DEPTH} levels.")
        for value in node.values() if type(node) is dict else node:
            kind = type(value)
            if kind is dict or kind is list:
                stack.append((value, depth + 1))


def _check_keys(obj: dict[str, Any], controlled: dict[str, str], where: str) -> None:
    seen: dict[str, str] = {}
    for key in obj:
        folded = fold(key)
        other = seen.get(folded)
        if other is not None:
            raise InvalidRequest(f"The keys '{other}' and '{key}'{where} differ only in case; send one.",
                                 param=key)
        seen[folded] = key
        exact = controlled.get(folded)
        if exact is not None and exact != key:
            raise InvalidRequest(f"Unknown key '{key}'{where}; the field is spelled '{exact}'.", param=key)


def _check_types(obj: dict[str, Any], types: dict[str, FieldType], prefix: str) -> None:
    found = mistyped(obj, types)
    if found is not None:
        name, expected = found
        raise InvalidRequest(f"'{prefix}{name}' must be {expected.described}.", param=prefix + name)


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be a whole number of tokens.", param=name)
    return value


def _caller_cap(route: Route, body: dict[str, Any], options: dict[str, Any] | None) -> int | None:
    if route.kind is Kind.EMBEDDING:
        return None
    if route.framing is Framing.OPENAI:
        caps = []
        for name in ("max_completion_tokens", "max_tokens"):
            value = body.get(name)
            if value is not None:
                if _whole(value, name) < 1:
                    raise InvalidRequest(f"'{name}' must be at least 1.", param=name)
                caps.append(value)
        return min(caps) if caps else None
    value = (options or {}).get("num_predict")
    if value is None:
        return None
    name = "options.num_predict"
    cap = _whole(value, name)
    if cap in (-1, -2):
        return None  # Ollama's "uncapped" values: the reserve applies and a budget caps it
    if cap < 1:
        raise InvalidRequest(f"'{name}' must be at least 1, or -1 / -2 for no limit.", param=name)
    return cap


def _estimate(route: Route, body: dict[str, Any]) -> int:
    if route.kind is Kind.CHAT:
        return estimate_messages(body.get("messages"))
    if route.kind is Kind.COMPLETION:
        if route.framing is Framing.OPENAI:
            return estimate_inputs(body.get("prompt"), body.get("suffix"))
        return estimate_inputs(body.get("prompt"), body.get("system"), body.get("suffix"))
    if route.framing is Framing.OPENAI:
        return estimate_inputs(body.get("input"))
    return estimate_inputs(body.get("input"), body.get("prompt"))


def parse_request(route: Route, raw: bytes) -> CallerRequest:
    """Every §3.5 check; raises InvalidRequest naming the offending key."""
    body = decode(raw)
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _check_keys(body, _CONTROLLED_FOLDED, "")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required.", param="model")
    options = body.get("options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("'options' must be an object.", param="options")
        _check_keys(options, _OPTIONS_FOLDED, " in 'options'")
    _check_types(body, FIELD_TYPES[route.path], "")
    if options is not None:
        _check_types(options, OPTION_TYPES, "options.")
    messages = body.get("messages")
    if isinstance(messages, list):
        typed = MESSAGE_TYPES[route.framing.value] if route.kind is Kind.CHAT else None
        for index, message in enumerate(messages):
            if type(message) is dict:
                if not _PLAIN_MESSAGE_KEYS.issuperset(message):
                    _check_keys(message, _MESSAGE_FOLDED, " in a message")
                if typed is not None:
                    _check_types(message, typed, f"messages[{index}].")
    stream = False
    if route.kind is not Kind.EMBEDDING:
        stream_value = body.get("stream")
        if stream_value is None:
            stream = route.framing is Framing.NATIVE
        elif isinstance(stream_value, bool):
            stream = stream_value
        else:
            raise InvalidRequest("'stream' must be true or false.", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    wants_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    return CallerRequest(route=route, model=model, stream=stream, cap=_caller_cap(route, body, options),
                         prompt_estimate=_estimate(route, body), wants_usage=wants_usage, body=body)
