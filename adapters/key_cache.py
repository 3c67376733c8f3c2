"""The verified-key cache (SPEC §3.1, §4.5): an in-process copy in front of a Redis copy shared by
replicas, keyed by a SHA-256 digest of the full key, evicted by key prefix or tenant.

Eviction cannot lose a race with a fill. Every eviction takes a new value of one shared clock and
stores it as the generation of the key prefix or tenant it names; a fill carries the clock value
(and Redis epoch) it read *before* loading the key from Postgres, and one Lua script writes the
entry only if neither the key's nor its tenant's generation moved past that value. The eviction
script also deletes every entry indexed under the prefix or tenant, in the same atomic step, so a
fill lands either before an eviction (and is deleted by it) or after it (and is refused).

Redis Cluster (SPEC §4.11): every key of this cache carries the hash tag `{gwkc}`, so all of it
lives in one slot and every script's keys (entries, indexes, generations, clock) are co-located.
The cache is small and read with plain GETs, so one slot is no hot spot worth splitting for.
An epoch, re-made whenever the clock is missing, makes a fill from before a FLUSHDB or restart fail
(its generations would otherwise have vanished with the flush).
"""

from __future__ import annotations

import json
import time
import uuid

from attrs import frozen
from redis.asyncio import Redis

from adapters.redis.cluster import KeyedScript
from adapters.redis.errors import redis_guard
from gateway_core.models import Principal
from gateway_core.ports import NEGATIVE

TAG = "{gwkc}"
_ENTRY = TAG + ":e:"       # + digest → principal JSON, or "-" for a failed key
_BY_PREFIX = TAG + ":ip:"  # + prefix → set of entry names cached for it
_BY_TENANT = TAG + ":it:"  # + tenant id → set of entry names
_GEN_PREFIX = TAG + ":gp:"  # + prefix → clock value of its last eviction
_GEN_TENANT = TAG + ":gt:"  # + tenant id → clock value of its last eviction
_CLOCK = TAG + ":clock"
_EPOCH = TAG + ":epoch"
_NEGATIVE_VALUE = b"-"
NEGATIVE_TTL_S = 10.0
# A generation must outlive every fill that started before it; fills take seconds at most.
GENERATION_TTL_MS = 24 * 3600 * 1000

# Both missing or either missing: start a new epoch, so that no fill from before can pass.
_ENSURE_CLOCK = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[1])
  redis.call('SET', KEYS[1], 0)
end
"""

_MARK = _ENSURE_CLOCK + """
return {redis.call('GET', KEYS[2]), redis.call('GET', KEYS[1])}
"""

# KEYS: clock, epoch, generation, index. ARGV: fresh epoch, generation TTL (ms).
_EVICT = _ENSURE_CLOCK + """
local now = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[3], now, 'PX', ARGV[2])
local names = redis.call('SMEMBERS', KEYS[4])
for _, name in ipairs(names) do redis.call('DEL', name) end
redis.call('DEL', KEYS[4])
return #names
"""

# KEYS: epoch, key generation, tenant generation, entry, key index, tenant index.
# ARGV: epoch at mark, clock at mark, value, TTL (ms).
_FILL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local mark = tonumber(ARGV[2])
if tonumber(redis.call('GET', KEYS[2]) or '0') > mark then return 0 end
if tonumber(redis.call('GET', KEYS[3]) or '0') > mark then return 0 end
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
redis.call('SADD', KEYS[5], KEYS[4])
redis.call('PEXPIRE', KEYS[5], ARGV[4])
redis.call('SADD', KEYS[6], KEYS[4])
redis.call('PEXPIRE', KEYS[6], ARGV[4])
return 1
"""


def entry_name(digest: str) -> str:
    return _ENTRY + digest


@frozen
class CacheMark:
    """Where the eviction history stood before a key was loaded from the store."""

    local: int
    epoch: str
    clock: int


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
        self._mark_script = KeyedScript(redis, _MARK)
        self._evict_script = KeyedScript(redis, _EVICT)
        self._fill_script = KeyedScript(redis, _FILL)

    async def mark(self) -> CacheMark:
        local = self._seq
        async with redis_guard():
            epoch, clock = await self._mark_script(keys=[_CLOCK, _EPOCH], args=[uuid.uuid4().hex])
        return CacheMark(local, _text(epoch), int(clock))

    async def get(self, digest: str) -> Principal | str | None:
        hit = self._local.get(digest)
        if hit is not None:
            if hit[0] > time.monotonic():
                return hit[1]
            del self._local[digest]
        seq = self._seq
        async with redis_guard():
            raw = await self._redis.get(_ENTRY + digest)
        if raw is None:
            return None
        if raw == _NEGATIVE_VALUE:
            return NEGATIVE
        principal = Principal.from_dict(json.loads(raw))
        if not self._stale(principal, seq):
            self._local[digest] = (time.monotonic() + self._ttl_s, principal)
        return principal

    def _stale(self, principal: Principal, seq: int) -> bool:
        return max(self._evicted_all, self._evicted_prefix.get(principal.key_prefix, -1),
                   self._evicted_tenant.get(principal.tenant_id, -1)) > seq

    async def put(self, digest: str, principal: Principal, mark: object) -> bool:
        """Cache *principal* unless its key or tenant was evicted after *mark*; True if cached."""
        if not isinstance(mark, CacheMark) or self._stale(principal, mark.local):
            return False
        tenant = str(principal.tenant_id)
        async with redis_guard():
            written = await self._fill_script(
                keys=[_EPOCH, _GEN_PREFIX + principal.key_prefix, _GEN_TENANT + tenant, _ENTRY + digest,
                      _BY_PREFIX + principal.key_prefix, _BY_TENANT + tenant],
                args=[mark.epoch, mark.clock, json.dumps(principal.to_dict()), _ms(self._ttl_s)])
        if not written:
            return False
        # An eviction on this replica may have run while the script was in flight; its Redis step
        # came after ours (else we were refused) and deleted the entry, so only the local copy is
        # at stake: skip it rather than serve a stale one.
        if self._stale(principal, mark.local):
            return False
        self._local[digest] = (time.monotonic() + self._ttl_s, principal)
        return True

    async def put_negative(self, digest: str) -> None:
        async with redis_guard():
            await self._redis.set(_ENTRY + digest, _NEGATIVE_VALUE, px=_ms(self._negative_ttl_s), nx=True)

    # Every eviction forgets the in-process copy twice: before the Redis step and again after. A
    # get() that read the Redis copy before the Redis step may copy it in meanwhile (it took its
    # sequence number after the first forget, so it does not look stale) or only afterwards; the
    # second forget removes the first kind and moves the sequence past the second.

    async def evict_prefix(self, prefix: str) -> None:
        self._forget_prefix(prefix)
        await self._evict(_GEN_PREFIX + prefix, _BY_PREFIX + prefix)
        self._forget_prefix(prefix)

    async def evict_tenant(self, tenant_id: int) -> None:
        self._forget_tenant(tenant_id)
        await self._evict(_GEN_TENANT + str(tenant_id), _BY_TENANT + str(tenant_id))
        self._forget_tenant(tenant_id)

    async def _evict(self, generation: str, index: str) -> None:
        async with redis_guard():
            await self._evict_script(keys=[_CLOCK, _EPOCH, generation, index],
                                     args=[uuid.uuid4().hex, GENERATION_TTL_MS])

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


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
