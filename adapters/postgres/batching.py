"""Lossless batched writes to PostgreSQL (SPEC §6.3, §8.3).

Rows wait in a bounded in-memory queue and are flushed in batches off the request path. A failed
flush keeps them and retries with backoff. When the queue is full, or at shutdown with Postgres
still down, rows are appended to a local spool file (one JSON array a line) that the next start
replays before anything else. Nothing is ever dropped.
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
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

_log = logging.getLogger("neuronetz.batching")
Row = tuple[Any, ...]


class BatchWriter:
    """Subclasses define `name` and `write(conn, rows)`; one transaction per batch."""

    name = "rows"

    def __init__(self, pool: AsyncConnectionPool, spool_dir: str, *, max_queue: int = 100_000,
                 batch_size: int = 1000, flush_every_s: float = 0.2) -> None:
        self._pool = pool
        self._spool = Path(spool_dir) / f"{self.name}.spool"
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_every_s = flush_every_s
        self._queue: deque[Row] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.healthy = True
        self._replaying: Path | None = None
        self._replay_left = 0
        self.spooled = 0
        self.written = 0

    def put(self, row: Row) -> None:
        if len(self._queue) >= self._max_queue:
            # Postgres has been unreachable for a long while: keep memory bounded, lose nothing.
            self._spool_rows([self._queue.popleft() for _ in range(len(self._queue) // 2)])
        self._queue.append(row)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def pending_rows(self) -> list[Row]:
        return list(self._queue)

    async def write(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._replay_spool()
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-writer")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Flush what is queued, within *timeout_s*; spool the rest. The writers stop one after
        another, and with PostgreSQL down each waits its whole budget: at 5 s each a SIGTERM took
        10.6 s, past `docker stop`'s 10 s, whose SIGKILL would lose every row not yet spooled."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(self._drain(), timeout=timeout_s)
        except (TimeoutError, psycopg.Error, PoolTimeout, OSError):
            pass
        if self._queue:
            self._spool_rows(list(self._queue))
            self._queue.clear()

    async def _drain(self) -> None:
        while self._queue:
            await self.flush_once()

    async def _run(self) -> None:
        backoff = self._flush_every_s
        # The loop also ends on _stopping, not only on cancellation: on Python 3.11 a cancel that
        # lands while psycopg_pool waits for a connection can be swallowed (the flush goes on and
        # succeeds), and stop() would then wait for this task forever and never spool.
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            self._wake.clear()
            try:
                while self._queue and not self._stopping:
                    await self.flush_once()
                self.healthy = True
                backoff = self._flush_every_s
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                self.healthy = False
                _log.warning("%s flush failed (%s); %d rows kept for retry", self.name,
                             type(exc).__name__, len(self._queue))
                backoff = min(max(backoff * 2, 0.5), 5.0)

    async def flush_once(self) -> None:
        batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
        if not batch:
            return
        async with self._pool.connection(timeout=5) as conn, conn.transaction():
            await self.write(conn, batch)
        # Only rows that were committed leave the queue; new rows were appended behind them.
        for _ in batch:
            self._queue.popleft()
        self.written += len(batch)
        if self._replaying is not None:
            self._replay_left -= len(batch)
            if self._replay_left <= 0:
                self._replaying.unlink(missing_ok=True)
                self._replaying = None

    def _spool_rows(self, rows: list[Row]) -> None:
        if not rows:
            return
        self._spool.parent.mkdir(parents=True, exist_ok=True)
        with self._spool.open("a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.spooled += len(rows)
        _log.warning("%s: spooled %d rows to %s", self.name, len(rows), self._spool)

    def _replay_spool(self) -> None:
        """Queue what an earlier run could not write, ahead of new rows. The file goes only once
        those rows are committed, so a crash in between can repeat rows but never lose them."""
        taken = self._spool.with_suffix(".replaying")
        if self._spool.exists():
            if taken.exists():
                with taken.open("a", encoding="utf-8") as out:
                    out.write(self._spool.read_text(encoding="utf-8"))
                self._spool.unlink()
            else:
                self._spool.replace(taken)
        if not taken.exists():
            return
        with taken.open(encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    self._queue.append(self.revive(json.loads(line)))
                    self._replay_left += 1
        self._replaying = taken

    def revive(self, raw: list[Any]) -> Row:
        """Turn a spooled JSON array back into a row."""
        return tuple(raw)
