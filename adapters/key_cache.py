"""The verified-key cache (SPEC §3.1, §4.5): an in-process copy in front of a Redis copy shared by
replicas. Both are keyed by a SHA-256 digest of the full key and evicted by prefix or tenant."""

from __future__ import annotations

import json
import time

from redis.asyncio import Redis

from adapters.redis.errors import redis_guard
from gateway_core.models import Principal
from gateway_core.ports import NEGATIVE

_ENTRY = "gw:key:"          # + digest → principal JSON, or "-" for a failed key
_BY_PREFIX = "gw:keyidx:p:"  # + prefix → set of digests cached for it
_BY_TENANT = "gw:keyidx:t:"  # + tenant id → set of digests
_NEGATIVE_VALUE = b"-"
NEGATIVE_TTL_S = 10.0


class TieredKeyCache:
    def __init__(self, redis: Redis, ttl_s: float, negative_ttl_s: float = NEGATIVE_TTL_S) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._local: dict[str, tuple[float, Principal]] = {}
        self._seq = 0
        self._evicted_prefix: dict[str, int] = {}
        self._evicted_tenant: dict[int, int] = {}
        self._evicted_all = 0

    def mark(self) -> int:
        return self._seq

    async def get(self, digest: str) -> Principal | str | None:
        hit = self._local.get(digest)
        if hit is not None:
            if hit[0] > time.monotonic():
                return hit[1]
            del self._local[digest]
        mark = self._seq
        async with redis_guard():
            raw = await self._redis.get(_ENTRY + digest)
        if raw is None:
            return None
        if raw == _NEGATIVE_VALUE:
            return NEGATIVE
        principal = Principal.from_dict(json.loads(raw))
        if not self._stale(principal, mark):
            self._local[digest] = (time.monotonic() + self._ttl_s, principal)
        return principal

    def _stale(self, principal: Principal, mark: int) -> bool:
        return max(self._evicted_all, self._evicted_prefix.get(principal.key_prefix, -1),
                   self._evicted_tenant.get(principal.tenant_id, -1)) > mark

    async def put(self, digest: str, principal: Principal, mark: int) -> None:
        if self._stale(principal, mark):
            return
        ttl_ms = int(self._ttl_s * 1000)
        async with redis_guard():
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(_ENTRY + digest, json.dumps(principal.to_dict()), px=ttl_ms)
            pipe.sadd(_BY_PREFIX + principal.key_prefix, digest)
            pipe.pexpire(_BY_PREFIX + principal.key_prefix, ttl_ms)
            pipe.sadd(_BY_TENANT + str(principal.tenant_id), digest)
            pipe.pexpire(_BY_TENANT + str(principal.tenant_id), ttl_ms)
            await pipe.execute()
        # An eviction may have landed while Redis was being written: undo rather than serve stale.
        if self._stale(principal, mark):
            await self._drop_redis([digest])
            return
        self._local[digest] = (time.monotonic() + self._ttl_s, principal)

    async def put_negative(self, digest: str) -> None:
        async with redis_guard():
            await self._redis.set(_ENTRY + digest, _NEGATIVE_VALUE, px=int(self._negative_ttl_s * 1000),
                                  nx=True)

    # Every eviction forgets the in-process copy twice: before the Redis copy is deleted and again
    # after. A get() that read the Redis copy before the delete landed may copy it in meanwhile (it
    # took its mark after the first step, so it does not look stale) or only afterwards; the second
    # step removes the first kind and moves the mark past the second. Forgetting only once left a
    # revoked key or old limits in process until KEY_CACHE_TTL_S.

    async def evict_prefix(self, prefix: str) -> None:
        self._forget_prefix(prefix)
        await self._drop_index(_BY_PREFIX + prefix)
        self._forget_prefix(prefix)

    async def evict_tenant(self, tenant_id: int) -> None:
        self._forget_tenant(tenant_id)
        await self._drop_index(_BY_TENANT + str(tenant_id))
        self._forget_tenant(tenant_id)

    def _forget_prefix(self, prefix: str) -> None:
        self._seq += 1
        self._evicted_prefix[prefix] = self._seq
        for digest in [d for d, (_, p) in self._local.items() if p.key_prefix == prefix]:
            self._local.pop(digest, None)

    def _forget_tenant(self, tenant_id: int) -> None:
        self._seq += 1
        self._evicted_tenant[tenant_id] = self._seq
        for digest in [d for d, (_, p) in self._local.items() if p.tenant_id == tenant_id]:
            self._local.pop(digest, None)

    def forget_local(self) -> None:
        """Drop the in-process copy only (it refills from Redis)."""
        self._seq += 1
        self._evicted_all = self._seq
        self._local.clear()

    async def evict_all(self) -> None:
        """After the change feed missed notifications, nothing cached can be trusted."""
        self.forget_local()
        await self._drop_all_redis()
        self.forget_local()  # see the note above evict_prefix

    async def _drop_all_redis(self) -> None:
        async with redis_guard():
            batch: list[bytes] = []
            async for name in self._redis.scan_iter(match="gw:key*", count=500):
                batch.append(name)
                if len(batch) >= 500:
                    await self._redis.delete(*batch)
                    batch.clear()
            if batch:
                await self._redis.delete(*batch)

    async def _drop_index(self, index: str) -> None:
        async with redis_guard():
            digests = await self._redis.smembers(index)
            await self._drop_redis([d.decode() if isinstance(d, bytes) else d for d in digests], index)

    async def _drop_redis(self, digests: list[str], *extra: str) -> None:
        names = [_ENTRY + d for d in digests] + list(extra)
        if names:
            async with redis_guard():
                await self._redis.delete(*names)
