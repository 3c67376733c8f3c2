"""The shared discovery cache (SPEC §4.6): names in `gateway:models:discovered`, `/api/tags` entries
beside them, both with the same TTL; a short lock so that one replica polls at a time."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from adapters.redis.errors import redis_guard

DISCOVERED_KEY = "gateway:models:discovered"
# The SPEC names the first key; the others take its whole name as their hash tag, so all three live in
# its Redis Cluster slot and the MULTI that writes names and entries together stays in one slot.
ENTRIES_KEY = "{gateway:models:discovered}:entries"
POLL_LOCK_KEY = "{gateway:models:discovered}:poll-lock"


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

    async def read(self) -> tuple[list[str], list[dict[str, Any]], float] | None:
        """Names, entries and milliseconds left to live; None when empty or expired."""
        async with redis_guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(DISCOVERED_KEY)
            pipe.get(ENTRIES_KEY)
            pipe.pttl(DISCOVERED_KEY)
            raw_names, raw_entries, ttl_ms = await pipe.execute()
        if raw_names is None or ttl_ms is None or ttl_ms <= 0:
            return None
        entries = json.loads(raw_entries) if raw_entries else []
        return [str(n) for n in json.loads(raw_names)], entries, float(ttl_ms)

    async def store(self, entries: list[dict[str, Any]], ttl_s: float) -> None:
        names = sorted({str(e["name"]) for e in entries})
        ttl_ms = int(ttl_s * 1000)
        async with redis_guard():
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(DISCOVERED_KEY, json.dumps(names), px=ttl_ms)
            pipe.set(ENTRIES_KEY, json.dumps(entries), px=ttl_ms)
            await pipe.execute()

    async def try_poll_lock(self, owner: str, hold_s: float) -> bool:
        """True when this replica may poll now; the lock lapses on its own if that replica dies."""
        async with redis_guard():
            return bool(await self._redis.set(POLL_LOCK_KEY, owner, nx=True, px=int(hold_s * 1000)))
