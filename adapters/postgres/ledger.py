"""The budget ledger (SPEC §6.3): every settlement is added to `gateway.budget_usage` for all three
periods, batched, retried and never dropped. Also the source counters are rebuilt from."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from adapters.postgres.batching import BatchWriter, Row
from adapters.postgres.pool import connection
from gateway_core.budget import Period
from gateway_core.ports import LedgerEntry


class PostgresLedger(BatchWriter):
    name = "ledger"

    def __init__(self, pool: AsyncConnectionPool, spool_dir: str, **kwargs: Any) -> None:
        super().__init__(pool, spool_dir, **kwargs)

    def record(self, entry: LedgerEntry) -> None:
        self.put((entry.key_id, entry.at, entry.tokens_in, entry.tokens_out))

    async def write(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        totals: dict[tuple[int, str, date], list[int]] = {}
        for key_id, at, tokens_in, tokens_out in rows:
            for period in Period:
                slot = totals.setdefault((key_id, period.value, period.start(at)), [0, 0, 0])
                slot[0] += tokens_in
                slot[1] += tokens_out
                slot[2] += 1
        params = [(k, p, s, t[0], t[1], t[2]) for (k, p, s), t in sorted(totals.items())]
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO gateway.budget_usage AS u (key_id, period, period_start, tokens_in, tokens_out,"
                " requests) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key_id, period, period_start)"
                " DO UPDATE SET tokens_in = u.tokens_in + EXCLUDED.tokens_in,"
                " tokens_out = u.tokens_out + EXCLUDED.tokens_out, requests = u.requests + EXCLUDED.requests,"
                " updated_at = now()", params)

    async def used(self, key_id: int, starts: dict[Period, date]) -> dict[Period, int]:
        """Committed ledger plus this replica's rows still waiting to be flushed."""
        used = {p: 0 for p in starts}
        async with connection(self._pool) as conn:
            cur = await conn.execute(
                "SELECT period, period_start, tokens_in + tokens_out FROM gateway.budget_usage"
                " WHERE key_id = %s AND period = ANY(%s)", (key_id, [p.value for p in starts]))
            for period, start, tokens in await cur.fetchall():
                if starts.get(Period(period)) == start:
                    used[Period(period)] += int(tokens)
        for row_key, at, tokens_in, tokens_out in self.pending_rows():
            if row_key == key_id:
                for period, start in starts.items():
                    if period.start(at) == start:
                        used[period] += tokens_in + tokens_out
        return used
