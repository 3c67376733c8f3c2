"""Recovery without collateral refusals (SPEC §4.6, §8.5): after a Redis flush discovery polls at
once; right after a Redis or PostgreSQL restart a cached key is served without a single 503; a PING
that stalls for 0.6 s refuses no one; and every 503 the gateway does give names its dependency in the
request's log event. Servers restarted here are private ones (free ports), never the shared."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from adapters.redis.discovery import DISCOVERED_KEY
from tests.e2e.conftest_faults import PrivateStack, new_key, private_stack
from tests.e2e.harness import Gateway, gateway_settings, running_gateway
from tests.fake_ollama import FakeOllama

CHAT = "/v1/chat/completions"
BODY = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
CALLERS = 8
REQUESTS = 1000
DEPENDENCIES = ("redis", "postgres", "change_feed")


@pytest.fixture(scope="module")
def module_stack() -> Iterator[PrivateStack]:
    with private_stack() as stack:
        yield stack


@pytest.fixture
def stack(module_stack: PrivateStack) -> PrivateStack:
    module_stack.ensure_up()
    return module_stack


@pytest_asyncio.fixture
async def gw(stack: PrivateStack, fake: FakeOllama, tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = gateway_settings(stack.database_url, stack.redis_url, fake.url, tmp_path / "spool",
                                model_discovery_refresh_s=30.0)
    async with running_gateway(settings, fake) as gateway:
        yield gateway


async def post(http: aiohttp.ClientSession, gw: Gateway, secret: str, path: str = CHAT,
               body: dict[str, Any] | None = None) -> int:
    async with http.post(gw.url + path, json=body or BODY,
                         headers={"Authorization": f"Bearer {secret}"}) as resp:
        await resp.read()
        return resp.status


async def get(http: aiohttp.ClientSession, gw: Gateway, secret: str, path: str) -> int:
    async with http.get(gw.url + path, headers={"Authorization": f"Bearer {secret}"}) as resp:
        await resp.read()
        return resp.status


async def burst(gw: Gateway, secret: str, total: int = REQUESTS, callers: int = CALLERS) -> Counter[int]:
    """*total* chat requests from *callers* concurrent callers; the count of each status."""
    statuses: Counter[int] = Counter()

    async def caller(http: aiohttp.ClientSession, n: int) -> None:
        for _ in range(n):
            statuses[await post(http, gw, secret)] += 1

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(caller(http, total // callers) for _ in range(callers)))
    return statuses


async def ready(gw: Gateway, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(gw.url + "/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"gateway not ready within {timeout_s}s")


def refusals_without_a_dependency(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "request" and e.get("status") == 503
            and not str(e.get("dependency") or "").startswith(DEPENDENCIES)]


async def test_after_a_flush_an_allowed_model_answers_again_within_2_s(gw: Gateway, stack: PrivateStack
                                                                        ) -> None:
    secret, _, _ = await new_key(gw.settings)
    async with aiohttp.ClientSession() as http:
        assert await post(http, gw, secret) == 200
        tags_before = sum(1 for r in gw.fake.requests if r["path"] == "/api/tags")
        client = aioredis.Redis.from_url(stack.redis_url)
        try:
            await client.flushdb()
            flushed = time.monotonic()
            statuses: list[int] = []
            while time.monotonic() - flushed < 2.0:
                statuses.append(await post(http, gw, secret))
                if statuses[-1] == 200 and await client.exists(DISCOVERED_KEY):
                    break
                await asyncio.sleep(0.05)
            took = time.monotonic() - flushed
            print(f"\nafter FLUSHDB: {statuses[-1]} and the shared model list back in {took:.2f}s "
                  f"(MODEL_DISCOVERY_REFRESH_S=30), answers meanwhile {Counter(statuses)}")
            assert statuses[-1] == 200 and took < 2.0
            assert await client.exists(DISCOVERED_KEY), "discovery did not poll at once"
        finally:
            await client.aclose()
        # Polled by the gateway right away, not at its next 30 s interval.
        assert sum(1 for r in gw.fake.requests if r["path"] == "/api/tags") > tags_before


async def test_right_after_a_redis_restart_a_cached_key_gets_no_503(gw: Gateway, stack: PrivateStack) -> None:
    secret, _, _ = await new_key(gw.settings)
    with capture_logs() as events:
        assert (await burst(gw, secret, total=CALLERS, callers=CALLERS)) == Counter({200: CALLERS})
        await asyncio.to_thread(stack.stop_redis)
        await asyncio.to_thread(stack.start_redis)  # same port, empty
        statuses = await burst(gw, secret)
    print(f"\n{REQUESTS} requests from {CALLERS} callers right after a Redis restart: {dict(statuses)}")
    assert statuses == Counter({200: REQUESTS})
    assert not refusals_without_a_dependency(events)


async def test_right_after_a_postgres_restart_a_cached_key_gets_no_503(gw: Gateway, stack: PrivateStack
                                                                        ) -> None:
    secret, _, _ = await new_key(gw.settings)
    with capture_logs() as events:
        assert (await burst(gw, secret, total=CALLERS, callers=CALLERS)) == Counter({200: CALLERS})
        await asyncio.to_thread(stack.stop_pg)
        await asyncio.to_thread(stack.start_pg)
        # The change listener must be back first: until then a cached key cannot be trusted (§8.5).
        # Nothing else may refuse: the pool's dead connections are checked before use.
        await ready(gw)
        statuses = await burst(gw, secret)
    print(f"\n{REQUESTS} requests from {CALLERS} callers right after a PostgreSQL restart: {dict(statuses)}")
    assert statuses == Counter({200: REQUESTS})
    assert not refusals_without_a_dependency(events)


async def test_a_ping_stalled_for_0_6_s_refuses_no_one(gw: Gateway, stack: PrivateStack) -> None:
    secret, _, _ = await new_key(gw.settings)
    client = aioredis.Redis.from_url(stack.redis_url)
    statuses: Counter[int] = Counter()
    try:
        async with aiohttp.ClientSession() as http:
            assert await post(http, gw, secret) == 200

            async def traffic(until: float) -> None:
                while time.monotonic() < until:
                    statuses[await post(http, gw, secret)] += 1
                    statuses[await get(http, gw, secret, "/v1/models")] += 1

            # Every command to Redis, the heartbeat's PING included, waits 0.6 s.
            end = time.monotonic() + 2.5
            callers = [asyncio.create_task(traffic(end)) for _ in range(4)]
            await asyncio.sleep(0.3)
            await client.execute_command("CLIENT", "PAUSE", "600", "ALL")
            await asyncio.gather(*callers)
    finally:
        await client.aclose()
    print(f"\nanswers around a 0.6 s stall of Redis: {dict(statuses)}")
    assert set(statuses) == {200}


async def test_every_503_names_its_dependency(gw: Gateway, stack: PrivateStack) -> None:
    secret, _, tenant = await new_key(gw.settings)
    unseen, _, _ = await new_key(gw.settings, tenant=tenant)
    async with aiohttp.ClientSession() as http:
        assert await post(http, gw, secret) == 200
        with capture_logs() as events:
            await asyncio.to_thread(stack.stop_redis)
            try:
                assert await post(http, gw, secret) == 503
                assert await post(http, gw, unseen) == 503
            finally:
                await asyncio.to_thread(stack.start_redis)
            await ready(gw)
            await asyncio.to_thread(stack.stop_pg)
            try:
                await asyncio.sleep(0.5)  # the listener notices its connection is gone
                assert await post(http, gw, secret) == 503
            finally:
                await asyncio.to_thread(stack.start_pg)
            await ready(gw)
    refused = [e for e in events if e.get("event") == "request" and e.get("status") == 503]
    print("\n503 log events: " + ", ".join(str(e.get("dependency")) for e in refused))
    assert len(refused) >= 3
    assert not refusals_without_a_dependency(events), refused
    named = {str(e["dependency"]).split(":")[0] for e in refused}
    assert "redis" in named and named & {"postgres", "change_feed"}
