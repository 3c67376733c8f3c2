"""The official `ollama` Python client, unchanged, against a whole gateway (SPEC §3.2, §4.9).

The client only adds `Authorization: Bearer <key>`. Assertions are about what its user sees: typed
responses, usage counts in the final part, `ollama.ResponseError` with the HTTP status, a stream that
fails loudly, and the tokens the gateway audits for the request. The fake upstream is deterministic:
a completion is ``completion_text(12)`` (12 tokens).
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import ollama
import pytest

from gateway_core.models import Scope
from tests.e2e.harness import Gateway, audit_row
from tests.fake_ollama import (
    RUNNER_ERROR,
    completion_text,
    count_chat_prompt_tokens,
    count_embed_tokens,
    count_generate_prompt_tokens,
    embedding_dimension,
)

CHAT_MODEL = "llama3.1:8b"
EMBED_MODEL = "nomic-embed-text:latest"
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
PROMPT = "Once upon a time"
N_TOKENS = 12  # the fake's completion length
PROMPT_TOKENS = count_chat_prompt_tokens(MESSAGES)


def _client(gateway: Gateway, secret: str, request_id: str | None = None) -> ollama.AsyncClient:
    headers = {"Authorization": f"Bearer {secret}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id  # the gateway adopts a well-formed caller id (SPEC §3.4)
    return ollama.AsyncClient(host=gateway.url, headers=headers)


def _request_id() -> str:
    return f"ollama-e2e-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- chat


async def test_chat_plain(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    rid = _request_id()
    response = await _client(gateway, secret, rid).chat(model=CHAT_MODEL, messages=MESSAGES, stream=False)

    assert response.done is True and response.done_reason == "stop"
    assert response.message.role == "assistant"
    assert response.message.content == completion_text(N_TOKENS)
    assert (response.prompt_eval_count, response.eval_count) == (PROMPT_TOKENS, N_TOKENS)
    row = await audit_row(gateway, rid)
    assert row == {"route": "/api/chat", "model": CHAT_MODEL, "status": 200,
                   "tokens_in": response.prompt_eval_count, "tokens_out": response.eval_count}
    (upstream,) = [r for r in gateway.fake.requests if r["path"] == "/api/chat"]
    assert "authorization" not in upstream["headers"]  # the caller's key never goes upstream


async def test_chat_streaming_final_part_carries_usage(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    rid = _request_id()
    parts = [part async for part in await _client(gateway, secret, rid).chat(
        model=CHAT_MODEL, messages=MESSAGES, stream=True)]

    final = parts[-1]
    assert final.done is True and final.done_reason == "stop"
    assert all(not part.done for part in parts[:-1])
    assert "".join(part.message.content or "" for part in parts) == completion_text(N_TOKENS)
    assert (final.prompt_eval_count, final.eval_count) == (PROMPT_TOKENS, N_TOKENS)
    assert all(part.eval_count is None for part in parts[:-1])
    row = await audit_row(gateway, rid)
    assert (row["status"], row["tokens_in"], row["tokens_out"]) == (200, final.prompt_eval_count,
                                                                    final.eval_count)


async def test_chat_num_predict_caps_the_completion(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    response = await _client(gateway, secret).chat(model=CHAT_MODEL, messages=MESSAGES, stream=False,
                                                   options={"num_predict": 3})
    assert response.message.content == completion_text(3)
    assert (response.eval_count, response.done_reason) == (3, "length")


# ---------------------------------------------------------------- generate


async def test_generate_plain(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    rid = _request_id()
    response = await _client(gateway, secret, rid).generate(model=CHAT_MODEL, prompt=PROMPT, stream=False)

    assert response.done is True and response.done_reason == "stop"
    assert response.response == completion_text(N_TOKENS)
    assert response.prompt_eval_count == count_generate_prompt_tokens(PROMPT)
    assert response.eval_count == N_TOKENS
    row = await audit_row(gateway, rid)
    assert (row["route"], row["tokens_in"], row["tokens_out"]) == (
        "/api/generate", response.prompt_eval_count, response.eval_count)


async def test_generate_streaming(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    rid = _request_id()
    parts = [part async for part in await _client(gateway, secret, rid).generate(
        model=CHAT_MODEL, prompt=PROMPT, stream=True)]

    final = parts[-1]
    assert final.done is True
    assert "".join(part.response for part in parts) == completion_text(N_TOKENS)
    assert (final.prompt_eval_count, final.eval_count) == (count_generate_prompt_tokens(PROMPT), N_TOKENS)
    row = await audit_row(gateway, rid)
    assert (row["tokens_in"], row["tokens_out"]) == (final.prompt_eval_count, final.eval_count)


# ---------------------------------------------------------------- embed and list


async def test_embed(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    rid = _request_id()
    inputs = ["first input", "a second, longer input text"]
    response = await _client(gateway, secret, rid).embed(model=EMBED_MODEL, input=inputs)

    assert len(response.embeddings) == 2
    assert all(len(vector) == embedding_dimension(EMBED_MODEL) for vector in response.embeddings)
    expected = sum(count_embed_tokens(text) for text in inputs)
    assert response.prompt_eval_count == expected
    row = await audit_row(gateway, rid)
    assert (row["route"], row["tokens_in"], row["tokens_out"]) == ("/api/embed", expected, 0)


async def test_list_is_the_effective_set_only(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=("llama3.1:8b", "gpt-oss:20b-cloud", "mistral:7b"))
    listed = await _client(gateway, secret).list()
    assert sorted(m.model or "" for m in listed.models) == ["gpt-oss:20b-cloud", "llama3.1:8b"]

    secret, _, _ = await gateway.key(models=(), allow_all=True)
    listed = await _client(gateway, secret).list()
    assert sorted(m.model or "" for m in listed.models) == ["llama3.1:8b", "nomic-embed-text:latest",
                                                            "qwen3:8b"]
    assert all(m.size and m.digest for m in listed.models)  # the upstream's metadata, not bare names


# ---------------------------------------------------------------- errors


async def test_errors_are_response_errors_with_status(gateway: Gateway) -> None:
    wrong_key = "nz_" + secrets.token_urlsafe(32)  # well-formed, but no such key
    wrong = ollama.AsyncClient(host=gateway.url, headers={"Authorization": f"Bearer {wrong_key}"})
    with pytest.raises(ollama.ResponseError) as unauthenticated:
        await wrong.chat(model=CHAT_MODEL, messages=MESSAGES, stream=False)
    assert unauthenticated.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as unauthenticated_list:
        await wrong.list()
    assert unauthenticated_list.value.status_code == 401

    secret, _, _ = await gateway.key()
    client = _client(gateway, secret)
    with pytest.raises(ollama.ResponseError) as not_allowed:
        await client.chat(model="qwen3:8b", messages=MESSAGES, stream=False)
    assert not_allowed.value.status_code == 403
    with pytest.raises(ollama.ResponseError) as not_allowed_stream:
        async for _ in await client.generate(model="qwen3:8b", prompt=PROMPT, stream=True):
            pass
    assert not_allowed_stream.value.status_code == 403

    secret, _, _ = await gateway.key(scopes=frozenset({Scope.EMBEDDINGS}))
    with pytest.raises(ollama.ResponseError) as no_scope:
        await _client(gateway, secret).chat(model=CHAT_MODEL, messages=MESSAGES, stream=False)
    assert no_scope.value.status_code == 403
    assert "scope_not_allowed" in str(no_scope.value)
    assert not [r for r in gateway.fake.requests if r["path"] in ("/api/chat", "/api/generate")]


async def test_management_endpoints_are_not_forwarded(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    client = _client(gateway, secret)
    with pytest.raises(ollama.ResponseError) as show:
        await client.show(CHAT_MODEL)
    with pytest.raises(ollama.ResponseError) as pull:
        await client.pull("qwen3:8b", stream=False)
    with pytest.raises(ollama.ResponseError) as delete:
        await client.delete(CHAT_MODEL)
    assert show.value.status_code == pull.value.status_code == delete.value.status_code == 404
    assert not [r for r in gateway.fake.requests if r["path"] in ("/api/show", "/api/pull", "/api/delete")]


@pytest.mark.parametrize("route", ["chat", "generate"])
async def test_midstream_failure_raises_response_error(gateway: Gateway, route: str) -> None:
    secret, _, _ = await gateway.key()
    rid = _request_id()
    client = _client(gateway, secret, rid)
    gateway.fake.fail_mode = "midstream"
    stream: Any
    if route == "chat":
        stream = await client.chat(model=CHAT_MODEL, messages=MESSAGES, stream=True)
    else:
        stream = await client.generate(model=CHAT_MODEL, prompt=PROMPT, stream=True)
    received = []
    with pytest.raises(ollama.ResponseError) as caught:
        async for part in stream:
            received.append(part)

    assert received and not any(part.done for part in received)
    assert RUNNER_ERROR not in str(caught.value)
    row = await audit_row(gateway, rid)
    assert row["status"] == 502
    assert row["tokens_out"] == len(received)  # what was produced is still charged (SPEC §4.8)


async def test_upstream_500_is_502_response_error(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    gateway.fake.fail_mode = "500"
    with pytest.raises(ollama.ResponseError) as caught:
        await _client(gateway, secret).chat(model=CHAT_MODEL, messages=MESSAGES, stream=False)
    assert caught.value.status_code == 502
    assert RUNNER_ERROR not in str(caught.value)
