"""The Redis heartbeat that gates listings (SPEC §8.5) has hysteresis: one slow or failed PING
refuses no one; several in a row do, and one answer lets callers through again."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from adapters.redis.health import RedisHealth
from gateway_core.errors import DependencyUnavailable


class ScriptedRedis:
    """PING answers as scripted: "ok", "fail" (connection error) or a stall in seconds."""

    def __init__(self) -> None:
        self.script: list[str | float] = []

    async def ping(self) -> bool:
        step = self.script.pop(0) if self.script else "ok"
        if step == "fail":
            raise RedisConnectionError("gone")
        if isinstance(step, float):
            await asyncio.sleep(step)
        return True


async def test_one_slow_ping_is_no_miss_and_two_misses_are_not_down() -> None:
    redis = ScriptedRedis()
    health = RedisHealth(redis, timeout_s=1.0, misses_to_down=3)  # type: ignore[arg-type]
    redis.script = ["ok", 0.6, "fail", "fail"]
    for _ in range(4):
        await health.check()
    assert health.ok()
    await health.confirm()


async def test_three_misses_in_a_row_refuse_until_redis_answers_again() -> None:
    redis = ScriptedRedis()
    health = RedisHealth(redis, timeout_s=0.2, misses_to_down=3)  # type: ignore[arg-type]
    redis.script = ["ok", "fail", 0.5, "fail"]
    for _ in range(4):
        await health.check()
    assert not health.ok()
    redis.script = ["fail"]
    with pytest.raises(DependencyUnavailable) as caught:
        await health.confirm()
    assert caught.value.dependency == "redis"
    assert caught.value.error_class == "ConnectionError"
    await health.confirm()  # the live PING answers: up again at once
    assert health.ok()
