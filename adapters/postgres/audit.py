"""Audit rows (SPEC §5, §8.3) and prompt-log rows, written in batches off the request path."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from adapters.postgres.batching import BatchWriter, Row

AUDIT_COLUMNS = ("id", "request_id", "key_prefix", "tenant_id", "model", "route", "tokens_in", "tokens_out",
                 "status", "latency_ms", "client_ip", "created_at")


class AuditWriter(BatchWriter):
    name = "audit"

    async def write(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        # Row ids are made by the gateway, so a replayed spool cannot add a row twice.
        async with conn.cursor() as cur:
            await cur.executemany(
                f"INSERT INTO gateway.audit_log ({', '.join(AUDIT_COLUMNS)}) VALUES "
                f"({', '.join(['%s'] * len(AUDIT_COLUMNS))}) ON CONFLICT (id) DO NOTHING", rows)

    def revive(self, raw: list[Any]) -> Row:
        row = list(raw)
        row[-1] = datetime.fromisoformat(row[-1])
        return tuple(row)


class PromptLogWriter(BatchWriter):
    name = "prompt_log"

    async def write(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO gateway.prompt_log (request_id, key_id, model, prompt, response, created_at,"
                " expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)

    def revive(self, raw: list[Any]) -> Row:
        row = list(raw)
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
