"""Audit rows (SPEC §5, §8.3) and prompt-log rows, written in batches off the request path.

Both carry a row id made by the gateway (not the caller's X-Request-Id, which callers may repeat),
so a replayed spool cannot add a row twice. A row repaired by the writer (NUL replaced) is marked.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from adapters.postgres.batching import BatchWriter, Repaired, Row

AUDIT_COLUMNS = ("id", "request_id", "key_prefix", "tenant_id", "model", "route", "tokens_in", "tokens_out",
                 "status", "latency_ms", "client_ip", "created_at")
PROMPT_COLUMNS = ("row_id", "request_id", "key_id", "model", "prompt", "response", "created_at", "expires_at")


def _insert(table: str, columns: tuple[str, ...], conflict: str) -> str:
    names = (*columns, "repaired")
    return (f"INSERT INTO gateway.{table} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"
            f" ON CONFLICT ({conflict}) DO NOTHING")


def _marked(rows: Sequence[Row]) -> list[Row]:
    return [(*row, isinstance(row, Repaired)) for row in rows]


_AUDIT_NAMES = ", ".join((*AUDIT_COLUMNS, "repaired"))
# Rows are copied into a table of the session, then moved: COPY costs the gateway less than half the
# CPU per row of an INSERT per row (docs/performance.md), and the move keeps ON CONFLICT, so a row
# written twice (a replayed spool, a retried batch whose commit was lost) still counts once.
_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS audit_log_incoming"
          " (LIKE gateway.audit_log INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
_COPY = f"COPY audit_log_incoming ({_AUDIT_NAMES}) FROM STDIN"
_MOVE = (f"INSERT INTO gateway.audit_log ({_AUDIT_NAMES}) SELECT {_AUDIT_NAMES} FROM audit_log_incoming"
         " ON CONFLICT (id) DO NOTHING")


class AuditWriter(BatchWriter):
    name = "audit"
    table = "audit_log"

    async def write(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        async with conn.cursor() as cur:
            await cur.execute(_STAGE)
            async with cur.copy(_COPY) as copy:
                for row in _marked(rows):
                    await copy.write_row(row)
            await cur.execute(_MOVE)

    def revive(self, raw: list[Any]) -> Row:
        row = list(raw)
        row[-1] = datetime.fromisoformat(row[-1])
        return tuple(row)


class PromptLogWriter(BatchWriter):
    name = "prompt_log"
    table = "prompt_log"
    _sql = _insert("prompt_log", PROMPT_COLUMNS, "row_id")

    def put(self, row: Row) -> None:
        """*row* as (request_id, key_id, model, prompt, response, created_at, expires_at)."""
        super().put((str(uuid.uuid4()), *row))

    async def write(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        async with conn.cursor() as cur:
            await cur.executemany(self._sql, _marked(rows))

    def revive(self, raw: list[Any]) -> Row:
        row = list(raw)
        if len(row) == len(PROMPT_COLUMNS) - 1:
            row.insert(0, str(uuid.uuid4()))  # spooled by a version without row ids
        row[-2], row[-1] = datetime.fromisoformat(row[-2]), datetime.fromisoformat(row[-1])
        return tuple(row)


async def sweep_prompt_log(pool: AsyncConnectionPool, batch: int = 1000) -> int:
    """Delete expired prompt rows in batches, so one sweep never holds a long lock."""
    deleted = 0
    while True:
        async with pool.connection(timeout=5) as conn:
            cur = await conn.execute(
                "DELETE FROM gateway.prompt_log WHERE id IN (SELECT id FROM gateway.prompt_log"
                " WHERE expires_at <= now() ORDER BY expires_at LIMIT %s)", (batch,))
            deleted += cur.rowcount
            if cur.rowcount < batch:
                return deleted
