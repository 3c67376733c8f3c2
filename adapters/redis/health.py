"""Redis liveness for routes that make no Redis call of their own (listings, version): with Redis
down nothing may pass unchecked (SPEC §8.5), so they must see it fail too.

Every other route is gated by its own Redis calls (the admission script failing is the 503), so
this heartbeat gates only those few, and with hysteresis: one slow PING on a busy host, or one
stale connection after a restart, must not refuse anyone. Down means several misses in a row,
each with a timeout a loaded machine still meets; one answer makes it up again.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.tasks import cancel_and_wait
from gateway_core.errors import DependencyUnavailable

_log = logging.getLogger("neuronetz.redis_health")
PING_EVERY_S = 0.5
PING_TIMEOUT_S = 2.0
MISSES_TO_DOWN = 3


class RedisHealth:
    def __init__(self, redis: Redis, every_s: float = PING_EVERY_S, timeout_s: float = PING_TIMEOUT_S,
                 misses_to_down: int = MISSES_TO_DOWN) -> None:
        self._redis = redis
        self._every_s = every_s
        self._timeout_s = timeout_s
        self._misses_to_down = misses_to_down
        self._misses = misses_to_down  # down until the first answer
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def ok(self) -> bool:
        return self._misses < self._misses_to_down

    async def check(self) -> bool:
        try:
            await asyncio.wait_for(self._redis.ping(), self._timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._misses += 1
            self._last_error = type(exc).__name__
            if self._misses == self._misses_to_down:
                _log.warning("redis heartbeat: %d misses in a row (%s)", self._misses, self._last_error)
        else:
            self._misses = 0
        return self.ok()

    async def confirm(self) -> None:
        """Raise DependencyUnavailable while the heartbeat says Redis is down."""
        if self.ok():
            return
        # Down: one live PING may already tell that it is back, without waiting for the next beat.
        try:
            await asyncio.wait_for(self._redis.ping(), self._timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise DependencyUnavailable(dependency="redis") from exc
        self._misses = 0

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._run(), name="redis-health")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            await self.check()

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

