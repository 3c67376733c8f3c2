"""The key cache against revocations and reconnects on real PostgreSQL and Redis (SPEC §3.1, §4.5):
a fill racing a revocation never leaves a revoked key usable, a listener reconnect costs argon2 only
for the keys that changed while it was away, and a failed attempt costs the same whatever failed."""

from __future__ import annotations

import asyncio
import random
import secrets
import statistics
import string
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import psycopg
import pytest
from redis.asyncio import Redis

from adapters.argon2_hasher import Argon2Hasher
from adapters.key_cache import TieredKeyCache
from adapters.postgres.listener import APPLICATION_NAME, ChangeListener
from adapters.postgres.pool import make_pool
from adapters.postgres.principals import PostgresPrincipalSource
from adapters.redis.auth_failures import RedisAuthFailures
from adapters.system_clock import SystemClock
from entrypoints.app import make_hasher, make_redis, open_admin
from entrypoints.settings import Settings, load_settings
from gateway_core.admin import Admin
from gateway_core.errors import InvalidApiKey
from gateway_core.gateway import Authenticator, AuthPorts
from gateway_core.limits import Limits
from gateway_core.models import Principal

_B64 = string.ascii_letters + string.digits + "-_"


class CountingHasher:
    """The real argon2 hasher, counting verifications (what a reconnect must not multiply)."""

    def __init__(self, inner: Argon2Hasher) -> None:
        self.inner = inner
        self.verifications = 0

    async def hash(self, secret: str) -> str:
        return await self.inner.hash(secret)

    async def verify(self, secret: str, hashed: str) -> bool:
        self.verifications += 1
        return await self.inner.verify(secret, hashed)


class Trusted:
    def trusted(self) -> bool:
        return True


class SpyEvictor:
    """The cache as the listener sees it, telling the test which prefixes were evicted."""

    def __init__(self, cache: TieredKeyCache) -> None:
        self.cache = cache
        self.evicted: list[str] = []

    async def evict_prefix(self, prefix: str) -> None:
        await self.cache.evict_prefix(prefix)
        self.evicted.append(prefix)

    async def evict_tenant(self, tenant_id: int) -> None:
        await self.cache.evict_tenant(tenant_id)


@attrs.define
class Replica:
    cache: TieredKeyCache
    auth: Authenticator
    hasher: CountingHasher
    source: Any
    listener: ChangeListener | None = None
    spy: SpyEvictor | None = None


@attrs.define
class Rig:
    settings: Settings
    admin: Admin
    redis: Redis
    pool: Any
    replicas: list[Replica] = attrs.field(factory=list)

    async def replica(self, *, listening: bool = True) -> Replica:
        cache = TieredKeyCache(self.redis, ttl_s=60)
        hasher = CountingHasher(make_hasher(self.settings))
        source = PostgresPrincipalSource(self.pool)
        auth = Authenticator(AuthPorts(cache=cache, source=source, hasher=hasher,
                                       failures=RedisAuthFailures(self.redis, 1_000_000),
                                       feed=Trusted(), clock=SystemClock()))
        await auth.warm_up()
        replica = Replica(cache, auth, hasher, source)
        if listening:
            replica.spy = SpyEvictor(cache)
            replica.listener = ChangeListener(self.settings.database_url, replica.spy, cache_ttl_s=60,
                                              probe_every_s=0.5)
            await replica.listener.start()
            assert replica.listener.trusted()
        self.replicas.append(replica)
        return replica

    async def key(self, tenant: str | None = None) -> tuple[str, str, str]:
        if tenant is None:
            tenant = f"race-{uuid.uuid4().hex[:10]}"
            await self.admin.create_tenant(tenant, Limits(1000, 10**9, 100))
        new, _ = await self.admin.create_key(tenant, f"k-{uuid.uuid4().hex[:6]}")
        return new.secret, new.prefix, tenant


@pytest.fixture
async def rig(database_url: str, redis_url: str) -> AsyncIterator[Rig]:
    # Cheap argon2 for the race rounds; the timing test below makes its own with the defaults.
    settings = attrs.evolve(load_settings(), database_url=database_url, redis_url=redis_url,
                            argon2_memory_kib=64, argon2_time_cost=1)
    pool = make_pool(database_url, min_size=1, max_size=4)
    await pool.open(wait=True, timeout=10)
    redis = make_redis(settings)
    async with open_admin(settings, "key-cache-races") as admin:
        rig = Rig(settings, admin, redis, pool)
        try:
            yield rig
        finally:
            for replica in rig.replicas:
                if replica.listener is not None:
                    await replica.listener.stop()
                replica.hasher.inner.close()
            await redis.aclose()
            await pool.close()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def refused(replica: Replica, secret: str) -> bool:
    try:
        await replica.auth.authenticate(f"Bearer {secret}", "10.0.0.1")
    except InvalidApiKey:
        return True
    return False


def load_then(replica: Replica, step: Callable[[str], Awaitable[None]]) -> None:
    """Force the interleaving: the replica reads the key from Postgres, *step* runs, then it goes on."""
    inner = PostgresPrincipalSource(replica.source._pool)
    done: set[str] = set()

    async def principal_by_prefix(prefix: str) -> tuple[str, Principal] | None:
        found = await inner.principal_by_prefix(prefix)
        if prefix not in done:
            done.add(prefix)
            await step(prefix)
        return found

    replica.source.principal_by_prefix = principal_by_prefix


async def test_a_fill_racing_a_revocation_never_leaves_the_key_usable(rig: Rig) -> None:
    a, b = await rig.replica(), await rig.replica()

    async def revoke_and_wait_for_both_listeners(prefix: str) -> None:
        await rig.admin.revoke_key(prefix)
        await until(lambda: all(r.spy is not None and prefix in r.spy.evicted for r in (a, b)))

    load_then(a, revoke_and_wait_for_both_listeners)
    rounds = 25
    for _ in range(rounds):
        secret, prefix, _tenant = await rig.key()
        # The request in flight at the revocation may pass (it was checked before); its fill may not.
        principal = await a.auth.authenticate(f"Bearer {secret}", "10.0.0.1")
        assert principal.key_prefix == prefix
        assert await refused(a, secret), "revoked key still served by the replica that filled it"
        assert await refused(b, secret), "revoked key served from the shared cache"


async def test_unforced_races_between_fills_and_revocations(rig: Rig) -> None:
    """The same without forcing: fills on two replicas and a revocation, with random delays."""
    a, b = await rig.replica(), await rig.replica()
    rng = random.Random(1234)

    async def fill(replica: Replica, secret: str, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await replica.auth.authenticate(f"Bearer {secret}", "10.0.0.1")
        except InvalidApiKey:
            pass

    async def revoke(prefix: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await rig.admin.revoke_key(prefix)

    for _ in range(25):
        secret, prefix, _tenant = await rig.key()
        await asyncio.gather(fill(a, secret, rng.uniform(0, 0.01)), fill(b, secret, rng.uniform(0, 0.01)),
                             revoke(prefix, rng.uniform(0, 0.01)))
        await until(lambda p=prefix: all(r.spy is not None and p in r.spy.evicted for r in (a, b)))
        assert await refused(a, secret) and await refused(b, secret)


async def test_after_a_listener_reconnect_only_changed_keys_are_hashed_again(rig: Rig) -> None:
    a = await rig.replica()
    assert a.listener is not None
    keys = [await rig.key() for _ in range(5)]
    for secret, _prefix, _tenant in keys:
        await a.auth.authenticate(f"Bearer {secret}", "10.0.0.1")
    assert a.hasher.verifications == 5
    changed_prefix = keys[0][1]
    changed_tenant = keys[1][2]
    # Cut the listener off and change one key and one tenant in the same transaction, so their
    # notifications can only reach it through the replay after its reconnect.
    async with await psycopg.AsyncConnection.connect(rig.settings.database_url) as conn:
        async with conn.transaction():
            await conn.execute("UPDATE gateway.api_keys SET rpm = 7 WHERE prefix = %s", (changed_prefix,))
            await conn.execute("UPDATE gateway.tenants SET rpm = 77 WHERE name = %s", (changed_tenant,))
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                               " WHERE application_name = %s AND datname = current_database()",
                               (APPLICATION_NAME,))
    await until(lambda: a.listener is not None and a.listener.connections >= 2 and a.listener.trusted())
    a.hasher.verifications = 0
    principals = [await a.auth.authenticate(f"Bearer {s}", "10.0.0.1") for s, _p, _t in keys]
    print(f"\nargon2 verifications after the reconnect: {a.hasher.verifications} of {len(keys)} keys")
    assert a.hasher.verifications == 2, "only the changed key and the changed tenant's key"
    assert principals[0].key_limits.rpm == 7
    assert principals[1].tenant_limits.rpm == 77
    # Another replica (fresh process) finds all five in the shared cache, the two changed refilled.
    c = await rig.replica(listening=False)
    for secret, _prefix, _tenant in keys:
        await c.auth.authenticate(f"Bearer {secret}", "10.0.0.1")
    assert c.hasher.verifications == 0


def _random_key(prefix: str) -> str:
    """A well-formed key starting with *prefix*, never seen before (so no negative cache hit)."""
    body = "nz_" + "".join(secrets.choice(_B64) for _ in range(43))
    return prefix + body[len(prefix):]


async def test_unknown_revoked_and_wrong_secret_attempts_cost_the_same(
    database_url: str, redis_url: str
) -> None:
    settings = attrs.evolve(load_settings(), database_url=database_url, redis_url=redis_url)
    pool = make_pool(database_url, min_size=1, max_size=4)
    await pool.open(wait=True, timeout=10)
    redis = make_redis(settings)
    hasher = make_hasher(settings)  # the shipped argon2 parameters: what an attacker would time
    try:
        async with open_admin(settings, "timing") as admin:
            tenant = f"timing-{uuid.uuid4().hex[:8]}"
            await admin.create_tenant(tenant, Limits(1000, 10**9, 100))
            active, _ = await admin.create_key(tenant, "active")
            revoked, _ = await admin.create_key(tenant, "revoked")
            await admin.revoke_key(revoked.prefix)
        auth = Authenticator(AuthPorts(
            cache=TieredKeyCache(redis, ttl_s=60), source=PostgresPrincipalSource(pool), hasher=hasher,
            failures=RedisAuthFailures(redis, 1_000_000), feed=Trusted(), clock=SystemClock()))
        await auth.warm_up()
        kinds: dict[str, Callable[[], str]] = {
            "unknown prefix": lambda: _random_key("nz_"),
            "revoked": lambda: _random_key(revoked.prefix),
            "wrong secret": lambda: _random_key(active.prefix),
        }
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        order = list(kinds)
        for _ in range(31):
            # Interleaved in a fresh order each round, so load on the machine hits all kinds alike.
            random.shuffle(order)
            for kind in order:
                key = kinds[kind]()
                started = time.perf_counter()
                with pytest.raises(InvalidApiKey):
                    await auth.authenticate(f"Bearer {key}", "10.0.0.2")
                times[kind].append(time.perf_counter() - started)
        medians = {kind: statistics.median(values) * 1000 for kind, values in times.items()}
        print("\nmedian ms per failed attempt: "
              + ", ".join(f"{kind} {ms:.1f}" for kind, ms in medians.items()))
        assert max(medians.values()) <= min(medians.values()) * 1.2, medians
    finally:
        hasher.close()
        await redis.aclose()
        await pool.close()
