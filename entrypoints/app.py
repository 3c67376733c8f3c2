"""The composition root: turns Settings into adapters and use cases, for the server and the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg_pool import PoolTimeout
from redis.asyncio import Redis

from adapters.argon2_hasher import Argon2Hasher
from adapters.postgres.pool import make_pool
from adapters.postgres.tenants import PostgresTenantStore
from adapters.redis.discovery import RedisDiscoveryCache
from adapters.system_clock import SystemClock
from entrypoints.settings import Settings
from gateway_core.admin import Admin
from gateway_core.errors import DependencyUnavailable


def make_hasher(settings: Settings) -> Argon2Hasher:
    return Argon2Hasher(settings.argon2_memory_kib, settings.argon2_time_cost, settings.argon2_parallelism)


@asynccontextmanager
async def open_admin(settings: Settings, actor: str) -> AsyncIterator[Admin]:
    """The operator use cases over real Postgres and Redis, for one CLI command."""
    pool = make_pool(settings.database_url, min_size=1, max_size=2)
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    hasher = make_hasher(settings)
    try:
        try:
            await pool.open(wait=True, timeout=5)
        except PoolTimeout as exc:
            raise DependencyUnavailable("cannot reach PostgreSQL at DATABASE_URL") from exc
        yield Admin(PostgresTenantStore(pool), hasher, RedisDiscoveryCache(redis), SystemClock(), actor)
    finally:
        hasher.close()
        await redis.aclose()
        await pool.close()
