"""argon2id key hashing with passlib; the work runs in a thread so the event loop never waits on it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from passlib.hash import argon2


class Argon2Hasher:
    def __init__(self, memory_kib: int, time_cost: int, parallelism: int, max_threads: int = 4) -> None:
        self._hasher = argon2.using(type="ID", memory_cost=memory_kib, rounds=time_cost,
                                    parallelism=parallelism)
        # A bounded pool: a burst of verifications queues instead of allocating 19 MiB per thread.
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="argon2")

    async def hash(self, secret: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._hasher.hash, secret)

    async def verify(self, secret: str, hashed: str) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._verify, secret, hashed)

    def _verify(self, secret: str, hashed: str) -> bool:
        try:
            # argon2.verify reads the parameters from the hash itself, so old hashes keep working.
            return bool(argon2.verify(secret, hashed))
        except (ValueError, TypeError):
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
