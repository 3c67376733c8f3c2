"""What differs between one Redis server and a Redis Cluster (SPEC §4.11), kept in one place.

After a failover redis-py (7.4) keeps the promoted replica's old role in its node list, so commands
sent "to every primary" (PING, SCRIPT LOAD, SCAN) miss it, while keyed commands follow the slot map and
reach it. Both helpers here therefore go by the slot map.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

_SLOTS = 16384


def slot_owners(redis: RedisCluster) -> list[Any]:
    """The node serving each slot, once each, as the client's current slot map says."""
    owners: dict[str, Any] = {}
    table = redis.nodes_manager.slots_cache
    for slot in range(_SLOTS):
        nodes = table.get(slot)
        if nodes:
            owners.setdefault(nodes[0].name, nodes[0])
    return list(owners.values())


async def ping_all(redis: Redis | RedisCluster) -> Any:
    """PING every node that holds slots: with one master down a third of all tenants cannot be
    served, and evictions aimed at its slots would be lost, so the cluster counts as down."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        owners = slot_owners(redis)
        if owners:
            return await redis.ping(target_nodes=owners)
        return await redis.ping(target_nodes=RedisCluster.PRIMARIES)
    return await redis.ping()


class KeyedScript:
    """A Lua script run with EVALSHA, one round trip. A node without the script in its cache (a
    flushed cache, a restarted server, a replica promoted by a failover) gets it with EVAL on the same
    key, which runs it and caches it there; redis-py's own reload goes through SCRIPT LOAD, which on a
    cluster can miss the node that needs it."""

    def __init__(self, redis: Redis | RedisCluster, source: str) -> None:
        self._redis = redis
        self._source = source
        self.sha = redis.register_script(source).sha

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self._redis.eval(self._source, len(keys), *keys, *args)

    def call(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The same call as ScriptBatch.call: one script run, its reply as a future."""
        return asyncio.ensure_future(self(keys, args))
