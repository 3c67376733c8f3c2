"""Lossless batched writes to PostgreSQL (SPEC §6.3, §8.3).

Rows wait in a bounded in-memory queue and are flushed in batches off the request path.

- A batch Postgres refuses for its content (a NUL character, a key deleted meanwhile) is split in
  halves until the bad rows are found; a row the subclass can repair is written repaired, the
  others go to a reject file (JSON lines) with a log event. The rows behind them never wait.
- Only connection-level errors retry the whole batch. From the first one on the writer is
  *failing*: what is queued goes to the spool file, and every new row is appended to it as it
  arrives and fsynced at least once a second, so a SIGKILL during an outage loses at most that
  second. Recovery replays the spool; writes are idempotent (row ids, settlement ids), so a row
  written twice counts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

_log = logging.getLogger("neuronetz.batching")
Row = tuple[Any, ...]

# Errors that say nothing about the rows: the whole batch is retried later (a schema error, say a
# migration not run yet, is one of them: the rows are fine and must not be set aside).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (psycopg.Error, PoolTimeout, OSError)
# Errors about a row's content (SQLSTATE classes 22 and 23, or a row that cannot even be sent).
ROW_ERRORS: tuple[type[Exception], ...] = (psycopg.DataError, psycopg.IntegrityError, ValueError, TypeError)
# While failing, the spool is fsynced this often; a flush that waits this long for a connection (the
# pool retrying a PostgreSQL that is gone) already counts as failing. A crash so loses well under a
# second of rows.
SYNC_EVERY_S = 0.25
STALLED_FLUSH_S = 0.5


class Repaired(tuple[Any, ...]):
    """A row whose text was repaired (NUL replaced); writers record that in the row."""

    __slots__ = ()


def without_nul(row: Row) -> Repaired | None:
    """*row* with every NUL in its text replaced by U+FFFD, or None when it has none."""
    if not any(isinstance(v, str) and "\x00" in v for v in row):
        return None
    return Repaired(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)


class BatchWriter:
    """Subclasses define `name`, `table` and `write(conn, rows)`; one transaction per batch."""

    name = "rows"
    table = "rows"

    def __init__(self, pool: AsyncConnectionPool, spool_dir: str, *, max_queue: int = 100_000,
                 batch_size: int = 1000, flush_every_s: float = 0.2) -> None:
        self._pool = pool
        self._spool = Path(spool_dir) / f"{self.name}.spool"
        self._taken = self._spool.with_suffix(".replaying")
        self._rejects = Path(spool_dir) / f"{self.name}.rejected.jsonl"
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_every_s = flush_every_s
        self._queue: deque[Row] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.healthy = True
        self._failing = False
        self._spool_fh: IO[str] | None = None
        self._waiting_since: float | None = None
        self._unsynced = False
        self._replaying: Path | None = None
        self._replay_left = 0
        self.spooled = 0
        self.written = 0
        self.rejected = 0
        self.repaired = 0

    # -- queueing ---------------------------------------------------------------------------------

    def put(self, row: Row) -> None:
        if self._failing:
            # Postgres is failing: the row goes to disk at once; the run loop syncs the file.
            self._append(row)
            return
        if len(self._queue) >= self._max_queue:
            # Keep memory bounded, lose nothing.
            self._spool_rows([self._queue.popleft() for _ in range(len(self._queue) // 2)])
        self._queue.append(row)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def pending_rows(self) -> list[Row]:
        return list(self._queue)

    @property
    def spool_bytes(self) -> int:
        """Bytes waiting in the spool files (including a replay not yet committed)."""
        total = 0
        for path in (self._spool, self._taken):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    # -- subclass hooks ---------------------------------------------------------------------------

    async def write(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        raise NotImplementedError

    def repair(self, row: Row) -> Row | None:
        """A version of a rejected *row* worth one more try, or None when it cannot be repaired."""
        return without_nul(row)

    def revive(self, raw: list[Any]) -> Row:
        """Turn a spooled JSON array back into a row."""
        return tuple(raw)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._replay_spool()
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-writer")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Flush what is queued, within *timeout_s*; spool the rest. The writers stop one after
        another, and with PostgreSQL down each waits its whole budget: at 5 s each a SIGTERM took
        10.6 s, past `docker stop`'s 10 s, whose SIGKILL would lose every row not yet spooled."""
        self._stopping = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._task is not None:
            # A flush under way ends first (the loop stops after it): cancelled between its commit
            # and dropping its rows from the queue, it would leave them to be written a second time.
            await asyncio.wait({self._task}, timeout=timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self._failing:
            try:
                await asyncio.wait_for(self._drain(), timeout=max(0.0, deadline - loop.time()))
            except (TimeoutError, psycopg.Error, PoolTimeout, OSError):
                pass
        if self._queue:
            self._spool_rows(self._unspooled())
            self._queue.clear()
        self._close_spool()

    async def _drain(self) -> None:
        while self._queue:
            await self.flush_once()

    async def _run(self) -> None:
        backoff = self._flush_every_s
        syncer = asyncio.create_task(self._sync_loop(), name=f"{self.name}-spool-sync")
        try:
            # The loop also ends on _stopping, not only on cancellation: on Python 3.11 a cancel that
            # lands while psycopg_pool waits for a connection can be swallowed (the flush goes on and
            # succeeds), and stop() would then wait for this task forever and never spool.
            while not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=backoff)
                self._wake.clear()
                try:
                    if self._failing:
                        await self._recover()
                    while self._queue and not self._stopping:
                        await self.flush_once()
                        # What arrived during that flush waits for the next tick unless it is a full
                        # batch: flushing each remainder at once made batches of a few rows under
                        # load, each paying a pool checkout, BEGIN and COMMIT (~0.1 ms per request).
                        if len(self._queue) < self._batch_size:
                            break
                    self.healthy = True
                    backoff = self._flush_every_s
                except CONNECTION_ERRORS as exc:
                    self.healthy = False
                    backoff = min(max(backoff * 2, 0.5), 5.0)
                    self._enter_failing(exc)
        finally:
            syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await syncer

    async def _sync_loop(self) -> None:
        """Makes appended rows durable every SYNC_EVERY_S, and spills the queue to disk when a flush
        is stuck. A task of its own: the pool may wait seconds before it gives up on PostgreSQL."""
        while True:
            await asyncio.sleep(SYNC_EVERY_S)
            waiting = self._waiting_since
            if not self._failing and waiting is not None and \
                    asyncio.get_running_loop().time() - waiting > STALLED_FLUSH_S:
                # The batch in flight may still commit; its rows on disk too are harmless (idempotent).
                self._enter_failing(None)
            self._sync_spool()

    def _enter_failing(self, exc: BaseException | None) -> None:
        """Everything queued goes to disk now; from here on rows are appended as they arrive."""
        rows = self._unspooled()
        self._queue.clear()
        self._replaying, self._replay_left = None, 0
        if not self._failing:
            why = "stalled" if exc is None else f"failed ({type(exc).__name__})"
            _log.warning("%s flush %s; spooling %d rows until PostgreSQL is back", self.name, why, len(rows))
        self._failing = True
        self._spool_rows(rows)

    def _unspooled(self) -> list[Row]:
        """Queued rows that are not already in the replay file."""
        skip = self._replay_left if self._replaying is not None else 0
        return [row for i, row in enumerate(self._queue) if i >= skip]

    async def _recover(self) -> None:
        """Replay the spool until it is empty; a connection error leaves the files as they are."""
        # Probe first: while PostgreSQL is down the rows stay in the spool file, untouched.
        async with self._pool.connection(timeout=1.0) as conn:
            await conn.execute("SELECT 1")
        while self._spool.exists() or self._taken.exists():
            self._close_spool()
            self._replay_spool()
            while self._queue:
                await self.flush_once()
        # No await since the last check: no row can have been appended behind it.
        self._failing = False
        _log.warning("%s: PostgreSQL is back; spool replayed", self.name)

    # -- flushing ---------------------------------------------------------------------------------

    async def flush_once(self) -> None:
        batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
        if not batch:
            return
        await self._write_isolating(batch)
        self.written += len(batch)
        # Only rows that were committed (or set aside) leave the queue; new rows queue behind them.
        # A stalled flush may have spilled the queue to disk meanwhile: then there is nothing to pop.
        for row in batch:
            if not self._queue or self._queue[0] is not row:
                return
            self._queue.popleft()
        if self._replaying is not None:
            self._replay_left -= len(batch)
            if self._replay_left <= 0:
                self._replaying.unlink(missing_ok=True)
                self._replaying, self._replay_left = None, 0

    async def _commit(self, rows: Sequence[Row]) -> None:
        self._waiting_since = asyncio.get_running_loop().time()
        try:
            async with self._pool.connection(timeout=5) as conn:
                self._waiting_since = None
                async with conn.transaction():
                    await self.write(conn, rows)
        finally:
            self._waiting_since = None

    async def _write_isolating(self, rows: Sequence[Row]) -> None:
        """Commit *rows*; when Postgres refuses their content, halve until the bad rows are found.
        Any other error propagates and the caller keeps every row for a retry."""
        try:
            await self._commit(rows)
            return
        except ROW_ERRORS as exc:
            if len(rows) > 1:
                mid = len(rows) // 2
                await self._write_isolating(rows[:mid])
                await self._write_isolating(rows[mid:])
                return
            error: Exception = exc
        row = rows[0]
        fixed = self.repair(row)
        if fixed is not None:
            try:
                await self._commit([fixed])
                self.repaired += 1
                _log.warning("%s: row repaired (%s) and written", self.name, type(error).__name__)
                return
            except ROW_ERRORS as again:
                error = again
        self._reject(row, error)

    def _reject(self, row: Row, error: Exception) -> None:
        self._rejects.parent.mkdir(parents=True, exist_ok=True)
        sqlstate = getattr(error, "sqlstate", None)
        line = json.dumps({"table": self.table, "error": type(error).__name__,
                           "sqlstate": sqlstate, "row": list(row)}, default=str)
        with self._rejects.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rejected += 1
        # The error class and state only: Postgres messages quote values, and rows hold prompts.
        _log.error("%s: row rejected (%s, sqlstate %s); set aside in %s", self.name,
                   type(error).__name__, sqlstate, self._rejects)

    # -- spool ------------------------------------------------------------------------------------

    def _append(self, row: Row) -> None:
        if self._spool_fh is None:
            self._spool.parent.mkdir(parents=True, exist_ok=True)
            self._spool_fh = self._spool.open("a", encoding="utf-8")
        self._spool_fh.write(json.dumps(row, default=str) + "\n")
        self._spool_fh.flush()
        self._unsynced = True
        self.spooled += 1

    def _sync_spool(self) -> None:
        if self._spool_fh is not None and self._unsynced:
            os.fsync(self._spool_fh.fileno())
            self._unsynced = False

    def _close_spool(self) -> None:
        if self._spool_fh is not None:
            self._sync_spool()
            self._spool_fh.close()
            self._spool_fh = None

    def _spool_rows(self, rows: list[Row]) -> None:
        if not rows:
            return
        for row in rows:
            self._append(row)
        self._sync_spool()
        _log.warning("%s: spooled %d rows to %s", self.name, len(rows), self._spool)

    def _replay_spool(self) -> None:
        """Queue what an earlier run (or the failing phase) could not write, ahead of new rows. The
        file goes only once those rows are committed, so a crash in between can repeat rows (which
        the idempotent writes ignore) but never lose them."""
        self._replaying, self._replay_left = None, 0
        if self._spool.exists():
            if self._taken.exists():
                with self._taken.open("a", encoding="utf-8") as out:
                    out.write(self._spool.read_text(encoding="utf-8"))
                    out.flush()
                    os.fsync(out.fileno())
                self._spool.unlink()
            else:
                self._spool.replace(self._taken)
        if not self._taken.exists():
            return
        rows: list[Row] = []
        with self._taken.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(self.revive(json.loads(line)))
                except (ValueError, TypeError, IndexError):
                    # A line cut short by a crash mid-write: keep it for the operator, go on.
                    self._set_aside_line(line)
        self._queue.extendleft(reversed(rows))
        self._replay_left = len(rows)
        self._replaying = self._taken
        if not rows:
            self._taken.unlink(missing_ok=True)
            self._replaying = None

    def _set_aside_line(self, line: str) -> None:
        self._rejects.parent.mkdir(parents=True, exist_ok=True)
        with self._rejects.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"table": self.table, "error": "unreadable spool line", "line": line}) + "\n")
        self.rejected += 1
        _log.error("%s: unreadable spool line set aside in %s", self.name, self._rejects)
