"""The shared discovery cache `gateway:models:discovered` (SPEC §4.6)."""

from __future__ import annotations

import json

from redis.asyncio import Redis

from adapters.redis.errors import redis_guard

DISCOVERED_KEY = "gateway:models:discovered"
POLL_LOCK_KEY = "gateway:models:poll-lock"


class RedisDiscoveryCache:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def discovered(self) -> list[str] | None:
        async with redis_guard():
            raw = await self._redis.get(DISCOVERED_KEY)
        if raw is None:
            return None
        names = json.loads(raw)
        return [str(n) for n in names] if isinstance(names, list) else None

    async def store(self, names: list[str], ttl_s: float) -> None:
        async with redis_guard():
            await self._redis.set(DISCOVERED_KEY, json.dumps(sorted(names)), px=int(ttl_s * 1000))

    async def try_poll_lock(self, owner: str, hold_s: float) -> bool:
        """Only one replica polls at a time; the lock expires on its own if that replica dies."""
        async with redis_guard():
            got = await self._redis.set(POLL_LOCK_KEY, owner, nx=True, px=int(hold_s * 1000))
            if got:
                return True
            return bool(await self._redis.get(POLL_LOCK_KEY) == owner.encode())
