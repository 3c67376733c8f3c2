"""One Lua script called by many requests at once, sent as one pipelined round trip (SPEC §4.1).

Calls queue; a batch goes out as a single non-transactional pipeline of EVALSHA commands. At most
MAX_IN_FLIGHT batches are on the wire at once: a lone call goes out on the next loop round (no
added wait at concurrency 1), and under load the calls that arrive while a batch is out form the
next one, so 64 concurrent admissions and settlements cost a few sends and reads, not 64 of each. Each
script still runs atomically, and batches are written in call order, so a caller that queued its
settlement before answering keeps "the next admission of a key sees the previous settlement".
Settlements, which nobody waits for, wait up to MAY_WAIT_S for the next call to go with it.

Each call is encoded to the wire format here, once, when it is queued: redis-py's general-purpose
command packing cost more CPU than everything else on the admission path (docs/performance.md).
Connections, authentication and reply parsing stay redis-py's; the write and the reads of a batch
share one timeout (see `_exchange_on`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import frozen
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_Call = tuple[bytes, "asyncio.Future[Any]"]
MAX_IN_FLIGHT = 2
# The longest a call that nobody waits for (a settlement) waits for company before it goes alone.
# Other processes see it this much later at most; this process orders it before its next call.
MAY_WAIT_S = 0.002


@frozen
class Encoded:
    """Script keys or arguments already in wire format (*count* bulk strings): what stays the same
    for a principal all day is encoded once, not per request."""

    wire: bytes
    count: int


def encode(items: Iterable[str | int]) -> Encoded:
    """Bulk strings. Keys and arguments are ASCII (ids, numbers, fixed names); anything else is
    encoded per item so the length prefixes stay byte counts."""
    texts = [str(item) for item in items]
    text = "".join([f"${len(t)}\r\n{t}\r\n" for t in texts])
    if text.isascii():
        return Encoded(text.encode("ascii"), len(texts))
    wire = b"".join([b"$%d\r\n%b\r\n" % (len(raw), raw) for raw in (t.encode("utf-8") for t in texts)])
    return Encoded(wire, len(texts))


Part = str | int | Encoded


def encode_evalsha(sha: str, keys: Sequence[Part], args: Sequence[Part]) -> bytes:
    """EVALSHA as a RESP array."""
    key_count = sum(p.count if isinstance(p, Encoded) else 1 for p in keys)
    parts = [*keys, *args]
    count = 3 + key_count + sum(p.count if isinstance(p, Encoded) else 1 for p in args)
    wire = [b"*%d\r\n$7\r\nEVALSHA\r\n" % count, encode((sha, key_count)).wire]
    plain: list[str | int] = []
    for part in parts:
        if isinstance(part, Encoded):
            if plain:
                wire.append(encode(plain).wire)
                plain = []
            wire.append(part.wire)
        else:
            plain.append(part)
    if plain:
        wire.append(encode(plain).wire)
    return b"".join(wire)


class ScriptBatch:
    def __init__(self, redis: Redis, source: str) -> None:
        self._redis = redis
        self._source = source
        self._sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        # Connections this batcher keeps checked out of the client's pool (at most one per batch
        # in flight): the pool's checkout (a lock and a probe of the socket) cost more CPU than the
        # send itself at low concurrency. Every batch reads all its replies or the connection is
        # dropped by redis-py, and a dropped one reconnects on its next send. Closing the client
        # closes them with the rest of the pool.
        self._idle: list[Any] = []
        self._queue: list[_Call] = []
        # The batch task created that has not taken the queue yet, if any.
        self._starting: asyncio.Task[None] | None = None
        # Strong references: a flush must finish even if every caller is cancelled meanwhile.
        self._flushes: set[asyncio.Task[None]] = set()
        # When only calls that may wait are queued: the timer that sends them anyway.
        self._later: asyncio.TimerHandle | None = None

    def call(self, keys: Sequence[Part], args: Sequence[Part], *,
             may_wait: bool = False) -> asyncio.Future[Any]:
        """Queue one script call; the future holds its reply, or the redis-py error it raised.

        *may_wait*: nobody is waiting for the reply, so the call waits up to MAY_WAIT_S for company
        and goes out with the next call that cannot wait (or when the timer fires). It still goes
        out before anything queued after it, so ordering is kept; what it saves is a round trip of
        its own, and a wake-up of the gateway and of Redis, when requests come one at a time."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((encode_evalsha(self._sha, keys, args), future))
        if self._starting is not None or len(self._flushes) >= MAX_IN_FLIGHT:
            return future  # goes with the batch about to start, or the next one
        if not may_wait:
            self._start()
        elif self._later is None:
            self._later = asyncio.get_running_loop().call_later(MAY_WAIT_S, self._send_waiting)
        return future

    def _send_waiting(self) -> None:
        self._later = None
        if self._queue and self._starting is None and len(self._flushes) < MAX_IN_FLIGHT:
            self._start()

    async def drain(self) -> None:
        """Send what is queued now and wait until every call queued so far has its reply (a read
        that must see this process's own writes, and shutdown)."""
        pending = [future for _, future in self._queue]
        if pending and self._starting is None and len(self._flushes) < MAX_IN_FLIGHT:
            self._start()
        pending += [task for task in self._flushes]
        if pending:
            await asyncio.wait(pending)

    def _start(self) -> None:
        # The batch is taken when the task first runs, on the next loop round: every call queued
        # until then goes with it, without a separate callback to gather them first.
        task = asyncio.ensure_future(self._take_and_run())
        self._starting = task
        self._flushes.add(task)
        task.add_done_callback(self._flushed)

    async def _take_and_run(self) -> None:
        self._starting = None
        if self._later is not None:
            self._later.cancel()
            self._later = None
        batch, self._queue = self._queue, []
        if batch:
            await self._run(batch)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if task is self._starting:
            # Cancelled (shutdown) before it took its batch: nobody may wait forever.
            self._starting = None
            batch, self._queue = self._queue, []
            for _, future in batch:
                if not future.done():
                    future.set_exception(RedisError("cancelled"))
        # What queued while the batches were out goes now, as one batch.
        if self._queue and self._starting is None and len(self._flushes) < MAX_IN_FLIGHT:
            self._start()

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
        """One write and the replies in order, on one of the batcher's connections. A connection
        that Redis dropped (a restart) fails before any reply: that batch is sent once more on a
        fresh connection, as the client's own retry does. A timeout is never retried (the scripts
        may have run)."""
        blob = b"".join(command for command, _ in batch)
        try:
            return await self._exchange(blob, len(batch))
        except _NothingReadError:
            return await self._exchange(blob, len(batch), retry=False)

    async def _exchange(self, blob: bytes, count: int, retry: bool = True) -> list[Any]:
        conn = self._idle.pop() if self._idle else await self._redis.connection_pool.get_connection()
        replies: list[Any] = []
        try:
            await _exchange_on(conn, blob, count, replies)
        except RedisConnectionError as exc:
            if retry and not replies:
                raise _NothingReadError from exc
            raise
        finally:
            self._idle.append(conn)
        return replies


async def _exchange_on(conn: Any, blob: bytes, count: int, into: list[Any]) -> None:
    """Write *blob*, then read *count* replies into *into* (error replies as ResponseError values),
    all under one timeout.

    redis-py's `send_packed_command` runs every write in `wait_for` (a task and a timer per batch)
    and its `read_response` enters a timeout context for every reply; together they were a
    measurable share of the gateway's CPU. This writes to the connection's stream and reads from its
    parser as those two do, and fails as they do: on any error the connection is dropped (unread
    replies must never be taken for the next batch's) and a timeout or socket error becomes
    redis-py's own exception.
    """
    if not conn.is_connected:
        await conn.connect()
    parser = conn._parser
    try:
        async with asyncio.timeout(conn.socket_timeout):
            conn._writer.write(blob)
            await conn._writer.drain()  # waits only while the socket's buffer is full
            while len(into) < count:
                into.append(await parser.read_response())
    except TimeoutError:
        await conn.disconnect(nowait=True)
        raise RedisTimeoutError("Timeout talking to Redis") from None
    except OSError as exc:
        await conn.disconnect(nowait=True)
        raise RedisConnectionError(f"Error while talking to Redis: {exc.args}") from exc
    except BaseException:
        await conn.disconnect(nowait=True)
        raise


class _NothingReadError(Exception):
    """A connection failed before any reply came back."""
