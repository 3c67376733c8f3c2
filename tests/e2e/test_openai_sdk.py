"""The official OpenAI Python SDK, unchanged, against a whole gateway (SPEC §3, §4.9).

Every assertion is about what an SDK user sees: return types, the SDK's own exception classes and their
`code`, headers on the response, how a stream ends, and the tokens the gateway audits for the request.
The fake upstream is deterministic: a completion is ``completion_text(12)`` (12 tokens) and prompt
counts come from the ``count_*`` helpers of ``tests.fake_ollama``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio

from gateway_core.limits import Limits
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
CLOUD_MODEL = "gpt-oss:20b-cloud"
MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
PROMPT = "Once upon a time"
N_TOKENS = 12  # the fake's completion length
PROMPT_TOKENS = count_chat_prompt_tokens(MESSAGES)


def _client(gateway: Gateway, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.v1, api_key=secret, max_retries=0)


@pytest_asyncio.fixture
async def sdk(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    """An SDK client with a key for the default models (llama3.1:8b and nomic-embed-text)."""
    secret, _, _ = await gateway.key()
    async with _client(gateway, secret) as client:
        yield client


def _upstream_calls(gateway: Gateway, path: str) -> list[dict[str, Any]]:
    return [r for r in gateway.fake.requests if r["path"] == path]


def _wrong_key() -> str:
    return "nz_" + secrets.token_urlsafe(32)  # well-formed, but no such key


# ---------------------------------------------------------------- chat completions


async def test_chat_completion_plain_with_usage_request_id_and_audit(gateway: Gateway,
                                                                     sdk: openai.AsyncOpenAI) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    completion = raw.parse()

    assert completion.object == "chat.completion"
    assert completion.model == CHAT_MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == completion_text(N_TOKENS)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.total_tokens) == (PROMPT_TOKENS, N_TOKENS, PROMPT_TOKENS + N_TOKENS)
    request_id = raw.headers.get("x-request-id")
    assert request_id and completion._request_id == request_id
    assert raw.headers.get("x-ratelimit-limit-requests") is not None

    row = await audit_row(gateway, request_id)
    assert row == {"route": "/v1/chat/completions", "model": CHAT_MODEL, "status": 200,
                   "tokens_in": completion.usage.prompt_tokens,
                   "tokens_out": completion.usage.completion_tokens}
    # The caller's key never goes upstream (SPEC §4.9).
    (upstream,) = _upstream_calls(gateway, "/v1/chat/completions")
    assert "authorization" not in upstream["headers"]


async def test_caller_request_id_is_echoed(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES,
                                                   extra_headers={"X-Request-Id": "caller-id-42"})
    assert completion._request_id == "caller-id-42"


async def test_chat_stream_without_include_usage_has_no_usage_and_ends_normally(
        gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True)
    request_id = stream.response.headers.get("x-request-id")
    assert request_id
    assert stream.response.headers.get("content-type", "").startswith("text/event-stream")
    assert stream.response.headers.get("x-ratelimit-remaining-requests") is not None  # initial headers
    chunks = [chunk async for chunk in stream]  # raises if the stream ended with an error

    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks), "no usage-only chunk was asked for"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == completion_text(N_TOKENS)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The client saw no usage, but the gateway still charges the upstream's real counts.
    row = await audit_row(gateway, request_id)
    assert (row["status"], row["tokens_in"], row["tokens_out"]) == (200, PROMPT_TOKENS, N_TOKENS)


async def test_chat_stream_with_include_usage_has_exactly_one_final_usage_chunk(
        gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True,
                                               stream_options={"include_usage": True})
    request_id = stream.response.headers.get("x-request-id")
    chunks = [chunk async for chunk in stream]

    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1
    final = chunks[-1]
    assert final is with_usage[0]
    assert final.choices == []
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens,
            final.usage.total_tokens) == (PROMPT_TOKENS, N_TOKENS, PROMPT_TOKENS + N_TOKENS)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == completion_text(N_TOKENS)

    row = await audit_row(gateway, request_id)
    assert (row["tokens_in"], row["tokens_out"]) == (final.usage.prompt_tokens, final.usage.completion_tokens)


async def test_max_completion_tokens_is_honoured(gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES,
                                                   max_completion_tokens=3)
    assert completion.choices[0].message.content == completion_text(3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3

    stream = await sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True,
                                               max_completion_tokens=3)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == completion_text(3)
    assert chunks[-1].choices[0].finish_reason == "length"

    row = await audit_row(gateway, completion._request_id or "")
    assert row["tokens_out"] == 3


# ---------------------------------------------------------------- legacy completions


async def test_completion_plain(gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.completions.create(model=CHAT_MODEL, prompt=PROMPT)

    assert completion.object == "text_completion"
    assert completion.choices[0].text == completion_text(N_TOKENS)
    assert completion.choices[0].finish_reason == "stop"
    prompt_tokens = count_generate_prompt_tokens(PROMPT)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, N_TOKENS)
    row = await audit_row(gateway, completion._request_id or "")
    assert (row["route"], row["tokens_in"], row["tokens_out"]) == ("/v1/completions", prompt_tokens, N_TOKENS)


async def test_completion_stream_without_include_usage_shows_no_usage_field(
        gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.completions.create(model=CHAT_MODEL, prompt=PROMPT, stream=True)
    request_id = stream.response.headers.get("x-request-id")
    chunks = [chunk async for chunk in stream]

    # Upstream usage is always requested by the gateway; Ollama then puts a zeroed usage on every chunk.
    # A caller who did not ask must see neither those nor the final usage chunk.
    assert chunks and all("usage" not in chunk.model_fields_set for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].text for c in chunks) == completion_text(N_TOKENS)
    assert chunks[-1].choices[0].finish_reason == "stop"
    row = await audit_row(gateway, request_id)
    assert (row["tokens_in"], row["tokens_out"]) == (count_generate_prompt_tokens(PROMPT), N_TOKENS)


async def test_completion_stream_with_include_usage_ends_with_real_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.completions.create(model=CHAT_MODEL, prompt=PROMPT, stream=True,
                                          stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    # Ollama repeats a zeroed usage on every chunk; as with OpenAI, only the final chunk may carry one.
    final = chunks[-1]
    assert [c for c in chunks if "usage" in c.model_fields_set and c.usage is not None] == [final]
    assert final.choices == []
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (
        count_generate_prompt_tokens(PROMPT), N_TOKENS)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == completion_text(N_TOKENS)


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize("given", ["the quick brown fox", ["first input", "a second, longer input text"]])
async def test_embeddings(gateway: Gateway, sdk: openai.AsyncOpenAI, given: str | list[str]) -> None:
    result = await sdk.embeddings.create(model=EMBED_MODEL, input=given)

    inputs = [given] if isinstance(given, str) else given
    assert [d.index for d in result.data] == list(range(len(inputs)))
    assert all(len(d.embedding) == embedding_dimension(EMBED_MODEL) for d in result.data)
    expected = sum(count_embed_tokens(text) for text in inputs)
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (expected, expected)
    row = await audit_row(gateway, result._request_id or "")
    assert (row["route"], row["tokens_in"], row["tokens_out"]) == ("/v1/embeddings", expected, 0)


# ---------------------------------------------------------------- models


async def test_models_list_is_the_effective_set_only(gateway: Gateway) -> None:
    # Allowlist: an installed model, the cloud model named explicitly, and one that is not installed.
    secret, _, _ = await gateway.key(models=(CHAT_MODEL, CLOUD_MODEL, "mistral:7b"))
    async with _client(gateway, secret) as client:
        listed = sorted([m.id async for m in client.models.list()])
    assert listed == sorted([CHAT_MODEL, CLOUD_MODEL])

    # allow_all_models: everything discovered except the cloud model (SPEC §4.7).
    secret, _, _ = await gateway.key(models=(), allow_all=True)
    async with _client(gateway, secret) as client:
        page = await client.models.list()
        listed = sorted(m.id for m in page.data)
        assert listed == sorted(["llama3.1:8b", "qwen3:8b", "nomic-embed-text:latest"])
        assert all(m.object == "model" and m.owned_by for m in page.data)
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(CLOUD_MODEL)
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(model=CLOUD_MODEL, messages=MESSAGES)
        assert denied.value.code == "model_not_allowed"
    assert not _upstream_calls(gateway, "/v1/chat/completions")


async def test_models_retrieve_allowed_and_not_allowed(sdk: openai.AsyncOpenAI) -> None:
    model = await sdk.models.retrieve(CHAT_MODEL)
    assert (model.id, model.object) == (CHAT_MODEL, "model")

    with pytest.raises(openai.NotFoundError) as not_allowed:
        await sdk.models.retrieve("qwen3:8b")  # installed, but not in this tenant's allowlist
    with pytest.raises(openai.NotFoundError) as unknown:
        await sdk.models.retrieve("no-such-model:1b")
    assert not_allowed.value.status_code == unknown.value.status_code == 404
    assert not_allowed.value.code == "model_not_found"
    assert not_allowed.value.body == unknown.value.body  # no enumeration


# ---------------------------------------------------------------- errors as the SDK's own classes


async def test_wrong_key_is_authentication_error(gateway: Gateway) -> None:
    bodies = []
    for key in (_wrong_key(), "not-a-key"):
        async with _client(gateway, key) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        assert caught.value.request_id
        bodies.append(caught.value.body)
    assert bodies[0] == bodies[1]  # one answer for every cause
    assert not _upstream_calls(gateway, "/v1/chat/completions")


async def test_model_not_allowed_is_permission_denied(gateway: Gateway, sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.PermissionDeniedError) as not_allowed:
        await sdk.chat.completions.create(model="qwen3:8b", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as unknown:
        await sdk.chat.completions.create(model="no-such-model:1b", messages=MESSAGES)
    assert not_allowed.value.status_code == 403
    assert not_allowed.value.code == unknown.value.code == "model_not_allowed"
    assert not_allowed.value.body == unknown.value.body
    assert not _upstream_calls(gateway, "/v1/chat/completions")


async def test_scope_not_allowed_is_permission_denied(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(scopes=frozenset({Scope.EMBEDDINGS}))
    async with _client(gateway, secret) as client:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
        assert caught.value.status_code == 403
        assert caught.value.code == "scope_not_allowed"
        with pytest.raises(openai.PermissionDeniedError):
            await client.completions.create(model=CHAT_MODEL, prompt=PROMPT)
        result = await client.embeddings.create(model=EMBED_MODEL, input="still allowed")
        assert len(result.data) == 1


async def test_rate_limit_is_rate_limit_error_with_retry_headers(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(key_limits=Limits(rpm=1))
    async with _client(gateway, secret) as client:
        first = await client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
        assert first.headers.get("x-ratelimit-limit-requests") == "1"
        assert first.headers.get("x-ratelimit-remaining-requests") == "0"
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)

    exc = caught.value
    assert exc.status_code == 429
    assert exc.code == "rate_limit_exceeded"
    retry_after = exc.response.headers.get("retry-after")
    retry_after_ms = exc.response.headers.get("retry-after-ms")
    assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 60
    assert retry_after_ms is not None and retry_after_ms.isdigit()
    assert int(retry_after) * 1000 - 1000 < int(retry_after_ms) <= int(retry_after) * 1000
    assert exc.request_id
    assert len(_upstream_calls(gateway, "/v1/chat/completions")) == 1  # the denied one cost nothing


async def test_upstream_500_is_502_without_the_upstream_text(gateway: Gateway,
                                                              sdk: openai.AsyncOpenAI) -> None:
    gateway.fake.fail_mode = "500"
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)

    exc = caught.value
    assert exc.status_code == 502
    assert exc.code == "upstream_unavailable"
    assert RUNNER_ERROR not in str(exc) and "ollama" not in str(exc).lower()
    assert RUNNER_ERROR not in exc.response.text
    assert exc.response.headers.get("retry-after") is not None
    assert exc.response.headers.get("retry-after-ms") is not None
    row = await audit_row(gateway, exc.request_id or "")
    assert row["status"] == 502


@pytest.mark.parametrize("route", ["chat", "completions"])
async def test_midstream_failure_makes_stream_iteration_raise(gateway: Gateway, sdk: openai.AsyncOpenAI,
                                                             route: str) -> None:
    gateway.fake.fail_mode = "midstream"
    stream: Any
    if route == "chat":
        stream = await sdk.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True)
    else:
        stream = await sdk.completions.create(model=CHAT_MODEL, prompt=PROMPT, stream=True)
    request_id = stream.response.headers.get("x-request-id")
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk)

    (upstream,) = _upstream_calls(gateway, "/v1/chat/completions" if route == "chat" else "/v1/completions")
    produced = upstream["tokens_emitted"]
    assert produced > 0
    # The tokens produced before the failure reach the caller; Ollama's blank stand-in for its error
    # (a chunk with `"model": ""`, reference §2.3) does not.
    assert len(received) == produced, [c.model for c in received]
    assert all(c.model == CHAT_MODEL for c in received)
    assert caught.value.code == "upstream_unavailable"
    assert RUNNER_ERROR not in caught.value.message
    row = await audit_row(gateway, request_id)
    assert row["status"] == 502
    assert row["tokens_out"] == produced  # what was produced is charged, nothing more (SPEC §4.8)
