"""Redis liveness for routes that need no Redis command of their own (listings, version): with
Redis down nothing may pass unchecked (SPEC §8.5), so they must see it fail too."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from adapters.tasks import cancel_and_wait
from gateway_core.errors import DependencyUnavailable


class RedisHealth:
    def __init__(self, redis: Redis, every_s: float = 0.5) -> None:
        self._redis = redis
        self._every_s = every_s
        self._ok = False
        self._task: asyncio.Task[None] | None = None

    def ok(self) -> bool:
        return self._ok

    async def check(self) -> bool:
        try:
            await asyncio.wait_for(self._redis.ping(), self._every_s)
            self._ok = True
        except (RedisError, OSError, TimeoutError):
            self._ok = False
        return self._ok

    async def confirm(self) -> None:
        """Raise DependencyUnavailable unless Redis answers now (one PING)."""
        if not await self.check():
            raise DependencyUnavailable()

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._run(), name="redis-health")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            await self.check()

    async def stop(self) -> None:
        await cancel_and_wait([self._task])


class TrustedWhenAll:
    """A ChangeFeed that is trusted only while every part is: the listener and Redis."""

    def __init__(self, *checks: Callable[[], bool]) -> None:
        self._checks = checks

    def trusted(self) -> bool:
        return all(check() for check in self._checks)
