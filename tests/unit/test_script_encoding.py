"""The admission scripts' calls are encoded by adapters/redis/script_batch.py, not by redis-py: the
bytes on the wire must be exactly what redis-py would have sent for the same call."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from adapters.redis.script_batch import encode, encode_evalsha

SHA = "0123456789abcdef0123456789abcdef01234567"


def _redis_py(keys: list[str], args: list[str | int]) -> bytes:
    return b"".join(Connection().pack_command("EVALSHA", SHA, len(keys), *keys, *args))


@pytest.mark.parametrize("keys,args", [
    (["gw:{t:1}:cc:k:2", "gw:{t:1}:cc:t"], ["admit", -1, "lease", 12, 0]),
    ([], ["renew"]),
    (["gw:{t:7}:ls:ü-lease"], ["settle", "ümlaut and € signs", 10**15]),  # byte lengths, not characters
])
def test_plain_calls_match_redis_py(keys: list[str], args: list[str | int]) -> None:
    assert encode_evalsha(SHA, keys, args) == _redis_py(keys, args)


def test_pre_encoded_parts_are_counted_as_the_items_they_hold() -> None:
    keys = [f"gw:{{t:3}}:k{i}" for i in range(10)]
    args: list[str | int] = ["admit", 5, "x", 300000, 60000, -1, -1, 7]
    mixed = encode_evalsha(SHA, [encode(keys[:8]), "gw:{t:3}:k8", encode(keys[9:])],
                           [*args[:3], encode(args[3:]), encode([])])
    assert mixed == _redis_py(keys, args)
