"""Failed authentications per client IP over a sliding minute (SPEC §3.1), shared by replicas."""

from __future__ import annotations

import hashlib
import math

from redis.asyncio import Redis

from adapters.redis.errors import redis_guard

_WINDOW_S = 60
# Two fixed buckets weighted by overlap approximate a sliding minute with two counters per IP.
_SCRIPT = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local bucket = math.floor(now / 60)
local cur = tonumber(redis.call('GET', KEYS[1] .. bucket) or '0')
local prev = tonumber(redis.call('GET', KEYS[1] .. (bucket - 1)) or '0')
local weight = 1 - (now - bucket * 60) / 60
return tostring(cur + prev * weight)
"""


def _ip_key(client_ip: str) -> str:
    # IPs are personal data in some jurisdictions; the counter only needs a stable name.
    return "gw:authfail:" + hashlib.sha256(client_ip.encode()).hexdigest()[:24] + ":"


class RedisAuthFailures:
    def __init__(self, redis: Redis, per_minute: int) -> None:
        self._redis = redis
        self._limit = per_minute
        self._estimate = redis.register_script(_SCRIPT)

    async def blocked_for(self, client_ip: str, now: float) -> float | None:
        async with redis_guard():
            seen = float(await self._estimate(keys=[_ip_key(client_ip)], args=[now, self._limit]))
        if seen < self._limit:
            return None
        bucket_end = (math.floor(now / _WINDOW_S) + 1) * _WINDOW_S
        return max(1.0, bucket_end - now)

    async def record(self, client_ip: str, now: float) -> None:
        name = _ip_key(client_ip) + str(math.floor(now / _WINDOW_S))
        async with redis_guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.incr(name)
            pipe.expire(name, 2 * _WINDOW_S)
            await pipe.execute()
