"""A faithful fake of an Ollama server (v0.33.0-rc2) for tests and local development.

It speaks the native API (``/api/*``) and Ollama's OpenAI-compatible layer (``/v1/*``) with the wire
shapes, status codes and streaming framing of Ollama v0.33.0-rc2 (its ``docs/api.md`` and
``docs/api/openai-compatibility.mdx``).  Generated text is deterministic: output token
``i`` is ``"word{i} "`` (one token per streamed chunk), and prompt token counts come from
:func:`count_chat_prompt_tokens` / :func:`count_generate_prompt_tokens` / :func:`count_embed_tokens`,
so tests can compute the exact numbers the fake reports.

In-process use::

    async with FakeOllama(models=["llama3.1:8b"]) as fake:
        ...  # talk to fake.url; inspect fake.requests; set fake.fail_mode = "500"; fake.reset()

Out-of-process use: ``python -m tests.fake_ollama --port 11434 --fast`` and drive it over HTTP through
``GET /_fake/requests``, ``GET|POST /_fake/config`` and ``POST /_fake/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import contextvars
import hashlib
import ipaddress
import json
import math
import random
import re
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

from aiohttp import web

__all__ = [
    "DEFAULT_MODELS",
    "FAIL_MODES",
    "MEMORY_ERROR",
    "OLLAMA_VERSION",
    "RUNNER_ERROR",
    "FakeOllama",
    "completion_text",
    "count_chat_prompt_tokens",
    "count_embed_tokens",
    "count_generate_prompt_tokens",
    "count_text_tokens",
    "embedding_dimension",
    "host_allowed",
    "main",
    "normalize_model_name",
]

OLLAMA_VERSION: Final = "0.33.0-rc2"
DEFAULT_MODELS: Final[tuple[str, ...]] = ("llama3.1:8b", "qwen3:8b", "nomic-embed-text:latest")
FAIL_MODES: Final[frozenset[str | None]] = frozenset(
    {None, "500", "refuse", "midstream", "hang", "reset_conn"}
)
RUNNER_ERROR: Final = (
    "model runner has unexpectedly stopped, this may be due to resource limitations or an internal error, "
    "check ollama server logs for details"
)
# What Ollama answers (500) when a model does not fit in the machine's memory.
MEMORY_ERROR: Final = "model requires more system memory (17.3 GiB) than is available (9.8 GiB)"
EMBED_CONTEXT_TOKENS: Final = 2048  # context length used for embedding truncation
KEEP_ALIVE_S: Final = 300.0  # default keep_alive (5m), only used for /api/ps

_DEFAULT_REGISTRY: Final = "registry.ollama.ai"
_BASE_MTIME: Final = 1_785_574_353.0  # 2026-08-01T08:52:33Z; model i is modified i hours earlier
_CLIENT_MAX_SIZE: Final = 256 * 1024 * 1024
_JSON_CT: Final = "application/json; charset=utf-8"
_TEXT_CT: Final = "text/plain; charset=utf-8"
_MODEL_API_PATHS: Final = frozenset(
    {"/api/tags", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings"}
)
_INT_OPTIONS: Final = frozenset(
    {
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "draft_num_predict",
    }
)
_FLOAT_OPTIONS: Final = frozenset(
    {
        "top_p",
        "min_p",
        "typical_p",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
    }
)
_BOOL_OPTIONS: Final = frozenset({"use_mmap", "numa"})
_ZERO_USAGE: Final = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
_DONE_FRAME: Final = b"data: [DONE]\n\n"
_NOT_FOUND_TEXT: Final = b"404 page not found"
_NOT_ALLOWED_TEXT: Final = b"405 method not allowed"
_ROOT_TEXT: Final = b"Ollama is running"


# --------------------------------------------------------------------------------------------------
# Deterministic "model" behaviour (public so tests can compute expected values)
# --------------------------------------------------------------------------------------------------


def count_text_tokens(text: str) -> int:
    """Fake tokenizer: one token per 4 characters, rounded up (0 for the empty string)."""
    return (len(text) + 3) // 4


def count_chat_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """prompt_eval_count for a chat: 4 tokens of template overhead per message + its text; at least 1."""
    total = 0
    for message in messages:
        content = message.get("content")
        total += 4 + count_text_tokens(content if isinstance(content, str) else "")
    return max(total, 1)


def count_generate_prompt_tokens(prompt: str, system: str = "", suffix: str = "") -> int:
    """prompt_eval_count for /api/generate and /v1/completions."""
    total = 4 + count_text_tokens(prompt) + count_text_tokens(suffix)
    if system:
        total += 4 + count_text_tokens(system)
    return total


def count_embed_tokens(text: str) -> int:
    """Tokens for one embedding input before truncation (at least 1)."""
    return max(1, count_text_tokens(text))


def completion_text(n_tokens: int) -> str:
    """The text the fake generates for ``n_tokens`` output tokens."""
    return "".join(f"word{i} " for i in range(n_tokens))


_TOKEN_BYTES: list[bytes] = []


def _token_bytes(index: int) -> bytes:
    while len(_TOKEN_BYTES) <= index:
        _TOKEN_BYTES.append(f"word{len(_TOKEN_BYTES)} ".encode())
    return _TOKEN_BYTES[index]


def embedding_dimension(model: str) -> int:
    """Vector length the fake uses for ``model``."""
    base = _name_parts(model)[2].lower()
    if base.startswith("all-minilm"):
        return 384
    if base.startswith(("mxbai-embed", "bge-m3", "bge-large", "snowflake-arctic-embed")):
        return 1024
    return 768


@lru_cache(maxsize=4096)
def _raw_embedding(text: str, dim: int) -> tuple[float, ...]:
    digest = hashlib.shake_256(text.encode()).digest(2 * dim)
    return tuple(v / 32768.0 for v in struct.unpack(f"<{dim}h", digest))


@lru_cache(maxsize=4096)
def _unit_embedding(text: str, dim: int, dimensions: int) -> tuple[float, ...]:
    vec = _raw_embedding(text, dim)
    if 0 < dimensions < dim:
        vec = vec[:dimensions]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return tuple(v / norm for v in vec)


def _context_ids(n: int) -> list[int]:
    return [(128_000 + 7919 * i) % 128_256 for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Names, model metadata, Host check
# --------------------------------------------------------------------------------------------------


def _name_parts(name: str) -> tuple[str, str, str, str]:
    """Split ``[host/][namespace/]model[:tag]`` into (host, namespace, model, tag) with Ollama's defaults."""
    rest = name.strip()
    tag = ""
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
    segments = rest.split("/")
    host, namespace = _DEFAULT_REGISTRY, "library"
    if len(segments) >= 3:
        host, namespace, model = segments[0], "/".join(segments[1:-1]), segments[-1]
    elif len(segments) == 2:
        namespace, model = segments
    else:
        model = segments[0]
    return host, namespace, model, tag or "latest"


@lru_cache(maxsize=1024)
def normalize_model_name(name: str) -> str:
    """Canonical, case-insensitive form used for matching (``llama3`` == ``library/LLAMA3:latest``)."""
    host, namespace, model, tag = _name_parts(name)
    return f"{host}/{namespace}/{model}:{tag}".lower()


def _display_name(name: str) -> str:
    name = name.strip()
    return name if name.rfind(":") > name.rfind("/") else f"{name}:latest"


def _is_embedding_model(name: str) -> bool:
    base = _name_parts(name)[2].lower()
    return "embed" in base or base.startswith(("all-minilm", "bge-", "paraphrase-multilingual"))


_KNOWN_MODELS: Final[dict[str, tuple[str, str, str, int]]] = {
    # base name: (family, parameter_size, quantization_level, size on disk)
    "llama3.1": ("llama", "8.0B", "Q4_K_M", 4_920_753_328),
    "llama3.2": ("llama", "3.2B", "Q4_K_M", 2_019_393_189),
    "llama3": ("llama", "8.0B", "Q4_0", 4_661_224_676),
    "qwen3": ("qwen3", "8.2B", "Q4_K_M", 5_225_388_164),
    "qwen2.5": ("qwen2", "7.6B", "Q4_K_M", 4_683_087_332),
    "mistral": ("llama", "7.2B", "Q4_0", 4_113_301_824),
    "gemma3": ("gemma3", "4.3B", "Q4_K_M", 3_338_801_804),
    "nomic-embed-text": ("nomic-bert", "137M", "F16", 274_302_450),
    "mxbai-embed-large": ("bert", "334M", "F16", 669_615_493),
    "all-minilm": ("bert", "23M", "F16", 45_960_996),
}
_PARAM_TAG = re.compile(r"(\d+(?:\.\d+)?)([bm])\b")


@lru_cache(maxsize=1024)
def _static_model_info(display: str) -> tuple[str, int, dict[str, Any], list[str], float]:
    """(digest, size, details, capabilities, mtime fraction) for a model name."""
    digest = hashlib.sha256(normalize_model_name(display).encode()).hexdigest()
    base, tag = _name_parts(display)[2].lower(), _name_parts(display)[3].lower()
    known = _KNOWN_MODELS.get(base)
    if known is not None:
        family, params, quant, size = known
    else:
        family = re.sub(r"[\d.:-]+$", "", base) or base
        match = _PARAM_TAG.search(tag)
        params = f"{float(match.group(1)):.1f}{match.group(2).upper()}" if match else "7.6B"
        quant = "F16" if _is_embedding_model(display) else "Q4_K_M"
        size = 1_000_000_000 + int(digest[:8], 16) % 4_000_000_000
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": params,
        "quantization_level": quant,
    }
    capabilities = ["embedding"] if _is_embedding_model(display) else ["completion"]
    return digest, size, details, capabilities, int(digest[8:14], 16) % 1_000_000 / 1_000_000


def _rfc3339_utc(ns: int | None = None) -> str:
    """RFC 3339 with nanoseconds in UTC, trailing zeros trimmed like Go's RFC3339Nano."""
    secs, frac = divmod(time.time_ns() if ns is None else ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{base}.{frac:09d}".rstrip("0") + "Z" if frac else base + "Z"


def _rfc3339_local(ts: float) -> str:
    text = datetime.fromtimestamp(ts).astimezone().isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


_GO_PRIVATE_NETS: Final = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("fc00::/7"),
)


@lru_cache(maxsize=256)
def host_allowed(host_header: str, machine_hostname: str | None = None) -> bool:
    """Ollama's Host-header rule for a loopback-bound server (reference §1.1).

    Allowed: empty, an IP literal that is loopback/private/unspecified (optionally with a port,
    IPv6 in brackets), ``localhost``, the machine's hostname, or a name ending in ``.localhost``,
    ``.local`` or ``.internal``.
    """
    host = host_header.strip()
    if host.startswith("["):
        end = host.find("]")
        if end != -1:
            host = host[1:end]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.lower()
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.is_loopback or addr.is_unspecified or any(addr in net for net in _GO_PRIVATE_NETS):
            return True
    if host in ("", "localhost"):
        return True
    hostname = (machine_hostname if machine_hostname is not None else socket.gethostname()).lower()
    if hostname and host == hostname:
        return True
    return host.endswith((".localhost", ".local", ".internal"))


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------
# Request binding (Go-like validation) and response helpers
# --------------------------------------------------------------------------------------------------


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_INVALID_JSON: Final = object()

# field spec: (kind, go type name); kinds: string, bool, int, number, array, object
_FieldSpec = dict[str, tuple[str, str]]
_STR: Final = ("string", "string")
_BOOL: Final = ("bool", "bool")
_INT: Final = ("int", "int")
_OBJ: Final = ("object", "map[string]interface {}")
_ARR: Final = ("array", "[]interface {}")

_CHAT_FIELDS: Final[_FieldSpec] = {
    "model": _STR,
    "messages": ("array", "[]api.Message"),
    "stream": _BOOL,
    "options": _OBJ,
    "tools": ("array", "api.Tools"),
}
_GENERATE_FIELDS: Final[_FieldSpec] = {
    "model": _STR,
    "prompt": _STR,
    "suffix": _STR,
    "system": _STR,
    "template": _STR,
    "raw": _BOOL,
    "stream": _BOOL,
    "options": _OBJ,
    "context": ("array", "[]int"),
}
_EMBED_FIELDS: Final[_FieldSpec] = {"model": _STR, "truncate": _BOOL, "dimensions": _INT, "options": _OBJ}
_EMBEDDINGS_FIELDS: Final[_FieldSpec] = {"model": _STR, "prompt": _STR, "options": _OBJ}
_V1_CHAT_FIELDS: Final[_FieldSpec] = {
    "model": _STR,
    "messages": ("array", "[]openai.Message"),
    "stream": _BOOL,
    "stream_options": ("object", "openai.StreamOptions"),
    "max_tokens": _INT,
    "tools": ("array", "[]api.Tool"),
    "reasoning_effort": _STR,
    "reasoning": ("object", "openai.Reasoning"),
}
_V1_COMPLETION_FIELDS: Final[_FieldSpec] = {
    "model": _STR,
    "prompt": _STR,
    "stream": _BOOL,
    "stream_options": ("object", "openai.StreamOptions"),
    "max_tokens": _INT,
    "suffix": _STR,
}
_V1_EMBED_FIELDS: Final[_FieldSpec] = {"model": _STR, "dimensions": _INT, "encoding_format": _STR}
_MODEL_FIELDS: Final[_FieldSpec] = {"model": _STR, "name": _STR}
_COPY_FIELDS: Final[_FieldSpec] = {"source": _STR, "destination": _STR}


def _go_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _kind_ok(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, dict)


def _bind(
    parsed: Any, raw: bytes, go_type: str, fields: _FieldSpec, *, openai: bool = False
) -> dict[str, Any]:
    """Mimic gin's ShouldBindJSON: empty body, syntax errors and type mismatches are 400s."""
    if not raw.strip():
        raise _ApiError(400, "EOF" if openai else "missing request body")
    if parsed is _INVALID_JSON:
        raise _ApiError(400, "invalid character in JSON request body")
    if not isinstance(parsed, dict):
        raise _ApiError(400, f"json: cannot unmarshal {_go_kind(parsed)} into Go value of type {go_type}")
    for name, (kind, go_name) in fields.items():
        value = parsed.get(name)
        if value is not None and not _kind_ok(kind, value):
            got = _go_kind(value)
            if got == "number" and kind == "int":
                got = f"number {value}"
            raise _ApiError(
                400, f"json: cannot unmarshal {got} into Go struct field {go_type}.{name} of type {go_name}"
            )
    return parsed


def _check_options(options: Mapping[str, Any]) -> None:
    """Wrong option value types surface as 500 in Ollama (reference §1.10)."""
    for key, value in options.items():
        if value is None:
            continue
        if key in _INT_OPTIONS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _ApiError(500, f'option "{key}" must be of type integer')
        if key in _FLOAT_OPTIONS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _ApiError(500, f'option "{key}" must be of type float32')
        if key in _BOOL_OPTIONS and not isinstance(value, bool):
            raise _ApiError(500, f'option "{key}" must be of type boolean')
        if key == "stop" and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise _ApiError(500, f'option "{key}" must be of type array of strings')


def _check_format(value: Any) -> None:
    """Ollama's runner accepts "json", a schema object, or "" / null; anything else fails the completion,
    which the handler reports as a 500 (before any byte, so also for a stream)."""
    if value is None or value in ("", "json") or isinstance(value, dict):
        return
    shown = json.dumps(json.dumps(value, separators=(",", ":")))  # Go's %q of the raw JSON
    raise _ApiError(500, f'invalid format: {shown}; expected "json" or a valid JSON Schema object')


# Set per request from FakeOllama.spaced_json: write `"key": value` with spaces, as Ollama-compatible
# servers and re-serializing proxies (Python's json.dumps defaults) do. Same JSON, other bytes.
_SPACED: contextvars.ContextVar[bool] = contextvars.ContextVar("fake_ollama_spaced", default=False)


def _dumps(obj: Any) -> bytes:
    separators = (", ", ": ") if _SPACED.get() else (",", ":")
    return json.dumps(obj, separators=separators, ensure_ascii=False).encode()


def _respace(data: bytes) -> bytes:
    """The same NDJSON lines / SSE frames, re-serialized with spaces (spaced_json mode)."""
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            line = b"data: " + _dumps(json.loads(line[6:]))
        elif line.startswith(b"{"):
            line = _dumps(json.loads(line))
        out.append(line)
    return b"\n".join(out)


class _RespacingResponse(web.StreamResponse):
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await super().write(_respace(bytes(data)) if _SPACED.get() else data)


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), headers={"Content-Type": _JSON_CT})


def _text_response(body: bytes, status: int, content_type: str = "text/plain") -> web.Response:
    return web.Response(status=status, body=body, headers={"Content-Type": content_type})


def _native_error(err: _ApiError) -> web.Response:
    return _json_response({"error": err.message}, err.status)


def _openai_error(err: _ApiError) -> web.Response:
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(err.status, "api_error")
    body = {"error": {"message": err.message, "type": etype, "param": None, "code": None}}
    return _json_response(body, err.status)


def _quote(name: str) -> str:
    """Go's %q for a model name."""
    return json.dumps(name, ensure_ascii=False)


def _is_unload(keep_alive: Any) -> bool:
    if isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, int | float):
        return keep_alive == 0
    return isinstance(keep_alive, str) and keep_alive.strip() in ("0", "0s", "0m", "0h", "0ms")


def _midstream_count(n: int) -> int:
    """How many tokens the "midstream" fail mode emits before the error."""
    return max(1, n // 2) if n else 0


class _Ctx:
    """Per-request state handed to route handlers."""

    __slots__ = ("entry", "param", "parsed", "raw", "request", "resp", "t_start")

    def __init__(self, request: web.BaseRequest, raw: bytes, parsed: Any, entry: dict[str, Any]) -> None:
        self.request = request
        self.raw = raw
        self.parsed = parsed
        self.entry = entry
        self.param = ""
        self.resp: web.StreamResponse | None = None
        self.t_start = time.monotonic_ns()


_Handler = Callable[[_Ctx], Awaitable[web.StreamResponse]]


# --------------------------------------------------------------------------------------------------
# The fake server
# --------------------------------------------------------------------------------------------------


class FakeOllama:
    """An in-process fake Ollama HTTP server with controls for tests (see module docstring)."""

    def __init__(
        self,
        models: Iterable[str] | None = None,
        *,
        token_delay_s: float = 0.0,
        latency_s: float = 0.0,
        completion_tokens: int = 12,
        host_check: bool | None = None,
        max_log_entries: int = 100_000,
        coalesce: bool = False,
        spaced_json: bool = False,
    ) -> None:
        self._initial = (
            list(DEFAULT_MODELS if models is None else models),
            float(token_delay_s),
            float(latency_s),
            int(completion_tokens),
        )
        self.models: list[str] = list(self._initial[0])
        self.token_delay_s: float = self._initial[1]
        self.latency_s: float = self._initial[2]
        self.completion_tokens: int = self._initial[3]
        self.host_check: bool | None = host_check  # None: on when bound to a loopback address (like Ollama)
        self.max_log_entries: int = max_log_entries
        # With token_delay_s == 0, write a whole stream in one write() instead of one per token
        # (same bytes, fewer syscalls; Ollama itself flushes per token).
        self.coalesce: bool = coalesce
        # Write every JSON answer and stream chunk with spaces after colons and commas.
        self.spaced_json: bool = spaced_json
        self.requests: list[dict[str, Any]] = []
        # Models that cannot load: every generation or embedding request naming one of them gets
        # Ollama's 500 for a model too big for the machine (the server itself keeps answering).
        self.fail_models: set[str] = set()
        self.url: str = ""
        self._fail_mode: str | None = None
        self._loaded: dict[str, float] = {}  # display name -> wall-clock expiry (for /api/ps)
        self._blobs: set[str] = set()
        self._host = "127.0.0.1"
        self._port = 0
        self._web_server: web.Server | None = None
        self._sock: socket.socket | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._listen_generation = 0
        self._inflight: set[asyncio.Task[Any]] = set()
        self._routes: dict[str, dict[str, _Handler]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/chat": {"POST": self._api_chat},
            "/api/generate": {"POST": self._api_generate},
            "/api/embed": {"POST": self._api_embed},
            "/api/embeddings": {"POST": self._api_embeddings},
            "/api/show": {"POST": self._api_show},
            "/api/pull": {"POST": self._api_pull},
            "/api/push": {"POST": self._api_push},
            "/api/create": {"POST": self._api_create},
            "/api/copy": {"POST": self._api_copy},
            "/api/delete": {"DELETE": self._api_delete},
            "/v1/chat/completions": {"POST": self._v1_chat},
            "/v1/completions": {"POST": self._v1_completions},
            "/v1/embeddings": {"POST": self._v1_embeddings},
            "/v1/models": {"GET": self._v1_models},
        }
        self._prefix_routes: list[tuple[str, dict[str, _Handler]]] = [
            ("/api/blobs/", {"HEAD": self._blob_head, "POST": self._blob_upload}),
            ("/v1/models/", {"GET": self._v1_model}),
        ]

    # ---------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start listening; returns the base URL (also stored in ``self.url``)."""
        if self._web_server is not None:
            raise RuntimeError("FakeOllama is already running")
        self._host, self._port = host, port
        self._web_server = web.Server(
            self._dispatch,
            request_factory=self._make_request,
            handler_cancellation=True,
            access_log=None,
        )
        self._open_listener()
        assert self._serve_task is not None
        await self._serve_task
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{self._port}"
        if self._fail_mode == "refuse":
            self._close_listener()
        return self.url

    async def stop(self) -> None:
        """Stop listening, cancel in-flight requests and close all connections."""
        if self._web_server is None:
            return
        self._close_listener()
        if self._serve_task is not None:
            with contextlib.suppress(BaseException):
                await self._serve_task
        for task in list(self._inflight):
            task.cancel()
        server, self._web_server = self._web_server, None
        server.pre_shutdown()
        await server.shutdown(1.0)
        self._serve_task = None

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._web_server is not None

    def _make_request(
        self, message: Any, payload: Any, protocol: Any, writer: Any, task: asyncio.Task[None]
    ) -> web.BaseRequest:
        loop = asyncio.get_running_loop()
        return web.BaseRequest(
            message, payload, protocol, writer, task, loop, client_max_size=_CLIENT_MAX_SIZE
        )

    def _open_listener(self) -> None:
        """Bind and listen synchronously (so connects queue up at once), then serve in a task."""
        family, socktype, proto, _, addr = socket.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._sock = sock
        self._listen_generation += 1
        self._serve_task = asyncio.get_running_loop().create_task(self._serve(sock, self._listen_generation))

    async def _serve(self, sock: socket.socket, generation: int) -> None:
        assert self._web_server is not None
        try:
            server = await asyncio.get_running_loop().create_server(self._web_server, sock=sock, backlog=1024)
        except OSError:
            if generation == self._listen_generation:
                raise
            sock.close()  # superseded by a newer listener (e.g. "refuse" toggled quickly): nothing to do
            return
        if generation != self._listen_generation:  # closed again while we were starting
            server.close()
            return
        self._listener = server

    def _close_listener(self) -> None:
        """Stop accepting connections immediately (synchronous)."""
        self._listen_generation += 1
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        elif self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._sock = None

    def _abort_connections(self) -> None:
        if self._web_server is None:
            return
        for conn in self._web_server.connections:
            transport = conn.transport
            if transport is not None:
                transport.abort()

    # ---------------------------------------------------------------- controls

    @property
    def fail_mode(self) -> str | None:
        return self._fail_mode

    @fail_mode.setter
    def fail_mode(self, mode: str | None) -> None:
        if mode not in FAIL_MODES:
            raise ValueError(f"unknown fail_mode {mode!r}; expected one of {sorted(map(str, FAIL_MODES))}")
        old, self._fail_mode = self._fail_mode, mode
        if self._web_server is None or old == mode:
            return
        if mode == "refuse":
            self._close_listener()
            self._abort_connections()
        elif old == "refuse":
            self._open_listener()

    def reset(self) -> None:
        """Clear the request log and restore the constructor's configuration (re-opens after "refuse")."""
        self.fail_mode = None
        self.fail_models.clear()
        self.requests.clear()
        self.models[:] = self._initial[0]
        self.token_delay_s, self.latency_s, self.completion_tokens = self._initial[1:]
        self._loaded.clear()
        self._blobs.clear()

    def config(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "fail_mode": self._fail_mode,
            "token_delay_s": self.token_delay_s,
            "latency_s": self.latency_s,
            "completion_tokens": self.completion_tokens,
        }

    def configure(self, settings: Mapping[str, Any], *, allow_refuse: bool = True) -> dict[str, Any]:
        """Apply any subset of :meth:`config` keys (validated); returns the new config."""
        unknown = set(settings) - {"models", "fail_mode", "token_delay_s", "latency_s", "completion_tokens"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        models = settings.get("models", self.models)
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError("models must be a list of non-empty strings")
        mode = settings.get("fail_mode", self._fail_mode)
        if mode not in FAIL_MODES:
            raise ValueError(f"unknown fail_mode {mode!r}")
        if mode == "refuse" and not allow_refuse:
            raise ValueError('fail_mode "refuse" cannot be set over HTTP; use "reset_conn"')
        numbers: dict[str, float] = {}
        for key in ("token_delay_s", "latency_s", "completion_tokens"):
            value = settings.get(key, getattr(self, key))
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key} must be a number >= 0")
            numbers[key] = value
        if numbers["completion_tokens"] != int(numbers["completion_tokens"]):
            raise ValueError("completion_tokens must be an integer")
        self.models[:] = models
        self.token_delay_s = float(numbers["token_delay_s"])
        self.latency_s = float(numbers["latency_s"])
        self.completion_tokens = int(numbers["completion_tokens"])
        self.fail_mode = mode
        return self.config()

    async def _control(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if path == "/_fake/requests" and request.method == "GET":
            return _json_response(self.requests)
        if path == "/_fake/reset" and request.method == "POST":
            self.reset()
            return _json_response({"ok": True})
        if path == "/_fake/config" and request.method == "GET":
            return _json_response(self.config())
        if path == "/_fake/config" and request.method == "POST":
            try:
                settings = json.loads(await request.read() or b"{}")
                if not isinstance(settings, dict):
                    raise ValueError("config body must be a JSON object")
                return _json_response(self.configure(settings, allow_refuse=False))
            except ValueError as exc:
                return _json_response({"error": str(exc)}, 400)
        return _json_response({"error": f"unknown control endpoint {request.method} {path}"}, 404)

    # ---------------------------------------------------------------- dispatch

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_fake/"):
            return await self._control(request, path)
        _SPACED.set(self.spaced_json)
        raw = await request.read()
        parsed: Any = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = _INVALID_JSON
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        entry: dict[str, Any] = {
            "method": request.method,
            "path": path,
            "query": request.query_string,
            "headers": headers,
            "json": None if parsed is _INVALID_JSON else parsed,
            "body_size": len(raw),
            "status": None,
            "cancelled": False,
            "aborted": False,
            "tokens_emitted": 0,
            "time": time.time(),
        }
        self._log(entry)
        ctx = _Ctx(request, raw, parsed, entry)
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            resp = await self._serve_request(ctx)
        except asyncio.CancelledError:
            entry["cancelled"] = True
            entry["status"] = ctx.resp.status if ctx.resp is not None and ctx.resp.prepared else None
            raise
        except ConnectionError:  # the client went away while we were writing
            entry["cancelled"] = True
            entry["status"] = ctx.resp.status if ctx.resp is not None and ctx.resp.prepared else None
            return ctx.resp if ctx.resp is not None else web.Response()
        finally:
            if task is not None:
                self._inflight.discard(task)
        if not entry["aborted"]:
            entry["status"] = resp.status
        return resp

    def _log(self, entry: dict[str, Any]) -> None:
        self.requests.append(entry)
        if len(self.requests) > 2 * self.max_log_entries:
            del self.requests[: len(self.requests) - self.max_log_entries]

    def _route(self, path: str) -> tuple[dict[str, _Handler] | None, str]:
        methods = self._routes.get(path)
        if methods is not None:
            return methods, ""
        for prefix, prefixed in self._prefix_routes:
            if path.startswith(prefix):
                rest = path[len(prefix) :]
                if rest and "/" not in rest:
                    return prefixed, rest
        return None, ""

    async def _serve_request(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        if self._fail_mode == "reset_conn":
            ctx.entry["aborted"] = True
            transport = request.transport
            if transport is not None:
                transport.abort()
            return web.Response(status=500)  # never reaches the client
        if self._host_check_enabled() and not host_allowed(request.headers.get("Host", "")):
            return web.Response(status=403)
        path = request.path
        methods, ctx.param = self._route(path)
        if methods is None:
            return _text_response(_NOT_FOUND_TEXT, 404)
        handler = methods.get(request.method)
        if handler is None:
            return _text_response(_NOT_ALLOWED_TEXT, 405)
        is_v1 = path.startswith("/v1/")
        try:
            if is_v1 or path in _MODEL_API_PATHS:
                if self._fail_mode == "hang":
                    await asyncio.get_running_loop().create_future()  # until cancelled
                if self._fail_mode == "500":
                    raise _ApiError(500, RUNNER_ERROR)
                if self.fail_models and self._names_failing_model(ctx.parsed):
                    raise _ApiError(500, MEMORY_ERROR)
            return await handler(ctx)
        except _ApiError as err:
            if ctx.resp is not None:  # pragma: no cover - errors are raised before streaming starts
                raise
            return _openai_error(err) if is_v1 else _native_error(err)

    def _names_failing_model(self, parsed: Any) -> bool:
        name = parsed.get("model") if isinstance(parsed, dict) else None
        if not isinstance(name, str) or not name.strip():
            return False
        return normalize_model_name(name) in {normalize_model_name(m) for m in self.fail_models}

    def _host_check_enabled(self) -> bool:
        return _is_loopback_host(self._host) if self.host_check is None else self.host_check

    # ---------------------------------------------------------------- model helpers

    def _find_model(self, name: str) -> str | None:
        """Installed display name matching ``name`` (tag defaults to latest, case-insensitive)."""
        if not name.strip():
            return None
        wanted = normalize_model_name(name)
        for model in self.models:
            if normalize_model_name(model) == wanted:
                return _display_name(model)
        return None

    def _model_entries(self) -> list[tuple[str, float]]:
        """(display name, modified_at unix) in /api/tags order (newest first = list order)."""
        out: list[tuple[str, float]] = []
        seen: set[str] = set()
        for index, model in enumerate(self.models):
            canonical = normalize_model_name(model)
            if canonical in seen:
                continue
            seen.add(canonical)
            display = _display_name(model)
            out.append((display, _BASE_MTIME - 3600.0 * index - _static_model_info(display)[4]))
        return out

    def _tag_entry(self, display: str, mtime: float) -> dict[str, Any]:
        digest, size, details, capabilities, _ = _static_model_info(display)
        return {
            "name": display,
            "model": display,
            "modified_at": _rfc3339_local(mtime),
            "size": size,
            "digest": digest,
            "details": dict(details),
            "capabilities": list(capabilities),
        }

    def _check_generation_model(
        self, model: str, verb: str, options: Mapping[str, Any], tools: Any = None, think: Any = None
    ) -> str:
        installed = self._find_model(model)
        if installed is None:
            raise _ApiError(404, f"model '{model}' not found")
        if _is_embedding_model(installed):
            raise _ApiError(400, f"{_quote(model)} does not support {verb}")
        if isinstance(tools, list) and tools:
            raise _ApiError(400, f"{model} does not support tools")
        if think is not None and think is not False:
            raise _ApiError(400, f"{_quote(model)} does not support thinking")
        _check_options(options)
        return installed

    @staticmethod
    def _check_native_generation(req: Mapping[str, Any]) -> None:
        _check_format(req.get("format"))

    def _plan(self, num_predict: Any) -> tuple[int, str]:
        """(output tokens, done_reason) given ``num_predict`` (None or negative = unlimited)."""
        natural = max(0, int(self.completion_tokens))
        if isinstance(num_predict, int | float) and not isinstance(num_predict, bool):
            cap = int(num_predict)
            if 0 <= cap < natural:
                return cap, "length"
        return natural, "stop"

    async def _startup_latency(self, installed: str) -> None:
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        self._loaded[installed] = time.time() + KEEP_ALIVE_S

    async def _whole_generation_delay(self, n: int) -> None:
        if self.token_delay_s > 0 and n:
            await asyncio.sleep(self.token_delay_s * n)

    @staticmethod
    def _metrics(t_start: int, t_loaded: int, prompt_tokens: int, eval_count: int) -> dict[str, int]:
        """The six native metrics, omitting zeros (omitempty); total = load + prompt_eval + eval."""
        t_end = time.monotonic_ns()
        load = max(t_loaded - t_start, 1)
        prompt_eval = 20_000 * prompt_tokens
        eval_duration = max(t_end - t_loaded, 1) if eval_count else 0
        out = {"total_duration": load + prompt_eval + eval_duration, "load_duration": load}
        if prompt_tokens:
            out["prompt_eval_count"] = prompt_tokens
            out["prompt_eval_duration"] = prompt_eval
        if eval_count:
            out["eval_count"] = eval_count
            out["eval_duration"] = eval_duration
        return out

    # ---------------------------------------------------------------- simple routes

    async def _root(self, ctx: _Ctx) -> web.StreamResponse:
        return _text_response(_ROOT_TEXT, 200, _TEXT_CT)

    async def _version(self, ctx: _Ctx) -> web.StreamResponse:
        return _json_response({"version": OLLAMA_VERSION})

    async def _tags(self, ctx: _Ctx) -> web.StreamResponse:
        return _json_response({"models": [self._tag_entry(d, m) for d, m in self._model_entries()]})

    async def _ps(self, ctx: _Ctx) -> web.StreamResponse:
        now = time.time()
        installed = {d for d, _ in self._model_entries()}
        loaded = sorted(
            ((d, exp) for d, exp in self._loaded.items() if exp > now and d in installed),
            key=lambda item: item[1],
            reverse=True,
        )
        models = []
        for display, expires in loaded:
            digest, size, details, _, _ = _static_model_info(display)
            models.append(
                {
                    "name": display,
                    "model": display,
                    "size": size,
                    "digest": digest,
                    "details": dict(details),
                    "expires_at": _rfc3339_local(expires),
                    "size_vram": size,
                    "context_length": 4096,
                }
            )
        return _json_response({"models": models})

    # ---------------------------------------------------------------- native inference

    async def _api_chat(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.ChatRequest", _CHAT_FIELDS)
        model = req.get("model") or ""
        if not model:
            raise _ApiError(400, "model is required")
        messages = req.get("messages") or []
        for message in messages:
            if not isinstance(message, dict):
                raise _ApiError(
                    400, f"json: cannot unmarshal {_go_kind(message)} into Go value of type api.Message"
                )
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise _ApiError(
                    400,
                    f"json: cannot unmarshal {_go_kind(content)} into Go struct field "
                    "ChatRequest.messages.content of type string",
                )
        options = req.get("options") or {}
        installed = self._check_generation_model(model, "chat", options, req.get("tools"), req.get("think"))
        if not messages:  # just load (or unload) the model, no generation
            return await self._load_reply(installed, model, req.get("keep_alive"), chat=True)
        self._check_native_generation(req)
        n, reason = self._plan(options.get("num_predict"))
        stream = req.get("stream")
        return await self._native_generation(
            ctx,
            installed=installed,
            model=model,
            chat=True,
            prompt_tokens=count_chat_prompt_tokens(messages),
            n=n,
            reason=reason,
            stream=True if stream is None else stream,
            context=False,
        )

    async def _api_generate(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.GenerateRequest", _GENERATE_FIELDS)
        model = req.get("model") or ""
        if not model.strip():
            raise _ApiError(404, f"model '{model}' not found")
        options = req.get("options") or {}
        raw_mode = bool(req.get("raw"))
        if raw_mode and (req.get("template") or req.get("system") or req.get("context")):
            raise _ApiError(400, "raw mode does not support template, system, or context")
        installed = self._check_generation_model(model, "generate", options, None, req.get("think"))
        if req.get("suffix"):
            raise _ApiError(400, f"{_quote(model)} does not support insert")
        prompt = req.get("prompt") or ""
        if not prompt:
            return await self._load_reply(installed, model, req.get("keep_alive"), chat=False)
        self._check_native_generation(req)
        n, reason = self._plan(options.get("num_predict"))
        stream = req.get("stream")
        return await self._native_generation(
            ctx,
            installed=installed,
            model=model,
            chat=False,
            prompt_tokens=count_generate_prompt_tokens(prompt, req.get("system") or ""),
            n=n,
            reason=reason,
            stream=True if stream is None else stream,
            context=not raw_mode,
        )

    async def _load_reply(self, installed: str, model: str, keep_alive: Any, *, chat: bool) -> web.Response:
        await self._startup_latency(installed)
        reason = "load"
        if _is_unload(keep_alive):
            reason = "unload"
            self._loaded.pop(installed, None)
        body: dict[str, Any] = {"model": model, "created_at": _rfc3339_utc()}
        if chat:
            body["message"] = {"role": "assistant", "content": ""}
        else:
            body["response"] = ""
        body["done"] = True
        body["done_reason"] = reason
        return _json_response(body)

    async def _native_generation(
        self,
        ctx: _Ctx,
        *,
        installed: str,
        model: str,
        chat: bool,
        prompt_tokens: int,
        n: int,
        reason: str,
        stream: bool,
        context: bool,
    ) -> web.StreamResponse:
        await self._startup_latency(installed)
        t_loaded = time.monotonic_ns()
        midstream = self._fail_mode == "midstream"

        def final(text: str) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": _rfc3339_utc()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = True
            out["done_reason"] = reason
            if context:
                out["context"] = _context_ids(prompt_tokens + n)
            out.update(self._metrics(ctx.t_start, t_loaded, prompt_tokens, n))
            return out

        if not stream:
            await self._whole_generation_delay(n)
            if midstream:
                raise _ApiError(500, RUNNER_ERROR)
            ctx.entry["tokens_emitted"] = n
            return _json_response(final(completion_text(n)))

        resp = _RespacingResponse(headers={"Content-Type": "application/x-ndjson"})
        ctx.resp = resp
        await resp.prepare(ctx.request)
        head = b'{"model":' + _dumps(model) + b',"created_at":"'
        mid = b'","message":{"role":"assistant","content":"' if chat else b'","response":"'
        tail = b'"},"done":false}\n' if chat else b'","done":false}\n'
        delay = self.token_delay_s
        stamp = _rfc3339_utc().encode()
        emit = _midstream_count(n) if midstream else n

        def last_line() -> bytes:
            return _dumps({"error": RUNNER_ERROR} if midstream else final("")) + b"\n"

        if delay <= 0 and self.coalesce:
            prefix = head + stamp + mid
            await resp.write(b"".join([*(prefix + _token_bytes(i) + tail for i in range(emit)), last_line()]))
            ctx.entry["tokens_emitted"] = emit
            return resp
        for i in range(emit):
            if delay > 0:
                if i:
                    await asyncio.sleep(delay)
                stamp = _rfc3339_utc().encode()
            await resp.write(head + stamp + mid + _token_bytes(i) + tail)
            ctx.entry["tokens_emitted"] = i + 1
        if delay > 0 and emit:
            await asyncio.sleep(delay)
        await resp.write(last_line())
        return resp

    def _embed_inputs(self, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise _ApiError(400, "invalid input type")
            return list(value)
        raise _ApiError(400, "invalid input type")

    async def _embed_core(
        self, ctx: _Ctx, model: str, inputs: list[str], *, dimensions: int, truncate: bool
    ) -> tuple[str, list[tuple[float, ...]], int]:
        if not model.strip():
            raise _ApiError(404, f"model '{model}' not found")
        installed = self._find_model(model)
        if installed is None:
            raise _ApiError(404, f'model "{model}" not found, try pulling it first')
        await self._startup_latency(installed)
        if self._fail_mode == "midstream" and inputs:
            raise _ApiError(500, RUNNER_ERROR)
        dim = embedding_dimension(installed)
        vectors: list[tuple[float, ...]] = []
        total = 0
        for text in inputs:
            tokens = count_embed_tokens(text)
            if tokens > EMBED_CONTEXT_TOKENS:
                if not truncate:
                    raise _ApiError(400, "the input length exceeds the context length")
                tokens, text = EMBED_CONTEXT_TOKENS, text[: 4 * EMBED_CONTEXT_TOKENS]
            total += tokens
            vectors.append(_unit_embedding(text, dim, dimensions))
        return installed, vectors, total

    async def _api_embed(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.EmbedRequest", _EMBED_FIELDS)
        inputs = self._embed_inputs(req.get("input"))
        _check_options(req.get("options") or {})
        model = req.get("model") or ""
        truncate = req.get("truncate")
        _, vectors, total = await self._embed_core(
            ctx, model, inputs, dimensions=req.get("dimensions") or 0, truncate=truncate is not False
        )
        if not inputs:
            return _json_response({"model": model, "embeddings": []})
        load = max(time.monotonic_ns() - ctx.t_start, 1)
        return _json_response(
            {
                "model": model,
                "embeddings": vectors,
                "total_duration": load + 20_000 * total,
                "load_duration": load,
                "prompt_eval_count": total,
            }
        )

    async def _api_embeddings(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.EmbeddingRequest", _EMBEDDINGS_FIELDS)
        model = req.get("model") or ""
        if not model:
            raise _ApiError(400, "model is required")
        _check_options(req.get("options") or {})
        installed = self._find_model(model)
        if installed is None:
            raise _ApiError(404, f'model "{model}" not found, try pulling it first')
        await self._startup_latency(installed)
        prompt = req.get("prompt") or ""
        if not prompt:
            return _json_response({"embedding": []})
        if self._fail_mode == "midstream":
            raise _ApiError(500, RUNNER_ERROR)
        return _json_response({"embedding": _raw_embedding(prompt, embedding_dimension(installed))})

    # ---------------------------------------------------------------- OpenAI-compatible layer

    async def _v1_chat(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "openai.ChatCompletionRequest", _V1_CHAT_FIELDS, openai=True)
        raw_messages = req.get("messages") or []
        if not raw_messages:
            raise _ApiError(400, "[] is too short - 'messages'")
        messages = _openai_messages(raw_messages)
        think = _openai_think(req)
        options: dict[str, Any] = {}
        if req.get("max_tokens") is not None:  # max_completion_tokens is deliberately NOT read (like Ollama)
            options["num_predict"] = req["max_tokens"]
        model = req.get("model") or ""
        if not model:
            raise _ApiError(400, "model is required")
        installed = self._check_generation_model(model, "chat", options, req.get("tools"), think)
        n, reason = self._plan(options.get("num_predict"))
        stream_options = req.get("stream_options") or {}
        return await self._openai_generation(
            ctx,
            installed=installed,
            model=model,
            chat=True,
            prompt_tokens=count_chat_prompt_tokens(messages),
            n=n,
            reason=reason,
            stream=bool(req.get("stream")),
            include_usage=stream_options.get("include_usage") is True,
        )

    async def _v1_completions(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "openai.CompletionRequest", _V1_COMPLETION_FIELDS, openai=True)
        stop = req.get("stop")
        if isinstance(stop, list):
            for item in stop:
                if not isinstance(item, str):
                    raise _ApiError(400, f"invalid type for 'stop' field: {_go_type_name(item)}")
        options: dict[str, Any] = {}
        if req.get("max_tokens") is not None:
            options["num_predict"] = req["max_tokens"]
        model = req.get("model") or ""
        if not model.strip():
            raise _ApiError(404, f"model '{model}' not found")
        installed = self._check_generation_model(model, "generate", options)
        if req.get("suffix"):
            raise _ApiError(400, f"{_quote(model)} does not support insert")
        prompt = req.get("prompt") or ""
        if prompt:
            n, reason = self._plan(options.get("num_predict"))
            prompt_tokens = count_generate_prompt_tokens(prompt)
        else:
            n, reason, prompt_tokens = 0, "load", 0
        stream_options = req.get("stream_options") or {}
        return await self._openai_generation(
            ctx,
            installed=installed,
            model=model,
            chat=False,
            prompt_tokens=prompt_tokens,
            n=n,
            reason=reason,
            stream=bool(req.get("stream")),
            include_usage=stream_options.get("include_usage") is True,
        )

    async def _openai_generation(
        self,
        ctx: _Ctx,
        *,
        installed: str,
        model: str,
        chat: bool,
        prompt_tokens: int,
        n: int,
        reason: str,
        stream: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        await self._startup_latency(installed)
        midstream = self._fail_mode == "midstream"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{random.randrange(999)}"
        if not stream:
            await self._whole_generation_delay(n)
            if midstream:
                raise _ApiError(500, RUNNER_ERROR)
            ctx.entry["tokens_emitted"] = n
            text = completion_text(n)
            choice: dict[str, Any]
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                }
            else:
                choice = {"text": text, "index": 0, "finish_reason": reason}
            return _json_response(
                {
                    "id": ident,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [choice],
                    "usage": usage,
                }
            )

        resp = _RespacingResponse(headers={"Content-Type": "text/event-stream"})
        ctx.resp = resp
        await resp.prepare(ctx.request)
        created = int(time.time())
        model_json = _dumps(model)
        common = b'"id":"' + ident.encode() + b'","object":"'
        if chat:
            common += b'chat.completion.chunk","created":' + str(created).encode()
            frame_head = b"data: {" + common + b',"model":' + model_json
            frame_head += b',"system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{'

            def frame(i: int) -> bytes:
                role = b'"role":"assistant",' if i == 0 else b""
                return (
                    frame_head + role + b'"content":"' + _token_bytes(i) + b'"},"finish_reason":null}]}\n\n'
                )

            def error_frame(first: bool) -> bytes:
                role = b'"role":"assistant",' if first else b""
                return (
                    b"data: {" + common + b',"model":"","system_fingerprint":"fp_ollama",'
                    b'"choices":[{"index":0,"delta":{' + role + b'"content":""},"finish_reason":null}]}\n\n'
                )

            finish = frame_head + b'},"finish_reason":"' + reason.encode() + b'"}]}\n\n'
            if n == 0:
                finish = frame_head + b'"role":"assistant","content":""},"finish_reason":null}]}\n\n' + finish
        else:
            common += b'text_completion","created":' + str(created).encode()
            zero = _ZERO_USAGE if include_usage else b""
            text_head = b"data: {" + common + b',"choices":[{"text":"'
            text_tail = b'","index":0,"finish_reason":null}],"model":' + model_json
            text_tail += b',"system_fingerprint":"fp_ollama"' + zero + b"}\n\n"

            def frame(i: int) -> bytes:
                return text_head + _token_bytes(i) + text_tail

            def error_frame(first: bool) -> bytes:
                return (
                    text_head
                    + b'","index":0,"finish_reason":null}],"model":"","system_fingerprint":"fp_ollama"'
                    + zero
                    + b"}\n\n"
                )

            finish = (
                text_head
                + b'","index":0,"finish_reason":"'
                + reason.encode()
                + b'"}],"model":'
                + model_json
                + b',"system_fingerprint":"fp_ollama"'
                + zero
                + b"}\n\n"
            )

        delay = self.token_delay_s
        emit = _midstream_count(n) if midstream else n
        if delay <= 0 and self.coalesce:
            body = b"".join(frame(i) for i in range(emit))
            ctx.entry["tokens_emitted"] = emit
        else:
            body = b""
            for i in range(emit):
                if i and delay > 0:
                    await asyncio.sleep(delay)
                await resp.write(frame(i))
                ctx.entry["tokens_emitted"] = i + 1
            if delay > 0 and emit:
                await asyncio.sleep(delay)
        if midstream:
            await resp.write(body + error_frame(emit == 0))
            return resp  # EOF without finish_reason, usage or [DONE]
        tail = body + finish
        if include_usage:
            usage_chunk: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [],
                "usage": usage,
            }
            tail += b"data: " + _dumps(usage_chunk) + b"\n\n"
        await resp.write(tail + _DONE_FRAME)
        return resp

    async def _v1_embeddings(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "openai.EmbedRequest", _V1_EMBED_FIELDS, openai=True)
        value = req.get("input")
        if value == "":
            value = [""]
        if value is None or (isinstance(value, list) and not value):
            raise _ApiError(400, "invalid input")
        encoding = (req.get("encoding_format") or "float").lower()
        if encoding not in ("float", "base64"):
            raise _ApiError(400, f"invalid encoding_format: {req.get('encoding_format')!r}")
        inputs = self._embed_inputs(value)
        model = req.get("model") or ""
        _, vectors, total = await self._embed_core(
            ctx, model, inputs, dimensions=req.get("dimensions") or 0, truncate=True
        )
        data: list[dict[str, Any]] = []
        for index, vec in enumerate(vectors):
            embedding: Any = vec
            if encoding == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "embedding": embedding, "index": index})
        return _json_response(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": total, "total_tokens": total},
            }
        )

    async def _v1_models(self, ctx: _Ctx) -> web.StreamResponse:
        data = [
            {"id": d, "object": "model", "created": int(m), "owned_by": _name_parts(d)[1]}
            for d, m in self._model_entries()
        ]
        return _json_response({"object": "list", "data": data or None})

    async def _v1_model(self, ctx: _Ctx) -> web.StreamResponse:
        name = ctx.param
        installed = self._find_model(name)
        if installed is None:
            raise _ApiError(404, f"model '{name}' not found")
        mtime = dict(self._model_entries())[installed]
        return _json_response(
            {"id": name, "object": "model", "created": int(mtime), "owned_by": _name_parts(name)[1]}
        )

    # ---------------------------------------------------------------- management endpoints
    # (the gateway must never forward these; they exist so tests can prove it does not)

    async def _api_show(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.ShowRequest", _MODEL_FIELDS)
        model = req.get("model") or req.get("name") or ""
        if not model:
            raise _ApiError(400, "model is required")
        installed = self._find_model(model)
        if installed is None:
            raise _ApiError(404, f"model '{model}' not found")
        digest, _, details, capabilities, _ = _static_model_info(installed)
        mtime = dict(self._model_entries())[installed]
        family = details["family"]
        return _json_response(
            {
                "license": "",
                "modelfile": (
                    '# Modelfile generated by "ollama show"\n'
                    f"# To build a new Modelfile based on this, replace FROM with:\n# FROM {installed}\n\n"
                    f"FROM /usr/share/ollama/.ollama/models/blobs/sha256-{digest}\n"
                    'TEMPLATE "{{ .Prompt }}"\nSYSTEM "You are a helpful assistant."\n'
                ),
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "system": "You are a helpful assistant.",
                "details": dict(details),
                "model_info": {"general.architecture": family, f"{family}.context_length": 131072},
                "capabilities": list(capabilities),
                "modified_at": _rfc3339_local(mtime),
            }
        )

    async def _ndjson_status(self, ctx: _Ctx, lines: list[dict[str, Any]], stream: Any) -> web.StreamResponse:
        if stream is False:
            return _json_response(lines[-1])
        resp = _RespacingResponse(headers={"Content-Type": "application/x-ndjson"})
        ctx.resp = resp
        await resp.prepare(ctx.request)
        await resp.write(b"".join(_dumps(line) + b"\n" for line in lines))
        return resp

    def _add_model(self, name: str) -> None:
        if self._find_model(name) is None:
            self.models.insert(0, _display_name(name))

    async def _api_pull(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.PullRequest", {**_MODEL_FIELDS, "stream": _BOOL})
        model = req.get("model") or req.get("name") or ""
        if not model.strip():
            raise _ApiError(400, "invalid model name")
        digest, size, _, _, _ = _static_model_info(_display_name(model))
        self._add_model(model)
        lines: list[dict[str, Any]] = [
            {"status": "pulling manifest"},
            {
                "status": f"pulling {digest[:12]}",
                "digest": f"sha256:{digest}",
                "total": size,
                "completed": size,
            },
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        return await self._ndjson_status(ctx, lines, req.get("stream"))

    async def _api_push(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.PushRequest", {**_MODEL_FIELDS, "stream": _BOOL})
        model = req.get("model") or req.get("name") or ""
        if not model.strip():
            raise _ApiError(400, "invalid model name")
        if self._find_model(model) is None:
            raise _ApiError(404, f"model '{model}' not found")
        lines = [{"status": "retrieving manifest"}, {"status": "pushing manifest"}, {"status": "success"}]
        return await self._ndjson_status(ctx, lines, req.get("stream"))

    async def _api_create(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(
            ctx.parsed, ctx.raw, "api.CreateRequest", {**_MODEL_FIELDS, "from": _STR, "stream": _BOOL}
        )
        model = req.get("model") or req.get("name") or ""
        if not model.strip():
            raise _ApiError(400, "invalid model name")
        source = req.get("from")
        if source and self._find_model(source) is None:
            raise _ApiError(404, f"model '{source}' not found")
        self._add_model(model)
        lines = [{"status": "using existing layer"}, {"status": "writing manifest"}, {"status": "success"}]
        return await self._ndjson_status(ctx, lines, req.get("stream"))

    async def _api_copy(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.CopyRequest", _COPY_FIELDS)
        source, destination = req.get("source") or "", req.get("destination") or ""
        if not destination.strip():
            raise _ApiError(400, "invalid destination name")
        if self._find_model(source) is None:
            raise _ApiError(404, f"model '{source}' not found")
        self._add_model(destination)
        return web.Response(status=200)

    async def _api_delete(self, ctx: _Ctx) -> web.StreamResponse:
        req = _bind(ctx.parsed, ctx.raw, "api.DeleteRequest", _MODEL_FIELDS)
        model = req.get("model") or req.get("name") or ""
        if not model.strip():
            raise _ApiError(400, "invalid model name")
        installed = self._find_model(model)
        if installed is None:
            raise _ApiError(404, f"model '{model}' not found")
        wanted = normalize_model_name(model)
        self.models[:] = [m for m in self.models if normalize_model_name(m) != wanted]
        self._loaded.pop(installed, None)
        return web.Response(status=200)

    async def _blob_head(self, ctx: _Ctx) -> web.StreamResponse:
        return web.Response(status=200 if ctx.param in self._blobs else 404)

    async def _blob_upload(self, ctx: _Ctx) -> web.StreamResponse:
        if not re.fullmatch(r"sha256[:-][0-9a-fA-F]{64}", ctx.param):
            raise _ApiError(400, "invalid digest format")
        self._blobs.add(ctx.param)
        return web.Response(status=201)


def _go_type_name(value: Any) -> str:
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def _openai_messages(raw_messages: list[Any]) -> list[dict[str, Any]]:
    """Translate /v1 messages to native ones (each text/image part becomes its own message, as in Ollama)."""
    out: list[dict[str, Any]] = []
    for message in raw_messages:
        if not isinstance(message, dict):
            raise _ApiError(
                400, f"json: cannot unmarshal {_go_kind(message)} into Go value of type openai.Message"
            )
        role = message.get("role") if isinstance(message.get("role"), str) else ""
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                arguments = call.get("function", {}).get("arguments") if isinstance(call, dict) else None
                try:
                    json.loads(arguments if isinstance(arguments, str) else "")
                except ValueError:
                    raise _ApiError(400, "invalid tool call arguments") from None
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise _ApiError(400, "invalid message format")
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        raise _ApiError(400, "invalid message format")
                    out.append({"role": role, "content": part["text"]})
                elif part.get("type") == "image_url":
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str):
                        raise _ApiError(400, "invalid message format")
                    if not re.match(r"data:(image/(png|jpeg|jpg|webp))?;base64,", url):
                        raise _ApiError(400, "invalid image input")
                    out.append({"role": role, "content": "", "images": [url.split(",", 1)[1]]})
                else:
                    raise _ApiError(400, "invalid message format")
        elif tool_calls is None:
            raise _ApiError(400, f"invalid message content type: {_go_type_name(content)}")
        else:
            out.append({"role": role, "content": ""})
    return out


_EFFORTS: Final = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
    "xhigh": "max",
    "ultra": "max",
}


def _openai_think(req: Mapping[str, Any]) -> Any:
    reasoning = req.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if not effort:
        effort = req.get("reasoning_effort")
    if not effort:
        return None
    if effort not in _EFFORTS:
        raise _ApiError(
            400,
            f'invalid reasoning value: \'{effort}\' (must be "none", "minimal", "low", "medium", '
            '"high", "max", "xhigh" or "ultra")',
        )
    return _EFFORTS[effort]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fake_ollama", description="Run the fake Ollama server until SIGINT/SIGTERM."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=11434, help="port to bind; 0 picks a free one (default 11434)"
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated installed models")
    parser.add_argument("--token-delay-ms", type=float, default=20.0, help="delay between streamed tokens")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="delay before the first byte")
    parser.add_argument("--completion-tokens", type=int, default=12, help="output tokens per completion")
    parser.add_argument("--fast", action="store_true", help="zero delays (for benchmarks)")
    parser.add_argument(
        "--coalesce",
        action="store_true",
        help="with zero token delay, send each stream in one write (same bytes, fewer syscalls)",
    )
    parser.add_argument(
        "--host-check",
        choices=("auto", "on", "off"),
        default="auto",
        help="Host-header check: auto = only when bound to loopback (like Ollama)",
    )
    parser.add_argument("--max-log", type=int, default=100_000, help="request-log entries to keep")
    return parser


async def _run(args: argparse.Namespace) -> None:
    fast = bool(args.fast)
    fake = FakeOllama(
        [m.strip() for m in args.models.split(",") if m.strip()],
        token_delay_s=0.0 if fast else max(0.0, args.token_delay_ms) / 1000.0,
        latency_s=0.0 if fast else max(0.0, args.latency_ms) / 1000.0,
        completion_tokens=args.completion_tokens,
        host_check={"auto": None, "on": True, "off": False}[args.host_check],
        max_log_entries=args.max_log,
        coalesce=bool(args.coalesce),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = await fake.start(args.host, args.port)
    print(
        f"fake-ollama {OLLAMA_VERSION} listening on {url} models={','.join(fake.models)} "
        f"token_delay_ms={fake.token_delay_s * 1000:g} latency_ms={fake.latency_s * 1000:g}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
