"""Admission over HTTP (SPEC §3.4, §4.2, §6): limits, budgets, ledger, across processes and Redis loss."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDict

from gateway_core.limits import Limits
from tests.e2e.harness import Gateway, gateway_settings
from tests.fake_ollama import count_chat_prompt_tokens
from tests.services import free_port, redis_client

CHAT = "/v1/chat/completions"


def _chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "llama3.1:8b", "messages": [{"role": "user", "content": content}], **extra}


async def _post(http: aiohttp.ClientSession, base: str, secret: str, path: str = CHAT,
                body: dict[str, Any] | None = None) -> tuple[int, CIMultiDict[str], Any]:
    async with http.post(base + path, json=body or _chat(),
                         headers={"Authorization": f"Bearer {secret}"}) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.json(content_type=None)


async def _ledger(gateway: Gateway, prefix: str, period: str = "total") -> tuple[int, int, int]:
    """(requests, tokens_in, tokens_out) once the batched writer has caught up."""
    await asyncio.sleep(0.5)
    with psycopg.connect(gateway.settings.database_url) as conn:
        row = conn.execute(
            "SELECT COALESCE(sum(requests),0), COALESCE(sum(tokens_in),0), COALESCE(sum(tokens_out),0)"
            " FROM gateway.budget_usage u JOIN gateway.api_keys k ON k.id = u.key_id"
            " WHERE k.prefix = %s AND u.period = %s", (prefix, period)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


class TestRateLimits:
    async def test_the_sixth_request_in_a_minute_gets_429_with_retry_after_and_headers(
        self, gateway: Gateway
    ) -> None:
        secret, _, _ = await gateway.key(key_limits=Limits(rpm=5))
        async with aiohttp.ClientSession() as http:
            seen = [await _post(http, gateway.url, secret) for _ in range(6)]
        assert [s for s, _, _ in seen] == [200] * 5 + [429]
        first, fifth, denied = seen[0][1], seen[4][1], seen[5]
        assert first["X-RateLimit-Limit-Requests"] == "5" and first["X-RateLimit-Remaining-Requests"] == "4"
        assert fifth["X-RateLimit-Remaining-Requests"] == "0"
        assert first["X-RateLimit-Reset-Requests"].endswith("s")
        assert '"rpm";q=5;w=60' in first["RateLimit-Policy"]
        status, headers, body = denied
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert "5 requests per minute" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) >= 1
        assert headers["X-RateLimit-Remaining-Requests"] == "0" and "X-Request-Id" in headers

    async def test_a_key_limit_overrides_the_tenants_and_keys_share_the_tenant_aggregate(
        self, gateway: Gateway
    ) -> None:
        a, _, tenant = await gateway.key(tenant_limits=Limits(rpm=3, tpm=1_000_000, concurrent=10))
        b, _, _ = await gateway.key(tenant=tenant)
        strict, _, _ = await gateway.key(tenant=tenant, key_limits=Limits(rpm=1))
        async with aiohttp.ClientSession() as http:
            assert (await _post(http, gateway.url, strict))[0] == 200
            assert (await _post(http, gateway.url, strict))[0] == 429  # its own rpm=1 binds first
            assert (await _post(http, gateway.url, a))[0] == 200
            assert (await _post(http, gateway.url, b))[0] == 200
            # Three requests from three keys: the tenant's rpm=3 is used up for all of them.
            assert (await _post(http, gateway.url, b))[0] == 429
            assert (await _post(http, gateway.url, a))[0] == 429

    async def test_concurrency_slots_return_after_normal_end_stream_end_and_disconnect(
        self, gateway: Gateway
    ) -> None:
        secret, _, _ = await gateway.key(key_limits=Limits(concurrent=2))
        gateway.fake.token_delay_s = 0.1
        auth = {"Authorization": f"Bearer {secret}"}
        async with aiohttp.ClientSession() as http:
            slow = [asyncio.create_task(_post(http, gateway.url, secret)) for _ in range(2)]
            await asyncio.sleep(0.3)
            status, headers, body = await _post(http, gateway.url, secret)
            assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
            assert "in flight" in body["error"]["message"]
            assert [s for s, _, _ in await asyncio.gather(*slow)] == [200, 200]
            gateway.fake.token_delay_s = 0.0
            assert (await _post(http, gateway.url, secret))[0] == 200  # normal ends returned both
            gateway.fake.token_delay_s = 0.1
            streams = []
            for _ in range(2):
                resp = await http.post(gateway.url + CHAT, json=_chat(stream=True), headers=auth)
                assert resp.status == 200
                await resp.content.readline()
                streams.append(resp)
            assert (await _post(http, gateway.url, secret))[0] == 429
            await streams[0].read()  # one stream runs to its end
            streams[1].close()  # the other caller walks away mid-stream
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 3
            while (status := (await _post(http, gateway.url, secret))[0]) != 200 \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert status == 200
            both = await asyncio.gather(_post(http, gateway.url, secret), _post(http, gateway.url, secret))
            assert [s for s, _, _ in both] == [200, 200]


class TestTwoProcesses:
    async def test_two_gateway_processes_sharing_redis_enforce_one_limit(
        self, gateway: Gateway, tmp_path: Path
    ) -> None:
        secret, _, _ = await gateway.key(key_limits=Limits(rpm=4))
        settings = gateway_settings(gateway.settings.database_url, gateway.settings.redis_url,
                                    gateway.fake.url, tmp_path)
        port = free_port()
        env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
               "OLLAMA_BASE_URL": gateway.fake.url, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
               "METRICS_PORT": str(free_port()), "AUDIT_SPOOL_DIR": str(tmp_path),
               "MODEL_DISCOVERY_REFRESH_S": "1"}
        cli = str(Path(sys.executable).with_name("neuronetz-gateway"))
        proc = subprocess.Popen([cli, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        other = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    try:
                        async with http.get(other + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                statuses = [(await _post(http, base, secret))[0]
                            for base in [gateway.url, other] * 4]
        finally:
            proc.terminate()
            proc.wait(15)
        assert sorted(statuses) == [200] * 4 + [429] * 4 and statuses[:4] == [200] * 4


class TestBudgets:
    async def test_concurrent_requests_cannot_overspend_a_total_budget(self, gateway: Gateway) -> None:
        budget = 2000
        secret, prefix, _ = await gateway.key(budget={"total": budget})
        gateway.fake.completion_tokens = 50
        content = "x" * 180  # ≈ 49 prompt tokens: with max_tokens=50 each request is about 100 tokens
        body = _chat(content, max_tokens=50)
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(*[_post(http, gateway.url, secret, body=body) for _ in range(40)])
        ok = [b for s, _, b in results if s == 200]
        denied = [b for s, _, b in results if s == 429]
        assert len(ok) + len(denied) == 40 and denied
        assert all(b["error"]["code"] == "budget_exhausted" for b in denied)
        charged = sum(b["usage"]["prompt_tokens"] + b["usage"]["completion_tokens"] for b in ok)
        # The estimate is exact for this fake, so the documented bound (prompt-estimate error of
        # the requests in flight) is 0 here.
        overspend = charged - budget
        print(f"\nbudget={budget} charged={charged} overspend={overspend} admitted={len(ok)}/40")
        assert overspend <= 0
        requests, tokens_in, tokens_out = await _ledger(gateway, prefix)
        assert (requests, tokens_in + tokens_out) == (len(ok), charged)
        expected_prompt = count_chat_prompt_tokens([{"role": "user", "content": content}])
        assert expected_prompt == ok[0]["usage"]["prompt_tokens"]

    async def test_back_to_back_requests_each_see_the_previous_settlement(self, gateway: Gateway) -> None:
        """An answer goes out before its settlement's Redis round trip ends (docs/performance.md);
        the key's next request, sent the moment the answer arrives, must still find the slot free
        (concurrent=1) and the budget moved by exactly the previous request's usage."""
        secret, _, _ = await gateway.key(key_limits=Limits(concurrent=1), budget={"daily": 1_000_000})
        body = _chat("back to back", max_tokens=40)
        remaining: list[int] = []
        used: list[int] = []
        async with aiohttp.ClientSession() as http:
            for _ in range(60):
                status, headers, answer = await _post(http, gateway.url, secret, body=body)
                assert status == 200, answer
                remaining.append(int(headers["X-Budget-Tokens-Remaining"]))
                used.append(answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"])
        # Each header is the budget left after reserving that request; the reservation is the same
        # for every one of these, so consecutive headers differ by the earlier request's real usage.
        steps = [a - b for a, b in itertools.pairwise(remaining)]
        assert steps == used[:-1]

    async def test_a_request_beyond_the_allowance_is_capped_and_the_headers_never_go_negative(
        self, gateway: Gateway
    ) -> None:
        secret, _, _ = await gateway.key(budget={"daily": 30, "total": 1000})
        gateway.fake.completion_tokens = 100  # would overrun the 30 left without the gateway's cap
        async with aiohttp.ClientSession() as http:
            status, headers, body = await _post(http, gateway.url, secret)
            assert status == 200
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= 30
            assert headers["X-Budget-Period"] == "daily" and int(headers["X-Budget-Tokens-Remaining"]) >= 0
            status, headers, body = await _post(http, gateway.url, secret)
        assert status == 429 and body["error"]["code"] == "budget_exhausted"
        assert "daily" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
        assert headers["X-Budget-Tokens-Remaining"] == "0" or int(headers["X-Budget-Tokens-Remaining"]) >= 0

    async def test_an_exhausted_total_budget_says_waiting_will_not_help(self, gateway: Gateway) -> None:
        secret, _, _ = await gateway.key(budget={"total": 3})
        async with aiohttp.ClientSession() as http:
            status, headers, body = await _post(http, gateway.url, secret)
        assert status == 429 and body["error"]["code"] == "budget_exhausted"
        assert headers["Retry-After"] == "86400" and headers["x-should-retry"] == "false"

    async def test_flushing_redis_mid_period_does_not_refill_any_budget(self, gateway: Gateway) -> None:
        secret, prefix, _ = await gateway.key(budget={"daily": 100, "monthly": 100, "total": 100})
        gateway.fake.completion_tokens = 20
        body = _chat("hello there", max_tokens=20)  # about 8 + 20 tokens each
        async with aiohttp.ClientSession() as http:
            before = [await _post(http, gateway.url, secret, body=body) for _ in range(2)]
            spent = sum(b["usage"]["total_tokens"] for s, _, b in before if s == 200)
            await _ledger(gateway, prefix)
            client = redis_client(gateway.settings.redis_url)
            await client.flushall()
            await client.aclose()
            after: list[int] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(after) < 10:
                status, _, got = await _post(http, gateway.url, secret, body=body)
                if status == 403:  # discovery is rebuilding after the flush: fail-closed, then back
                    await asyncio.sleep(0.2)
                    continue
                assert status in (200, 429), got
                if status == 429:
                    break
                after.append(got["usage"]["total_tokens"])
        assert spent + sum(after) <= 100, (spent, after)
        _, tokens_in, tokens_out = await _ledger(gateway, prefix, "daily")
        assert tokens_in + tokens_out == spent + sum(after) <= 100


class TestUsage:
    async def test_show_usage_equals_what_clients_were_told_per_period(self, gateway: Gateway) -> None:
        secret, prefix, tenant = await gateway.key()
        other, _, _ = await gateway.key(tenant=tenant)
        told = [0, 0, 0]
        async with aiohttp.ClientSession() as http:
            for key, path, body in [
                (secret, CHAT, _chat("one")), (secret, CHAT, _chat("two two", max_tokens=4)),
                (other, "/v1/embeddings", {"model": "nomic-embed-text", "input": ["a b c", "d"]}),
                (secret, "/api/chat", {"model": "llama3.1:8b", "stream": False,
                                       "messages": [{"role": "user", "content": "three"}]}),
            ]:
                status, _, got = await _post(http, gateway.url, key, path, body)
                assert status == 200, got
                usage_in = got["usage"]["prompt_tokens"] if "usage" in got else got["prompt_eval_count"]
                usage_out = got["usage"].get("completion_tokens", 0) if "usage" in got else got["eval_count"]
                told = [told[0] + 1, told[1] + usage_in, told[2] + usage_out]
        await _ledger(gateway, prefix)
        env = {**os.environ, "DATABASE_URL": gateway.settings.database_url,
               "REDIS_URL": gateway.settings.redis_url}
        cli = str(Path(sys.executable).with_name("neuronetz-gateway"))
        for period in ("day", "month", "total"):
            proc = await asyncio.create_subprocess_exec(cli, "show-usage", "--tenant", tenant, "--period",
                                                        period, env=env, stdout=subprocess.PIPE)
            stdout, _ = await proc.communicate()
            out = stdout.decode().split()
            assert proc.returncode == 0
            assert out == [f"requests={told[0]}", f"tokens_in={told[1]}", f"tokens_out={told[2]}"]


class TestRedisRoundTrips:
    @pytest.mark.parametrize("path", [CHAT])
    async def test_a_request_with_a_cached_key_costs_one_redis_round_trip_for_admission(
        self, gateway: Gateway, path: str
    ) -> None:
        secret, _, _ = await gateway.key()
        client = aioredis.Redis.from_url(gateway.settings.redis_url, decode_responses=True)
        async with aiohttp.ClientSession() as http:
            assert (await _post(http, gateway.url, secret, path))[0] == 200  # caches the key
            await asyncio.sleep(0.2)
            monitor_commands: list[str] = []
            async with client.monitor() as monitor:
                listen = asyncio.create_task(_collect(monitor, monitor_commands))
                await asyncio.sleep(0.05)
                status, _, _ = await _post(http, gateway.url, secret, path)
                await asyncio.sleep(0.1)
                listen.cancel()
        await client.aclose()
        assert status == 200
        # Background jobs (discovery sync, its poll lock, the heartbeat's PING) are not part of the request.
        request_commands = [c for c in monitor_commands if "gateway:models" not in c and c.upper() != "PING"]
        scripts = [c for c in request_commands if c.upper().startswith(("EVALSHA", "EVAL "))]
        assert len(scripts) == 2, request_commands  # admit before forwarding, settle after
        assert len(request_commands) == 2, request_commands
        assert "admit" in scripts[0]


async def _collect(monitor: Any, sink: list[str]) -> None:
    async for event in monitor.listen():
        command = str(event.get("command", ""))
        # Commands a script runs inside Redis show up too; they are not round trips.
        if command and event.get("client_type") != "lua" and not command.upper().startswith("MONITOR"):
            sink.append(command)
