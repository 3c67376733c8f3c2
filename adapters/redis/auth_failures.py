"""Failed authentications per client IP over a sliding minute (SPEC §3.1), shared by replicas."""

from __future__ import annotations

import hashlib
import math

from redis.asyncio import Redis

from adapters.redis.errors import redis_guard

_WINDOW_S = 60
# Two fixed buckets weighted by overlap approximate a sliding minute with two counters per IP, read
# together (this bucket's and the previous one's) in one MGET. Both carry the IP's hash as a hash
# tag, so they share one Redis Cluster slot (SPEC §4.11).


def _ip_key(client_ip: str) -> str:
    # IPs are personal data in some jurisdictions; the counter only needs a stable name.
    return "gw:authfail:{" + hashlib.sha256(client_ip.encode()).hexdigest()[:24] + "}:"


class RedisAuthFailures:
    def __init__(self, redis: Redis, per_minute: int) -> None:
        self._redis = redis
        self._limit = per_minute

    async def blocked_for(self, client_ip: str, now: float) -> float | None:
        """Seconds until the estimate drops below the limit again, or None when not blocked."""
        bucket = math.floor(now / _WINDOW_S)
        name = _ip_key(client_ip)
        async with redis_guard():
            cur, prev = (float(v or 0) for v in await self._redis.mget(name + str(bucket),
                                                                       name + str(bucket - 1)))
        limit = self._limit
        elapsed = now - math.floor(now / _WINDOW_S) * _WINDOW_S
        if cur + prev * (1 - elapsed / _WINDOW_S) < limit:
            return None
        # The wait must be honest: a caller that waits Retry-After must not be refused again.
        if cur < limit:
            # The previous bucket's share fades during this one: prev * (1 - t/60) + cur < limit.
            unblocked_at = _WINDOW_S * (1 - (limit - cur) / prev)
        else:
            # This bucket becomes the previous one and has to fade in the next: cur * (1 - t/60) < limit.
            unblocked_at = _WINDOW_S + _WINDOW_S * (1 - limit / cur)
        # The estimate must drop strictly below the limit: a hair past the exact moment.
        return max(1.0, unblocked_at - elapsed + 0.001)

    async def record(self, client_ip: str, now: float) -> None:
        name = _ip_key(client_ip) + str(math.floor(now / _WINDOW_S))
        async with redis_guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.incr(name)
            pipe.expire(name, 2 * _WINDOW_S)
            await pipe.execute()
