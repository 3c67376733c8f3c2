"""What differs between one Redis server and a Redis Cluster (SPEC §4.11), kept in one place."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis, RedisCluster


async def ping_all(redis: Redis | RedisCluster) -> Any:
    """PING every node that holds slots: with one master down a third of all tenants cannot be
    served, and evictions aimed at its slots would be lost, so the cluster counts as down."""
    if isinstance(redis, RedisCluster):
        return await redis.ping(target_nodes=RedisCluster.PRIMARIES)
    return await redis.ping()
