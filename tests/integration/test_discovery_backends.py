"""Discovery with several backends on real Redis (SPEC §4.6, §4.10): one replica polls, another
reads the shared copy and learns the same per-backend sets; each backend's set expires on its own."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest_asyncio
import redis.asyncio as aioredis

from adapters.discovery import Discovery
from adapters.ollama import OllamaBackend
from adapters.redis.discovery import DISCOVERED_KEY, ENTRIES_KEY, RedisDiscoveryCache
from tests.fake_ollama import FakeOllama

A, B, C = "llama3.1:8b", "qwen3:8b", "mistral:7b"
TTL_S = 1.0


@pytest_asyncio.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.delete(DISCOVERED_KEY, ENTRIES_KEY)
    try:
        yield client
    finally:
        await client.delete(DISCOVERED_KEY, ENTRIES_KEY)
        await client.aclose()


async def test_a_replica_that_never_polled_routes_by_the_same_per_backend_sets(redis: aioredis.Redis) -> None:
    async with FakeOllama(models=[A, C]) as first, FakeOllama(models=[B, C]) as second:
        backends = [OllamaBackend(first.url, timeout_s=5), OllamaBackend(second.url, timeout_s=5)]
        for backend in backends:
            await backend.start()
        try:
            poller = Discovery(backends, RedisDiscoveryCache(redis), refresh_s=60, ttl_s=TTL_S)
            reader = Discovery(backends, RedisDiscoveryCache(redis), refresh_s=60, ttl_s=TTL_S)
            await poller.poll()
            await poller.sync()
            await reader.sync()
            catalog = reader.current(time.time())
            assert catalog is not None and set(catalog.names) == {A, B, C}
            assert {e["name"] for e in catalog.entries} == {A, B, C}
            assert [set(reader.holders(m) or ()) for m in (A, B, C)] == [{0}, {1}, {0, 1}]
            # Older replicas read the same keys: the names list keeps its shape.
            assert sorted(json.loads(await redis.get(DISCOVERED_KEY))) == sorted([A, B, C])

            # The first backend stops answering: its set lives until its own TTL, then only it is gone.
            first.fail_mode = "refuse"
            await poller.poll()
            await reader.sync()
            assert set(reader.holders(A) or ()) == {0}
            await asyncio.sleep(TTL_S + 0.1)
            await poller.poll()
            await poller.sync()
            await reader.sync()
            catalog = reader.current(time.time())
            assert catalog is not None and set(catalog.names) == {B, C}
            assert set(reader.holders(C) or ()) == {1} and not reader.holders(A)
        finally:
            for backend in backends:
                await backend.close()


async def test_a_copy_without_per_backend_sets_means_every_backend_may_serve(redis: aioredis.Redis) -> None:
    cache = RedisDiscoveryCache(redis)
    await cache.store([{"name": A, "model": A}], 10)  # what a single-backend replica writes
    reader = Discovery([OllamaBackend("http://127.0.0.1:9", timeout_s=1)] * 2, cache, refresh_s=60,
                       ttl_s=10)
    await reader.sync()
    assert reader.holders(A) is None
    catalog = reader.current(time.time())
    assert catalog is not None and catalog.names == (A,)
