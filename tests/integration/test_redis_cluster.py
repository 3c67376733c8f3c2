"""The Redis contracts once more, on a real 3-master Redis Cluster (SPEC §4.11): the same test
bodies (imported, not copied) with REDIS_CLUSTER=true and REDIS_URL pointing at a seed node."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator

import attrs
import pytest
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from adapters.redis import discovery as discovery_keys
from adapters.redis.auth_failures import RedisAuthFailures, _ip_key
from adapters.redis.discovery import RedisDiscoveryCache
from entrypoints.app import make_redis
from entrypoints.settings import load_settings
from tests.e2e.test_auth_and_revocation import test_the_retry_after_of_an_auth_block_is_honest
from tests.integration.test_admission_contract import (
    RedisHarness,
    TestBudget,
    TestConcurrency,
    TestDeniedConsumesNothing,
    TestFakeMatchesRedis,
    TestKeyAndTenantLimits,
    TestOrderOfChecks,
    TestRequestsPerMinute,
    TestTokensPerMinute,
    store,
    tenant,
)
from tests.services import PrivateRedisCluster, redis_client

__all__ = [
    "TestBudget", "TestConcurrency", "TestDeniedConsumesNothing", "TestFakeMatchesRedis",
    "TestKeyAndTenantLimits", "TestOrderOfChecks", "TestRequestsPerMinute", "TestTokensPerMinute", "store",
    "tenant", "test_the_retry_after_of_an_auth_block_is_honest",
]


@pytest.fixture(autouse=True)
def on_the_cluster(monkeypatch: pytest.MonkeyPatch, redis_cluster: PrivateRedisCluster) -> Iterator[None]:
    """Every client in these tests is a cluster client; no command may have crossed slots."""
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    yield
    assert "CROSSSLOT" not in redis_cluster.errorstats()


@pytest.fixture
def redis_url(redis_cluster: PrivateRedisCluster) -> str:
    return redis_cluster.url


@pytest.fixture
async def harness(redis_url: str) -> AsyncIterator[RedisHarness]:
    client = redis_client(redis_url)
    try:
        yield RedisHarness(client)
    finally:
        await client.aclose()


async def test_the_gateway_builds_a_cluster_client_from_a_seed_node(redis_cluster: PrivateRedisCluster
                                                                    ) -> None:
    settings = load_settings()
    assert settings.redis_cluster
    client = make_redis(attrs.evolve(settings, redis_url=redis_cluster.url))
    try:
        assert isinstance(client, RedisCluster)
        # Keys on all three masters are reachable through the one seed.
        names = [f"probe:{i}:{uuid.uuid4().hex}" for i in range(30)]
        for name in names:
            await client.set(name, name, px=5000)
        assert [await client.get(n) for n in names] == [n.encode() for n in names]
        assert len({redis_cluster.master_port_of(n) for n in names}) == 3
    finally:
        await client.aclose()


async def test_auth_failures_of_one_address_live_in_one_slot(redis_url: str) -> None:
    client = redis_client(redis_url)
    failures = RedisAuthFailures(client, per_minute=3)
    address = f"198.51.100.{uuid.uuid4().int % 250}"
    now = 60 * (int(time.time() // 60) + 20_000) + 59.0  # the end of a fabricated minute
    try:
        for _ in range(3):
            await failures.record(address, now)
        # Blocked at once; a second later, in the next minute's bucket, the previous one still counts.
        assert await failures.blocked_for(address, now) is not None
        await failures.record(address, now + 2)
        assert await failures.blocked_for(address, now + 2) is not None
        assert await failures.blocked_for("198.51.100.251", now + 2) is None
    finally:
        await client.aclose()
    tag = _ip_key(address)
    assert key_slot(f"{tag}1".encode()) == key_slot(f"{tag}2".encode())


async def test_discovery_copy_and_lock_work_on_the_cluster(redis_url: str) -> None:
    client = redis_client(redis_url)
    cache = RedisDiscoveryCache(client)
    try:
        await client.delete(discovery_keys.DISCOVERED_KEY, discovery_keys.ENTRIES_KEY,
                            discovery_keys.POLL_LOCK_KEY)
        assert await cache.read() is None
        entries = [{"name": "qwen3:8b", "model": "qwen3:8b"}, {"name": "llama3.1:8b", "model": "llama3.1:8b"}]
        await cache.store(entries, ttl_s=30)
        found = await cache.read()
        assert found is not None
        names, stored, ttl_ms, per_backend = found
        assert names == ["llama3.1:8b", "qwen3:8b"] and stored == entries and 0 < ttl_ms <= 30_000
        assert per_backend is None  # one backend: no per-backend sets
        records = [{"names": ["llama3.1:8b"], "expires_at": 1e12},
                   {"names": ["qwen3:8b"], "expires_at": 1e12}]
        await cache.store(entries, ttl_s=30, backends=records)  # several backends: the same two keys
        found = await cache.read()
        assert found is not None and found[1] == entries and found[3] == records
        assert await cache.discovered() == names
        assert await cache.try_poll_lock("replica-a", 5)
        assert not await cache.try_poll_lock("replica-b", 5)
    finally:
        await client.delete(discovery_keys.POLL_LOCK_KEY)
        await client.aclose()
    slots = {key_slot(k.encode()) for k in (discovery_keys.DISCOVERED_KEY, discovery_keys.ENTRIES_KEY,
                                            discovery_keys.POLL_LOCK_KEY)}
    assert len(slots) == 1
