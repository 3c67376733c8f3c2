"""Tests for the fake Ollama server (tests/fake_ollama.py) against the reference wire shapes."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.fake_ollama import (
    RUNNER_ERROR,
    FakeOllama,
    completion_text,
    count_chat_prompt_tokens,
    count_embed_tokens,
    count_generate_prompt_tokens,
    host_allowed,
    normalize_model_name,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
CHAT_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me something about the sea, please."},
]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as server:
        yield server


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def read_ndjson(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    body = await resp.read()
    assert body.endswith(b"\n"), "every NDJSON line is newline-terminated"
    return [json.loads(line) for line in body.split(b"\n")[:-1]]


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The payloads of ``data: ...\\n\\n`` frames, in order (raw strings, incl. ``[DONE]``)."""
    text = await resp.text()
    assert text.endswith("\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames)
    return [frame[len("data: ") :] for frame in frames]


async def wait_for(predicate: Callable[[], bool], within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def assert_final_metrics(final: dict[str, Any], prompt_tokens: int, eval_count: int) -> None:
    assert final["done"] is True
    for key in METRICS:
        if key in final:
            assert isinstance(final[key], int) and final[key] > 0, key
    assert final["prompt_eval_count"] == prompt_tokens
    if eval_count:
        assert final["eval_count"] == eval_count
    else:  # omitempty: zero counts/durations are absent, not 0
        assert "eval_count" not in final and "eval_duration" not in final
    parts = final["load_duration"] + final["prompt_eval_duration"] + final.get("eval_duration", 0)
    assert final["total_duration"] >= parts


# ------------------------------------------------------------------------------------- basics


async def test_root_version_and_head(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.url + "/") as resp:
        assert resp.status == 200
        assert await resp.text() == "Ollama is running"
    async with session.head(fake.url + "/") as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    async with session.get(fake.url + "/api/version") as resp:
        assert resp.status == 200
        assert await resp.json() == {"version": "0.33.0-rc2"}


async def test_tags_shape(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.url + "/api/tags") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/json")
        body = await resp.json()
    models = body["models"]
    assert [m["name"] for m in models] == ["llama3.1:8b", "qwen3:8b", "nomic-embed-text:latest"]
    for entry in models:
        assert entry["model"] == entry["name"]
        assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
        assert isinstance(entry["size"], int) and entry["size"] > 0
        assert datetime.fromisoformat(entry["modified_at"].replace("Z", "+00:00")).tzinfo is not None
        assert set(entry["details"]) == {
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        }
        assert entry["details"]["format"] == "gguf"
    assert models[0]["capabilities"] == ["completion"]
    assert models[2]["capabilities"] == ["embedding"]
    stamps = [datetime.fromisoformat(m["modified_at"].replace("Z", "+00:00")) for m in models]
    assert stamps == sorted(stamps, reverse=True), "newest first"

    fake.models.clear()
    async with session.get(fake.url + "/api/tags") as resp:
        assert await resp.json() == {"models": []}


async def test_unknown_path_and_wrong_method(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.url + "/api/nope") as resp:
        assert resp.status == 404
        assert await resp.text() == "404 page not found"
    async with session.get(fake.url + "/api/chat") as resp:
        assert resp.status == 405


def test_model_name_normalization() -> None:
    assert normalize_model_name("llama3") == normalize_model_name("library/LLAMA3:latest")
    assert normalize_model_name("registry.ollama.ai/library/qwen3:8b") == normalize_model_name("Qwen3:8B")
    assert normalize_model_name("qwen3") != normalize_model_name("qwen3:8b")


async def test_model_matching_is_case_insensitive_and_defaults_to_latest(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    payload = {"model": "LLAMA3.1:8B", "messages": CHAT_MESSAGES, "stream": False}
    async with session.post(fake.url + "/api/chat", json=payload) as resp:
        assert resp.status == 200
        assert (await resp.json())["model"] == "LLAMA3.1:8B"  # echoes the requested name
    async with session.post(
        fake.url + "/api/embed", json={"model": "nomic-embed-text", "input": "x"}
    ) as resp:
        assert resp.status == 200
    async with session.post(fake.url + "/api/chat", json={**payload, "model": "llama3.1"}) as resp:
        assert resp.status == 404  # llama3.1 means llama3.1:latest, which is not installed


# ------------------------------------------------------------------------------------- native chat/generate


async def test_chat_streams_ndjson_with_final_metrics(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        fake.url + "/api/chat", json={"model": "qwen3:8b", "messages": CHAT_MESSAGES}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        chunks = await read_ndjson(resp)
    *content, final = chunks
    assert len(content) == 12
    for i, chunk in enumerate(content):
        assert list(chunk) == ["model", "created_at", "message", "done"]
        assert chunk["model"] == "qwen3:8b"
        assert chunk["message"] == {"role": "assistant", "content": f"word{i} "}
        assert chunk["done"] is False
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", chunk["created_at"])
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == "stop"
    assert "context" not in final
    assert_final_metrics(final, count_chat_prompt_tokens(CHAT_MESSAGES), 12)


async def test_chat_stream_false_returns_one_object(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    payload = {"model": "llama3.1:8b", "messages": CHAT_MESSAGES, "stream": False}
    async with session.post(fake.url + "/api/chat", json=payload) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        body = await resp.json()
    assert body["message"] == {"role": "assistant", "content": completion_text(12)}
    assert body["done_reason"] == "stop"
    assert_final_metrics(body, count_chat_prompt_tokens(CHAT_MESSAGES), 12)


async def test_num_predict_caps_output_with_done_reason_length(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    payload: dict[str, Any] = {
        "model": "llama3.1:8b",
        "prompt": "Why is the sky blue?",
        "options": {"num_predict": 3},
    }
    async with session.post(fake.url + "/api/generate", json=payload) as resp:
        *content, final = await read_ndjson(resp)
    assert [c["response"] for c in content] == ["word0 ", "word1 ", "word2 "]
    assert final["response"] == "" and final["done_reason"] == "length"
    prompt_tokens = count_generate_prompt_tokens("Why is the sky blue?")
    assert_final_metrics(final, prompt_tokens, 3)
    assert isinstance(final["context"], list) and len(final["context"]) == prompt_tokens + 3

    payload["options"] = {"num_predict": 0}
    payload["stream"] = False
    async with session.post(fake.url + "/api/generate", json=payload) as resp:
        body = await resp.json()
    assert body["response"] == "" and body["done_reason"] == "length"
    assert_final_metrics(body, prompt_tokens, 0)

    payload["options"] = {"num_predict": -1}
    async with session.post(fake.url + "/api/generate", json=payload) as resp:
        assert (await resp.json())["done_reason"] == "stop"


async def test_load_and_unload_replies(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    async with session.post(fake.url + "/api/chat", json={"model": "qwen3:8b", "messages": []}) as resp:
        body = await resp.json()
    assert body["done"] is True and body["done_reason"] == "load"
    payload = {"model": "qwen3:8b", "prompt": "", "keep_alive": 0}
    async with session.post(fake.url + "/api/generate", json=payload) as resp:
        assert (await resp.json())["done_reason"] == "unload"


async def test_native_request_errors(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/api/chat", {"messages": CHAT_MESSAGES}, 400, "model is required"),
        ("/api/generate", {"prompt": "x"}, 404, "model '' not found"),
        ("/api/embed", {"input": "x"}, 404, "model '' not found"),
        ("/api/embeddings", {"prompt": "x"}, 400, "model is required"),
        ("/api/chat", {"model": "nope", "messages": CHAT_MESSAGES}, 404, "model 'nope' not found"),
        ("/api/generate", {"model": "nope:1b", "prompt": "x"}, 404, "model 'nope:1b' not found"),
        ("/api/embed", {"model": "nope", "input": "x"}, 404, 'model "nope" not found, try pulling it first'),
        (
            "/api/embeddings",
            {"model": "nope", "prompt": "x"},
            404,
            'model "nope" not found, try pulling it first',
        ),
        (
            "/api/chat",
            {"model": "nomic-embed-text", "messages": CHAT_MESSAGES},
            400,
            '"nomic-embed-text" does not support chat',
        ),
        ("/api/embed", {"model": "nomic-embed-text", "input": [1, 2]}, 400, "invalid input type"),
        (
            "/api/chat",
            {"model": "qwen3:8b", "messages": CHAT_MESSAGES, "options": {"temperature": "hot"}},
            500,
            'option "temperature" must be of type float32',
        ),
        (
            "/api/chat",
            {"model": "qwen3:8b", "messages": CHAT_MESSAGES, "stream": True, "format": "xml"},
            500,
            'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object',
        ),
        (
            "/api/generate",
            {"model": "qwen3:8b", "prompt": "x", "format": 5},
            500,
            'invalid format: "5"; expected "json" or a valid JSON Schema object',
        ),
        (
            "/api/generate",
            {"model": "qwen3:8b", "prompt": "x", "raw": True, "system": "s"},
            400,
            "raw mode does not support template, system, or context",
        ),
    ]
    for path, payload, status, message in cases:
        async with session.post(fake.url + path, json=payload) as resp:
            assert resp.status == status, (path, payload)
            assert await resp.json() == {"error": message}, (path, payload)
    async with session.post(fake.url + "/api/chat", data=b"") as resp:
        assert resp.status == 400
        assert await resp.json() == {"error": "missing request body"}


# ------------------------------------------------------------------------------------- embeddings


async def test_embed_is_normalized_and_deterministic(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    inputs = ["hello world", "another, longer input text"]
    payload = {"model": "nomic-embed-text", "input": inputs}
    async with session.post(fake.url + "/api/embed", json=payload) as resp:
        body = await resp.json()
    assert body["model"] == "nomic-embed-text"
    assert len(body["embeddings"]) == 2
    for vec in body["embeddings"]:
        assert len(vec) == 768
        assert math.isclose(math.sqrt(sum(v * v for v in vec)), 1.0, rel_tol=1e-9)
    assert body["prompt_eval_count"] == sum(count_embed_tokens(t) for t in inputs)
    assert body["total_duration"] > 0 and body["load_duration"] > 0

    async with session.post(fake.url + "/api/embed", json={**payload, "input": "hello world"}) as resp:
        single = await resp.json()
    assert single["embeddings"] == [body["embeddings"][0]]

    async with session.post(fake.url + "/api/embed", json={**payload, "input": ""}) as resp:
        assert await resp.json() == {"model": "nomic-embed-text", "embeddings": []}

    async with session.post(fake.url + "/api/embed", json={**payload, "dimensions": 64}) as resp:
        short = (await resp.json())["embeddings"][0]
    assert len(short) == 64 and math.isclose(sum(v * v for v in short), 1.0, rel_tol=1e-9)

    legacy = {"model": "nomic-embed-text", "prompt": "hello world"}
    async with session.post(fake.url + "/api/embeddings", json=legacy) as resp:
        old = await resp.json()
    assert list(old) == ["embedding"]
    norm = math.sqrt(sum(v * v for v in old["embedding"]))
    assert norm > 2.0, "legacy vectors are not normalized"
    assert all(
        math.isclose(a / norm, b, abs_tol=1e-12)
        for a, b in zip(old["embedding"], single["embeddings"][0], strict=True)
    )


# ------------------------------------------------------------------------------------- /v1


async def test_v1_chat_non_stream(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    payload = {"model": "qwen3:8b", "messages": CHAT_MESSAGES}
    async with session.post(fake.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert re.fullmatch(r"chatcmpl-\d{1,3}", body["id"])
    assert body["object"] == "chat.completion" and body["system_fingerprint"] == "fp_ollama"
    assert body["model"] == "qwen3:8b" and isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": completion_text(12)},
            "finish_reason": "stop",
        }
    ]
    prompt = count_chat_prompt_tokens(CHAT_MESSAGES)
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 12, "total_tokens": prompt + 12}


async def test_v1_max_tokens_caps_but_max_completion_tokens_is_ignored(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    payload = {"model": "qwen3:8b", "messages": CHAT_MESSAGES, "max_tokens": 2}
    async with session.post(fake.url + "/v1/chat/completions", json=payload) as resp:
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "word0 word1 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2

    payload = {"model": "qwen3:8b", "messages": CHAT_MESSAGES, "max_completion_tokens": 2}
    async with session.post(fake.url + "/v1/chat/completions", json=payload) as resp:
        body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 12


async def test_v1_chat_stream_without_usage(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    payload = {"model": "qwen3:8b", "messages": CHAT_MESSAGES, "stream": True, "max_tokens": 3}
    async with session.post(fake.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        payloads = await read_sse(resp)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 4  # 3 content chunks + finish chunk, no usage chunk
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "qwen3:8b"
        assert "usage" not in chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "word0 "}
    assert chunks[1]["choices"][0]["delta"] == {"content": "word1 "}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:3])
    assert chunks[3]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]


async def test_v1_chat_stream_with_include_usage(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    payload = {
        "model": "qwen3:8b",
        "messages": CHAT_MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with session.post(fake.url + "/v1/chat/completions", json=payload) as resp:
        payloads = await read_sse(resp)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    *content, finish, usage = chunks
    assert len(content) == 12
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == completion_text(12)
    assert all("usage" not in c for c in [*content, finish])
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    prompt = count_chat_prompt_tokens(CHAT_MESSAGES)
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": prompt, "completion_tokens": 12, "total_tokens": prompt + 12}
    assert usage["id"] == finish["id"] and usage["created"] == finish["created"]


async def test_v1_completions_stream_zeroed_usage_on_every_chunk(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    payload = {
        "model": "llama3.1:8b",
        "prompt": "Once upon a time",
        "stream": True,
        "max_tokens": 4,
        "stream_options": {"include_usage": True},
    }
    async with session.post(fake.url + "/v1/completions", json=payload) as resp:
        payloads = await read_sse(resp)
    assert payloads[-1] == "[DONE]"
    *chunks, real = [json.loads(p) for p in payloads[:-1]]
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert all(c["object"] == "text_completion" and c["usage"] == zero for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks] == ["word0 ", "word1 ", "word2 ", "word3 ", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "length"]
    prompt = count_generate_prompt_tokens("Once upon a time")
    assert real["choices"] == []
    assert real["usage"] == {"prompt_tokens": prompt, "completion_tokens": 4, "total_tokens": prompt + 4}

    del payload["stream_options"]
    async with session.post(fake.url + "/v1/completions", json=payload) as resp:
        payloads = await read_sse(resp)
    assert all("usage" not in json.loads(p) for p in payloads[:-1])
    assert len(payloads) == 6  # 4 text chunks, the finish_reason chunk, [DONE]

    payload["stream"] = False
    async with session.post(fake.url + "/v1/completions", json=payload) as resp:
        body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"text": completion_text(4), "index": 0, "finish_reason": "length"}]
    assert body["usage"]["completion_tokens"] == 4


async def test_v1_embeddings(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    payload = {"model": "nomic-embed-text", "input": ["a b c", "d"]}
    async with session.post(fake.url + "/v1/embeddings", json=payload) as resp:
        body = await resp.json()
    assert body["object"] == "list" and body["model"] == "nomic-embed-text"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 768 for d in body["data"])
    tokens = count_embed_tokens("a b c") + count_embed_tokens("d")
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    async with session.post(
        fake.url + "/v1/embeddings", json={**payload, "encoding_format": "base64"}
    ) as resp:
        b64 = await resp.json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(floats, body["data"][0]["embedding"], strict=True)
    )

    async with session.post(fake.url + "/v1/embeddings", json={**payload, "input": []}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "invalid input"
    async with session.post(fake.url + "/v1/embeddings", json={**payload, "input": ""}) as resp:
        assert len((await resp.json())["data"]) == 1


async def test_v1_models_and_errors(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.url + "/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama3.1:8b", "qwen3:8b", "nomic-embed-text:latest"]
    assert all(m["object"] == "model" and m["owned_by"] == "library" for m in body["data"])

    async with session.get(fake.url + "/v1/models/qwen3:8b") as resp:
        one = await resp.json()
    assert one["id"] == "qwen3:8b" and isinstance(one["created"], int)

    not_found = {
        "error": {"message": "model 'nope' not found", "type": "not_found_error", "param": None, "code": None}
    }
    async with session.get(fake.url + "/v1/models/nope") as resp:
        assert resp.status == 404
        assert await resp.json() == not_found
    payload = {"model": "nope", "messages": CHAT_MESSAGES}
    async with session.post(fake.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 404
        assert await resp.json() == not_found
    async with session.post(
        fake.url + "/v1/chat/completions", json={"model": "qwen3:8b", "messages": []}
    ) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error" and error["message"] == "[] is too short - 'messages'"

    fake.models.clear()
    async with session.get(fake.url + "/v1/models") as resp:
        assert await resp.json() == {"object": "list", "data": None}


# ------------------------------------------------------------------------------------- Host header


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("localhost:11434", True),
        ("127.0.0.1:11434", True),
        ("[::1]:11434", True),
        ("::1", True),
        ("10.1.2.3", True),
        ("192.168.1.20:80", True),
        ("0.0.0.0", True),
        ("ollama.internal:11434", True),
        ("box.local", True),
        ("app.localhost", True),
        ("", True),
        ("api.example.com", False),
        ("api.example.com:443", False),
        ("8.8.8.8", False),
        ("localhost.evil.com", False),
    ],
)
def test_host_allowed(host: str, allowed: bool) -> None:
    assert host_allowed(host, machine_hostname="buildbox") is allowed


async def test_host_check_gives_empty_403(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.url + "/api/tags", headers={"Host": "api.example.com"}) as resp:
        assert resp.status == 403
        assert await resp.read() == b""
    assert fake.requests[-1]["status"] == 403
    async with session.get(fake.url + "/api/tags", headers={"Host": "localhost"}) as resp:
        assert resp.status == 200


# ------------------------------------------------------------------------------------- request log


async def test_request_log_records_everything_but_control(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": "Bearer secret", "X-Custom": "1"}
    payload = {"model": "qwen3:8b", "messages": CHAT_MESSAGES, "stream": False}
    async with session.post(fake.url + "/api/chat", json=payload, headers=headers) as resp:
        assert resp.status == 200
    async with session.post(fake.url + "/api/pull", json={"model": "mistral:7b"}) as resp:
        assert resp.status == 200
        statuses = [line["status"] for line in await read_ndjson(resp)]
        assert statuses[-1] == "success"
    async with session.delete(fake.url + "/api/delete", json={"model": "qwen3:8b"}) as resp:
        assert resp.status == 200
    async with session.post(fake.url + "/api/show", json={"model": "llama3.1:8b"}) as resp:
        assert "modelfile" in await resp.json()
    async with session.post(fake.url + "/api/blobs/sha256:" + "a" * 64, data=b"blob") as resp:
        assert resp.status == 201
    async with session.get(fake.url + "/_fake/requests") as resp:
        remote_log = await resp.json()

    assert [(r["method"], r["path"]) for r in fake.requests] == [
        ("POST", "/api/chat"),
        ("POST", "/api/pull"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/show"),
        ("POST", "/api/blobs/sha256:" + "a" * 64),
    ]
    chat = fake.requests[0]
    assert chat["headers"]["authorization"] == "Bearer secret" and chat["headers"]["x-custom"] == "1"
    assert chat["json"] == payload
    assert chat["status"] == 200 and chat["cancelled"] is False and chat["tokens_emitted"] == 12
    assert fake.requests[-1]["json"] is None and fake.requests[-1]["body_size"] == 4
    assert remote_log == json.loads(json.dumps(fake.requests))
    assert "mistral:7b" in fake.models and "qwen3:8b" not in fake.models


# ------------------------------------------------------------------------------------- fail modes


async def test_fail_mode_500(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.fail_mode = "500"
    async with session.get(fake.url + "/api/tags") as resp:
        assert resp.status == 500
        assert await resp.json() == {"error": RUNNER_ERROR}
    payload = {"model": "qwen3:8b", "messages": CHAT_MESSAGES}
    async with session.post(fake.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 500
        error = (await resp.json())["error"]
        assert error["type"] == "api_error" and error["code"] is None
    async with session.get(fake.url + "/") as resp:
        assert resp.status == 200, "liveness stays up"


async def test_fail_mode_midstream(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.fail_mode = "midstream"
    async with session.post(
        fake.url + "/api/chat", json={"model": "qwen3:8b", "messages": CHAT_MESSAGES}
    ) as resp:
        assert resp.status == 200
        lines = await read_ndjson(resp)
    assert lines[-1] == {"error": RUNNER_ERROR}
    assert len(lines) == 7 and not any(line.get("done") for line in lines)
    assert fake.requests[-1]["tokens_emitted"] == 6

    payload = {
        "model": "qwen3:8b",
        "messages": CHAT_MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with session.post(fake.url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200
        payloads = await read_sse(resp)
    assert "[DONE]" not in payloads
    chunks = [json.loads(p) for p in payloads]
    assert chunks[-1]["model"] == "" and chunks[-1]["choices"][0]["delta"]["content"] == ""
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)
    assert all("usage" not in c for c in chunks)

    async with session.post(fake.url + "/api/chat", json={**payload, "stream": False}) as resp:
        assert resp.status == 500


async def test_fail_mode_reset_conn(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.fail_mode = "reset_conn"
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(fake.url + "/api/chat", json={"model": "qwen3:8b", "messages": []}) as resp:
            await resp.read()
    assert fake.requests[-1]["aborted"] is True and fake.requests[-1]["status"] is None
    async with session.get(fake.url + "/_fake/config") as resp:  # control endpoints keep working
        assert (await resp.json())["fail_mode"] == "reset_conn"


async def test_fail_mode_refuse_and_reset(fake: FakeOllama) -> None:
    fake.fail_mode = "refuse"
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientConnectorError):
            await client.get(fake.url + "/")
    fake.reset()
    async with aiohttp.ClientSession() as client, client.get(fake.url + "/") as resp:
        assert resp.status == 200


async def test_fail_mode_hang_until_client_gives_up(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.fail_mode = "hang"
    with pytest.raises(asyncio.TimeoutError):
        await session.get(fake.url + "/api/tags", timeout=aiohttp.ClientTimeout(total=0.3))
    await wait_for(lambda: fake.requests[-1]["cancelled"])
    assert fake.requests[-1]["status"] is None


async def test_fail_mode_validation() -> None:
    fake = FakeOllama()
    with pytest.raises(ValueError):
        fake.fail_mode = "explode"


# ------------------------------------------------------------------------------------- controls


async def test_http_control_endpoints(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    settings = {"models": ["tiny:1b", "nomic-embed-text"], "fail_mode": "500", "completion_tokens": 3}
    async with session.post(fake.url + "/_fake/config", json=settings) as resp:
        assert resp.status == 200
        config = await resp.json()
    assert config["models"] == ["tiny:1b", "nomic-embed-text"] and config["fail_mode"] == "500"
    async with session.get(fake.url + "/api/tags") as resp:
        assert resp.status == 500
    async with session.post(fake.url + "/_fake/config", json={"fail_mode": None}) as resp:
        assert resp.status == 200
    async with session.get(fake.url + "/api/tags") as resp:
        assert [m["name"] for m in (await resp.json())["models"]] == ["tiny:1b", "nomic-embed-text:latest"]
    payload = {"model": "tiny:1b", "messages": CHAT_MESSAGES, "stream": False}
    async with session.post(fake.url + "/api/chat", json=payload) as resp:
        assert (await resp.json())["eval_count"] == 3

    for bad in ({"fail_mode": "refuse"}, {"nope": 1}, {"token_delay_s": -1}):
        async with session.post(fake.url + "/_fake/config", json=bad) as resp:
            assert resp.status == 400, bad

    async with session.get(fake.url + "/_fake/requests") as resp:
        assert [r["path"] for r in await resp.json()] == ["/api/tags", "/api/tags", "/api/chat"]
    async with session.post(fake.url + "/_fake/reset") as resp:
        assert resp.status == 200
    assert fake.requests == [] and fake.models == ["llama3.1:8b", "qwen3:8b", "nomic-embed-text:latest"]
    assert fake.fail_mode is None and fake.completion_tokens == 12


async def test_latency_and_token_delay() -> None:
    async with FakeOllama(latency_s=0.15, token_delay_s=0.02, completion_tokens=5) as fake:
        async with aiohttp.ClientSession() as client:
            started = time.monotonic()
            payload = {"model": "qwen3:8b", "messages": CHAT_MESSAGES}
            async with client.post(fake.url + "/api/chat", json=payload) as resp:
                first_byte = time.monotonic() - started
                chunks = await read_ndjson(resp)
            total = time.monotonic() - started
    assert first_byte >= 0.15
    assert total >= 0.15 + 5 * 0.02 * 0.9
    assert chunks[-1]["load_duration"] >= 150_000_000


# ------------------------------------------------------------------------------------- disconnects


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_client_disconnect_stops_generation(path: str) -> None:
    async with FakeOllama(token_delay_s=0.03, completion_tokens=200) as fake:
        async with aiohttp.ClientSession() as client:
            payload = {"model": "qwen3:8b", "messages": CHAT_MESSAGES, "stream": True}
            resp = await client.post(fake.url + path, json=payload)
            assert resp.status == 200
            await resp.content.readline()
            resp.close()  # drop the connection mid-stream
            await wait_for(lambda: fake.requests[-1]["cancelled"])
        entry = fake.requests[-1]
        emitted = entry["tokens_emitted"]
        assert 1 <= emitted < 200
        await asyncio.sleep(0.1)
        assert entry["tokens_emitted"] == emitted, "generation stopped"


# ------------------------------------------------------------------------------------- CLI


async def test_cli_runs_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fake_ollama",
        "--port",
        "0",
        "--fast",
        "--models",
        "a:1b,b:2b",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        async with aiohttp.ClientSession() as client, client.get(match.group(1) + "/api/tags") as resp:
            assert [m["name"] for m in (await resp.json())["models"]] == ["a:1b", "b:2b"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_coalesced_fast_path_sends_the_same_frames() -> None:
    async with FakeOllama(coalesce=True, completion_tokens=4) as fake, aiohttp.ClientSession() as client:
        payload: dict[str, Any] = {"model": "qwen3:8b", "messages": CHAT_MESSAGES}
        async with client.post(fake.url + "/api/chat", json=payload) as resp:
            *content, final = await read_ndjson(resp)
        assert [c["message"]["content"] for c in content] == ["word0 ", "word1 ", "word2 ", "word3 "]
        assert_final_metrics(final, count_chat_prompt_tokens(CHAT_MESSAGES), 4)
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        async with client.post(fake.url + "/v1/chat/completions", json=payload) as resp:
            payloads = await read_sse(resp)
        assert len(payloads) == 4 + 1 + 1 + 1 and payloads[-1] == "[DONE]"
        assert fake.requests[-1]["tokens_emitted"] == 4


async def test_spaced_json_mode_writes_the_same_json_with_spaces(fake: FakeOllama,
                                                                  session: aiohttp.ClientSession) -> None:
    fake.spaced_json = True
    body = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(fake.url + "/api/chat", json=body) as resp:
        raw = await resp.read()
    lines = raw.split(b"\n")[:-1]
    assert lines and all(b'"done": ' in line for line in lines), lines[:2]
    assert json.loads(lines[-1])["done"] is True
    async with session.post(fake.url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
        text = await resp.text()
    assert '"object": "chat.completion.chunk"' in text and text.rstrip().endswith("data: [DONE]")
    async with session.post(fake.url + "/api/chat", json={**body, "stream": False}) as resp:
        assert b'"done": true' in await resp.read()
