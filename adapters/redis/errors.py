"""The one place redis-py failures become DependencyUnavailable (fail-closed, SPEC §8.5)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisClusterException, RedisError

from gateway_core.errors import DependencyUnavailable


@asynccontextmanager
async def redis_guard() -> AsyncIterator[None]:
    try:
        yield
    except RedisError as exc:
        raise DependencyUnavailable(dependency="redis") from exc
    except OSError as exc:
        raise DependencyUnavailable(dependency="redis") from exc
    except RedisClusterException as exc:  # not a RedisError: e.g. a slot left uncovered by a failover
        raise DependencyUnavailable(dependency="redis") from exc
