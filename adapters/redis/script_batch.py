"""One Lua script called by many requests at once, sent as one pipelined round trip (SPEC §4.1).

Calls queue; a batch goes out as a single non-transactional pipeline of EVALSHA commands. At most
MAX_IN_FLIGHT batches are on the wire at once: a lone call goes out on the next loop round (no
added wait at concurrency 1), and under load the calls that arrive while a batch is out form the
next one, so 64 concurrent admissions and settlements cost a few sends and reads, not 64 of each. Each
script still runs atomically and in call order on one connection, so a caller that awaited its
settlement before answering keeps "the next admission of a key sees the previous settlement".
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

_Call = tuple[tuple[Any, ...], "asyncio.Future[Any]"]
MAX_IN_FLIGHT = 2


class ScriptBatch:
    def __init__(self, redis: Redis, source: str) -> None:
        self._redis = redis
        self._source = source
        self._sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        self._queue: list[_Call] = []
        # Strong references: a flush must finish even if every caller is cancelled meanwhile.
        self._flushes: set[asyncio.Task[None]] = set()

    def call(self, keys: list[str], args: list[str | int]) -> asyncio.Future[Any]:
        """Queue one script call; the future holds its reply, or the redis-py error it raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue and len(self._flushes) < MAX_IN_FLIGHT:
            loop.call_soon(self._flush)
        self._queue.append((("EVALSHA", self._sha, len(keys), *keys, *args), future))
        return future

    def _flush(self) -> None:
        if not self._queue:
            return
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._run(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        # What queued while the batches were out goes now, as one batch.
        if self._queue and len(self._flushes) < MAX_IN_FLIGHT:
            self._flush()

    async def _run(self, batch: list[_Call]) -> None:
        try:
            replies = await self._send(batch)
            if any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted or its script cache was flushed: a NOSCRIPT call ran nothing, so
                # loading the script and sending exactly those calls again (in order) is safe.
                await self._redis.script_load(self._source)
                again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                for i, reply in zip(again, await self._send([batch[i] for i in again]), strict=True):
                    replies[i] = reply
        except (RedisError, OSError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException as exc:  # cancelled at shutdown: no caller may wait forever
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RedisError("cancelled"))
            raise
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, ResponseError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _send(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:
            try:
                return [await self._redis.execute_command(*batch[0][0])]
            except ResponseError as exc:
                return [exc]
        pipe = self._redis.pipeline(transaction=False)
        for command, _ in batch:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))
