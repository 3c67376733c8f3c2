"""The KeyCache contract (SPEC §3.1, §4.5), once for the fake and once for Redis + Lua: a fill marked
before an eviction of its key or tenant never lands, evictions remove what is cached, and nothing
else is disturbed. Then what only the real one has: two replicas on one Redis, FLUSHDB between mark
and fill, and every key in one hash slot (SPEC §4.11)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from adapters.key_cache import TieredKeyCache
from gateway_core.budget import Budget
from gateway_core.limits import Limits
from gateway_core.models import ALL_SCOPES, Principal
from gateway_core.ports import NEGATIVE, KeyCache
from tests.fakes import InMemoryKeyCache


@pytest.fixture(params=["fake", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[KeyCache]:
    if request.param == "fake":
        yield InMemoryKeyCache()
        return
    redis = Redis.from_url(request.getfixturevalue("redis_url"))
    try:
        yield TieredKeyCache(redis, ttl_s=60)
    finally:
        await redis.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def principal(*, tenant_id: int | None = None, rpm: int = 10) -> Principal:
    tid = tenant_id if tenant_id is not None else uuid.uuid4().int % 10**9
    return Principal(key_id=uuid.uuid4().int % 10**9, key_prefix="nz_" + uuid.uuid4().hex[:9],
                     tenant_id=tid, tenant_name=f"t{tid}", scopes=ALL_SCOPES,
                     key_limits=Limits(rpm, None, None), tenant_limits=Limits(100, None, None),
                     budget=Budget(1000, None, None), allowed_models=("llama3.1:8b",))


def digest() -> str:
    return uuid.uuid4().hex * 2


class TestContract:
    async def test_a_fill_is_served_back(self, cache: KeyCache) -> None:
        p, d = principal(), digest()
        assert await cache.get(d) is None
        assert await cache.put(d, p, await cache.mark())
        assert await cache.get(d) == p

    async def test_a_fill_marked_before_its_keys_eviction_is_refused(self, cache: KeyCache) -> None:
        p, d = principal(), digest()
        mark = await cache.mark()
        await cache.evict_prefix(p.key_prefix)  # the revocation lands while the key is being loaded
        assert not await cache.put(d, p, mark)
        assert await cache.get(d) is None

    async def test_a_fill_marked_before_its_tenants_eviction_is_refused(self, cache: KeyCache) -> None:
        p, d = principal(), digest()
        mark = await cache.mark()
        await cache.evict_tenant(p.tenant_id)
        assert not await cache.put(d, p, mark)
        assert await cache.get(d) is None

    async def test_a_fill_marked_after_the_eviction_lands(self, cache: KeyCache) -> None:
        p, d = principal(), digest()
        await cache.evict_prefix(p.key_prefix)
        await cache.evict_tenant(p.tenant_id)
        assert await cache.put(d, p, await cache.mark())
        assert await cache.get(d) == p

    async def test_evicting_another_key_or_tenant_refuses_nothing(self, cache: KeyCache) -> None:
        p, d = principal(), digest()
        mark = await cache.mark()
        await cache.evict_prefix(principal().key_prefix)
        await cache.evict_tenant(p.tenant_id + 1)
        assert await cache.put(d, p, mark)
        assert await cache.get(d) == p

    async def test_evictions_remove_every_entry_of_the_key_or_tenant(self, cache: KeyCache) -> None:
        tenant_id = uuid.uuid4().int % 10**9
        a, b, c = principal(tenant_id=tenant_id), principal(tenant_id=tenant_id), principal()
        da, da2, db, dc = digest(), digest(), digest(), digest()
        for d, p in ((da, a), (da2, a), (db, b), (dc, c)):
            assert await cache.put(d, p, await cache.mark())
        await cache.evict_prefix(a.key_prefix)
        assert (await cache.get(da), await cache.get(da2)) == (None, None)
        assert await cache.get(db) == b
        await cache.evict_tenant(tenant_id)
        assert await cache.get(db) is None
        assert await cache.get(dc) == c

    async def test_a_failed_key_is_remembered_negatively(self, cache: KeyCache) -> None:
        d = digest()
        await cache.put_negative(d)
        assert await cache.get(d) == NEGATIVE


class TestRedisOnly:
    async def test_another_replica_sees_the_fill_and_the_eviction(self, redis: Redis) -> None:
        a, b = TieredKeyCache(redis, ttl_s=60), TieredKeyCache(redis, ttl_s=60)
        p, d = principal(), digest()
        assert await a.put(d, p, await a.mark())
        assert await b.get(d) == p
        await a.evict_prefix(p.key_prefix)
        b.forget_local()  # b's own listener would drop its in-process copy; Redis is what is shared
        assert await b.get(d) is None

    async def test_a_fill_from_before_a_flush_is_refused(self, redis: Redis) -> None:
        """The eviction's generation vanished with the flush; the epoch still tells the fill is old."""
        cache = TieredKeyCache(redis, ttl_s=60)
        p, d = principal(), digest()
        mark = await cache.mark()
        await cache.evict_prefix(p.key_prefix)
        await redis.flushdb()
        assert not await cache.put(d, p, mark)
        assert await redis.get(f"{{gwkc}}:e:{d}") is None
        assert await cache.put(d, p, await cache.mark())

    async def test_every_key_of_the_cache_lives_in_one_hash_slot(self, redis: Redis) -> None:
        cache = TieredKeyCache(redis, ttl_s=60)
        p, d = principal(), digest()
        await cache.put(d, p, await cache.mark())
        await cache.put_negative(digest())
        await cache.evict_prefix(principal().key_prefix)
        await cache.evict_tenant(p.tenant_id + 7)
        names = [n async for n in redis.scan_iter(match="*gwkc*")]
        assert len(names) >= 6
        assert {key_slot(n) for n in names} == {key_slot(b"{gwkc}")}


async def test_discovery_and_auth_failure_keys_share_a_slot_per_operation(redis: Redis) -> None:
    """SPEC §4.11: the discovery copy (written in one MULTI) and each IP's two counters (one MGET)."""
    from adapters.redis.auth_failures import RedisAuthFailures
    from adapters.redis.discovery import DISCOVERED_KEY, ENTRIES_KEY, POLL_LOCK_KEY

    assert len({key_slot(k.encode()) for k in (DISCOVERED_KEY, ENTRIES_KEY, POLL_LOCK_KEY)}) == 1
    failures = RedisAuthFailures(redis, 5)
    ip = f"192.0.2.{uuid.uuid4().int % 250}"
    await failures.record(ip, 1_790_000_000.0)
    await failures.record(ip, 1_790_000_060.0)
    assert await failures.blocked_for(ip, 1_790_000_061.0) is None
    names = [n async for n in redis.scan_iter(match="gw:authfail:*")]
    by_ip: dict[bytes, set[int]] = {}
    for name in names:
        by_ip.setdefault(name.rsplit(b":", 1)[0], set()).add(key_slot(name))
    assert by_ip and all(len(slots) == 1 for slots in by_ip.values())
    assert any(len([n for n in names if n.startswith(prefix)]) == 2 for prefix in by_ip)
