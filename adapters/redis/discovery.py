"""The shared discovery cache (SPEC §4.6, §4.10): names in `gateway:models:discovered`, `/api/tags`
entries beside them, both with the same TTL; a short lock so that one replica polls at a time.

With several backends the entries value is `{"entries": [...], "backends": [record, ...]}`, one
record per backend index (`{"names", "expires_at"}` or null): the per-backend sets ride
in the same value, so replicas read them in the same round trip. A plain list (older replicas)
still reads, as "every backend has every model".
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from adapters.redis.cluster import KeyedScript
from adapters.redis.errors import redis_guard

DISCOVERED_KEY = "gateway:models:discovered"
# The SPEC names the first key; the others take its whole name as their hash tag, so all three live in
# its Redis Cluster slot and the script that writes names and entries together stays in one slot.
ENTRIES_KEY = "{gateway:models:discovered}:entries"
POLL_LOCK_KEY = "{gateway:models:discovered}:poll-lock"
# Names and entries together, atomically. A script rather than MULTI: redis-py's cluster client runs a
# MULTI that meets a moved slot in a thread with an event loop of its own, which breaks the client.
_STORE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""


class RedisDiscoveryCache:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._store = KeyedScript(redis, _STORE)

    async def discovered(self) -> list[str] | None:
        async with redis_guard():
            raw = await self._redis.get(DISCOVERED_KEY)
        if raw is None:
            return None
        names = json.loads(raw)
        return [str(n) for n in names] if isinstance(names, list) else None

    async def read(self) -> tuple[list[str], list[dict[str, Any]], float, list[Any] | None] | None:
        """Names, entries, milliseconds left to live and the per-backend records (None when the
        copy has none); None when empty or expired."""
        async with redis_guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(DISCOVERED_KEY)
            pipe.get(ENTRIES_KEY)
            pipe.pttl(DISCOVERED_KEY)
            raw_names, raw_entries, ttl_ms = await pipe.execute()
        if raw_names is None or ttl_ms is None or ttl_ms <= 0:
            return None
        value = json.loads(raw_entries) if raw_entries else []
        backends = None
        if isinstance(value, dict):
            backends = value.get("backends") if isinstance(value.get("backends"), list) else None
            value = value.get("entries") or []
        return [str(n) for n in json.loads(raw_names)], value, float(ttl_ms), backends

    async def store(self, entries: list[dict[str, Any]], ttl_s: float,
                    backends: list[dict[str, Any] | None] | None = None) -> None:
        names = sorted({str(e["name"]) for e in entries})
        ttl_ms = int(ttl_s * 1000)
        value: Any = entries if backends is None else {"entries": entries, "backends": backends}
        async with redis_guard():
            await self._store([DISCOVERED_KEY, ENTRIES_KEY], [json.dumps(names), json.dumps(value), ttl_ms])

    async def try_poll_lock(self, owner: str, hold_s: float) -> bool:
        """True when this replica may poll now; the lock lapses on its own if that replica dies."""
        async with redis_guard():
            return bool(await self._redis.set(POLL_LOCK_KEY, owner, nx=True, px=int(hold_s * 1000)))
