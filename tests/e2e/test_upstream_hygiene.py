"""What reaches Ollama and what comes back from it (SPEC §3.2 to §3.4, §4.9): only allowlisted calls
built by the gateway itself, no caller headers, no server controls, no raw upstream errors, and
streams relayed chunk by chunk and stopped when the caller leaves."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway_core.limits import Limits
from tests.e2e.harness import Gateway
from tests.fake_ollama import RUNNER_ERROR, completion_text

CHAT = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "stream": False}
DANGEROUS = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/show", "/api/ps",
             "/api/blobs/sha256:abc")
ERROR_KEYS = {"message", "type", "param", "code"}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def upstream(gw: Gateway, *, but: tuple[str, ...] = ("/api/tags",)) -> list[dict[str, Any]]:
    """The fake's request log without the gateway's own discovery polls."""
    return [r for r in gw.fake.requests if r["path"] not in but]


def assert_error(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["code"] == code, body


@pytest.mark.parametrize("with_key", [False, True])
async def test_dangerous_ollama_endpoints_are_404_and_never_forwarded(gateway: Gateway,
                                                                      with_key: bool) -> None:
    secret, _, _ = await gateway.key(allow_all=True)
    headers = bearer(secret) if with_key else {}
    tricks = ("/api//pull", "/API/PULL", "/api/%70ull", "/api/chat/../pull", "/v1/../api/delete",
              "/api/blobs/sha256:abc/../../pull", "/api/pull/", "/api/pull?name=llama3.1")
    async with aiohttp.ClientSession() as http:
        for path in DANGEROUS + tricks:
            for method in ("GET", "HEAD", "POST", "DELETE"):
                url = URL(gateway.url + path, encoded=True)
                async with http.request(method, url, headers=headers,
                                        json={"model": "llama3.1:8b", "name": "x", "source": "a"}) as resp:
                    assert resp.status == 404, (method, path, resp.status)
                    assert resp.headers.get("X-Request-Id")
                    if method != "HEAD":
                        assert_error(await resp.json(), "not_found")
    assert upstream(gateway) == []


async def test_unknown_paths_are_404_in_the_error_shape_before_authentication(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    paths = [("GET", "/"), ("GET", "/metrics"), ("GET", "/v1/files"), ("POST", "/v1/responses"),
             ("GET", "/api/unknown"), ("POST", "/v2/chat/completions"), ("POST", "/v1/chat/completions/x"),
             ("GET", "/api/chat"), ("DELETE", "/api/tags"), ("PUT", "/v1/embeddings")]
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer nope"}, bearer(secret)):
            for method, path in paths:
                async with http.request(method, gateway.url + path, headers=headers) as resp:
                    assert resp.status == 404, (method, path)
                    assert resp.content_type == "application/json"
                    assert_error(await resp.json(), "not_found")
    assert upstream(gateway) == []


async def test_caller_headers_never_go_upstream(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    caller = {**bearer(secret), "Cookie": "session=s3cr3t-cookie", "X-Custom-Header": "custom-value",
              "X-Forwarded-For": "203.0.113.7", "User-Agent": "caller-agent/1.0", "Host": "evil.example:1234",
              "Proxy-Authorization": "Basic cHJveHk6cHc=", "X-Request-Id": "trace-abc"}
    embed = {"model": "nomic-embed-text:latest", "input": "hello"}
    calls = [("/v1/chat/completions", CHAT), ("/v1/chat/completions", {**CHAT, "stream": True}),
             ("/v1/completions", {"model": "llama3.1:8b", "prompt": "hi"}),
             ("/api/chat", CHAT), ("/api/chat", {**CHAT, "stream": True}),
             ("/api/generate", {"model": "llama3.1:8b", "prompt": "hi", "stream": False}),
             ("/v1/embeddings", embed), ("/api/embed", embed),
             ("/api/embeddings", {"model": "nomic-embed-text:latest", "prompt": "hello"})]
    async with aiohttp.ClientSession() as http:
        for path, payload in calls:
            async with http.post(gateway.url + path, headers=caller, json=payload) as resp:
                assert resp.status == 200, (path, await resp.text())
                await resp.read()
        async with http.get(gateway.url + "/api/version", headers=caller) as resp:
            assert resp.status == 200
    sent = upstream(gateway, but=())
    assert {r["path"] for r in sent} >= {p for p, _ in calls} | {"/api/version"}
    for r in sent:
        # No Accept-Encoding either: answers are relayed byte for byte, so none may come compressed.
        assert set(r["headers"]) <= {"host", "accept", "content-type", "content-length"}, r
        assert r["headers"]["host"] == f"127.0.0.1:{gateway.fake.port}"
        flat = json.dumps(r["headers"]) + json.dumps(r["json"])
        for leaked in (secret, "s3cr3t", "custom-value", "203.0.113.7", "caller-agent", "evil.example",
                       "trace-abc"):
            assert leaked not in flat, (leaked, r)


async def test_server_controls_and_runner_options_are_not_forwarded(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    options = {"num_ctx": 65536, "num_gpu": 99, "num_thread": 64, "num_batch": 4096, "use_mmap": False,
               "temperature": 0.3, "num_predict": 5, "seed": 7}
    async with aiohttp.ClientSession() as http:
        for path, payload in [
            ("/api/chat", {**CHAT, "keep_alive": "24h", "options": options}),
            ("/api/generate", {"model": "llama3.1:8b", "prompt": "hi", "stream": False, "keep_alive": -1,
                               "options": options}),
            ("/api/embed", {"model": "nomic-embed-text:latest", "input": "x", "keep_alive": 0,
                            "options": {"num_ctx": 8192}}),
            ("/v1/chat/completions", {**CHAT, "keep_alive": "24h"}),
        ]:
            async with http.post(gateway.url + path, headers=bearer(secret), json=payload) as resp:
                assert resp.status == 200, (path, await resp.text())
                body = await resp.json()
            if path == "/api/chat":
                assert body["eval_count"] == 5  # the caller's own num_predict still applies
    for r in upstream(gateway):
        assert "keep_alive" not in r["json"], r
        sent_options = r["json"].get("options") or {}
        assert not {"num_ctx", "num_gpu", "num_thread", "num_batch", "use_mmap"} & set(sent_options), r
        if r["path"] in ("/api/chat", "/api/generate"):
            assert sent_options == {"temperature": 0.3, "num_predict": 5, "seed": 7}


async def test_oversized_and_invalid_bodies(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    limit = gateway.settings.max_request_bytes

    def chat_of_size(size: int) -> bytes:
        frame = json.dumps({**CHAT, "messages": [{"role": "user", "content": ""}]}).encode()
        return frame.replace(b'"content": ""', b'"content": "' + b"a" * (size - len(frame)) + b'"')

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1 << 16):
            yield data[i:i + (1 << 16)]

    too_big = chat_of_size(limit + 1)
    at_limit = chat_of_size(limit)
    assert len(too_big) == limit + 1 and len(at_limit) == limit
    invalid = [b"{not json", b"", b"[]", b'"model"', json.dumps({"messages": CHAT["messages"]}).encode(),
               json.dumps({**CHAT, "model": ""}).encode(), json.dumps({**CHAT, "model": 7}).encode()]
    json_ct = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        for url in (gateway.v1 + "/chat/completions", gateway.url + "/api/chat"):
            for headers in (bearer(secret), {}):  # size is checked before authentication (SPEC §4.1)
                for data in (too_big, chunked(too_big)):
                    async with http.post(url, data=data, headers={**headers, **json_ct}) as resp:
                        assert resp.status == 413, url
                        assert_error(await resp.json(), "request_too_large")
                        assert resp.headers.get("X-Request-Id")
            for raw in invalid:
                async with http.post(url, data=raw, headers={**bearer(secret), **json_ct}) as resp:
                    assert resp.status == 400, (url, raw)
                    assert_error(await resp.json(), "invalid_request")
        assert upstream(gateway) == []
        async with http.post(gateway.v1 + "/chat/completions", data=at_limit,
                             headers={**bearer(secret), **json_ct}) as resp:
            assert resp.status == 200  # exactly MAX_REQUEST_BYTES is still accepted
            await resp.read()


async def test_every_response_carries_a_request_id(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=("llama3.1:8b",))
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("POST", "/v1/chat/completions", bearer(secret), CHAT),                      # 200
        ("POST", "/v1/chat/completions", bearer(secret), {**CHAT, "stream": True}),  # 200 SSE
        ("POST", "/api/chat", bearer(secret), {**CHAT, "stream": True}),             # 200 NDJSON
        ("GET", "/v1/models", bearer(secret), None),                                 # 200
        ("POST", "/v1/chat/completions", {}, CHAT),                                  # 401
        ("POST", "/v1/chat/completions", bearer(secret), {**CHAT, "model": "qwen3:8b"}),  # 403
        ("POST", "/api/chat", bearer(secret), {"messages": []}),                     # 400
        ("GET", "/nope", {}, None),                                                  # 404
        ("GET", "/healthz", {}, None),
        ("GET", "/readyz", {}, None),
    ]
    async with aiohttp.ClientSession() as http:
        for method, path, headers, payload in requests:
            for given, echoed in (("req-42.abc:XYZ_1", True), ("has spaces", False), ("x" * 200, False),
                                  (None, False)):
                extra = {"X-Request-Id": given} if given else {}
                async with http.request(method, gateway.url + path, headers={**headers, **extra},
                                        json=payload) as resp:
                    await resp.read()
                    got = resp.headers.get("X-Request-Id")
                    assert got and REQUEST_ID.match(got), (path, resp.status, got)
                    assert (got == given) is echoed, (path, given, got)
        # Two requests without an id get two different ones.
        ids = set()
        for _ in range(2):
            async with http.get(gateway.url + "/healthz") as resp:
                ids.add(resp.headers["X-Request-Id"])
        assert len(ids) == 2


async def test_upstream_errors_become_502_without_the_upstream_text(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    gateway.fake.fail_mode = "500"
    calls = [("/v1/chat/completions", CHAT), ("/api/chat", {**CHAT, "stream": True}),
             ("/api/embed", {"model": "nomic-embed-text:latest", "input": "x"})]
    async with aiohttp.ClientSession() as http:
        for path, payload in calls:
            async with http.post(gateway.url + path, headers=bearer(secret), json=payload) as resp:
                raw = await resp.read()
                assert resp.status == 502, (path, raw)
                assert_error(json.loads(raw), "upstream_unavailable")
                assert int(resp.headers["Retry-After"]) >= 1
                assert int(resp.headers["retry-after-ms"]) >= 1
                assert resp.headers.get("X-Request-Id")
                text = raw.decode().lower()
                for leaked in (RUNNER_ERROR.lower(), "runner", "ollama server", "127.0.0.1",
                               str(gateway.fake.port)):
                    assert leaked not in text, (path, leaked, text)
    assert {r["path"] for r in upstream(gateway)} == {p for p, _ in calls}  # the upstream was really asked
    assert all(r["status"] == 500 for r in upstream(gateway))


async def _timed_stream(http: aiohttp.ClientSession, url: str, secret: str, payload: dict[str, Any]
                        ) -> tuple[float, float, list[bytes]]:
    started = time.monotonic()
    first: float | None = None
    lines: list[bytes] = []
    async with http.post(url, headers=bearer(secret), json=payload) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            if raw.strip():
                if first is None:
                    first = time.monotonic() - started
                lines.append(raw.strip())
    assert first is not None
    return first, time.monotonic() - started, lines


async def test_streams_are_relayed_as_they_are_produced(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    gateway.fake.token_delay_s = 0.2  # 12 tokens: the upstream needs ~2.4 s for the whole answer
    stream = {**CHAT, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.v1 + "/models", headers=bearer(secret)) as resp:
            assert resp.status == 200  # the key is verified once, outside the measurement
        (sse_first, sse_total, sse), (nd_first, nd_total, nd) = await asyncio.gather(
            _timed_stream(http, gateway.v1 + "/chat/completions", secret, stream),
            _timed_stream(http, gateway.url + "/api/chat", secret, stream))
    for first, total in ((sse_first, sse_total), (nd_first, nd_total)):
        assert first < 0.8, first
        assert total > 2.0, total

    assert sse[-1] == b"data: [DONE]"
    chunks = [json.loads(line[len(b"data: "):]) for line in sse[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == completion_text(12)

    lines = [json.loads(line) for line in nd]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 12
    assert "".join(line["message"]["content"] for line in lines) == completion_text(12)


async def _leave_after(http: aiohttp.ClientSession, url: str, secret: str, payload: dict[str, Any],
                       chunks: int) -> None:
    async with http.post(url, headers=bearer(secret), json=payload) as resp:
        assert resp.status == 200
        seen = 0
        async for raw in resp.content:
            seen += bool(raw.strip())
            if seen >= chunks:
                break
        resp.close()  # drop the connection mid-stream, as a client that goes away does


async def _seconds_until(condition: Callable[[], bool], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            break
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_client_that_disconnects_stops_the_upstream_generation(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(key_limits=Limits(concurrent=2))
    gateway.fake.token_delay_s = 0.2
    stream = {**CHAT, "stream": True}
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(_leave_after(http, gateway.v1 + "/chat/completions", secret, stream, 2),
                             _leave_after(http, gateway.url + "/api/chat", secret, stream, 2))
        entries = upstream(gateway)
        assert {e["path"] for e in entries} == {"/v1/chat/completions", "/api/chat"}
        stopped = await _seconds_until(lambda: all(e["cancelled"] for e in entries), timeout_s=3.0)
        assert all(e["cancelled"] for e in entries), entries
        assert stopped < 1.0, stopped
        assert all(e["tokens_emitted"] <= 6 for e in entries), [e["tokens_emitted"] for e in entries]

        # The abandoned streams gave their concurrency slots back: two more fit at once.
        gateway.fake.token_delay_s = 0.0
        for resp in await asyncio.gather(*(http.post(gateway.v1 + "/chat/completions", headers=bearer(secret),
                                                     json=CHAT) for _ in range(2))):
            assert resp.status == 200, await resp.text()
            resp.release()
