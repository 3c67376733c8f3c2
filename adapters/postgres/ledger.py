"""The budget ledger (SPEC §6.3): every settlement is added to `gateway.budget_usage` for all three
periods, batched, retried, never dropped, exactly once, and in the period instances of its
admission. Also the source the Redis counters are rebuilt from.

Exactly once: a settlement's id (the ticket's lease id) is inserted into `gateway.ledger_settlements`
in the same transaction as the totals, and only ids that were new add to them; a batch retried after
a lost COMMIT acknowledgement, or a spool replayed twice, changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from adapters.postgres.batching import BatchWriter, Row
from adapters.postgres.pool import connection
from gateway_core.budget import Period
from gateway_core.ports import LedgerEntry

_CLAIM = (
    "INSERT INTO gateway.ledger_settlements (id, key_id, admitted_at, day_start, month_start,"
    " tokens_in, tokens_out) SELECT * FROM unnest(%s::text[], %s::bigint[], %s::timestamptz[],"
    " %s::date[], %s::date[], %s::bigint[], %s::bigint[]) ON CONFLICT (id) DO NOTHING RETURNING id")
_ADD = (
    "INSERT INTO gateway.budget_usage AS u (key_id, period, period_start, tokens_in, tokens_out,"
    " requests) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key_id, period, period_start)"
    " DO UPDATE SET tokens_in = u.tokens_in + EXCLUDED.tokens_in,"
    " tokens_out = u.tokens_out + EXCLUDED.tokens_out, requests = u.requests + EXCLUDED.requests,"
    " updated_at = now()")


class PostgresLedger(BatchWriter):
    """Rows are (settlement_id, key_id, admitted_at epoch s, tokens_in, tokens_out)."""

    name = "ledger"
    table = "budget_usage"

    def __init__(self, pool: AsyncConnectionPool, spool_dir: str, **kwargs: Any) -> None:
        super().__init__(pool, spool_dir, **kwargs)

    def record(self, entry: LedgerEntry) -> None:
        self.put((entry.settlement_id, entry.key_id, entry.admitted_at, entry.tokens_in, entry.tokens_out))

    def revive(self, raw: list[Any]) -> Row:
        if len(raw) == 4:
            # Spooled by a version without settlement ids: (key_id, settled at, in, out).
            return (uuid.uuid4().hex, *raw)
        return tuple(raw)

    def repair(self, row: Row) -> Row | None:
        return None  # numbers only: a refused settlement (its key deleted) cannot be mended

    async def write(self, conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        unique = {str(r[0]): r for r in rows}
        cols: list[list[Any]] = [[], [], [], [], [], [], []]
        for sid, key_id, at, tokens_in, tokens_out in unique.values():
            for col, value in zip(cols, (str(sid), key_id, datetime.fromtimestamp(at, UTC),
                                         Period.DAILY.start(at), Period.MONTHLY.start(at),
                                         tokens_in, tokens_out), strict=True):
                col.append(value)
        cur = await conn.execute(_CLAIM, cols)
        fresh = {sid for (sid,) in await cur.fetchall()}
        totals: dict[tuple[int, str, date], list[int]] = {}
        for sid, key_id, at, tokens_in, tokens_out in unique.values():
            if sid not in fresh:
                continue  # applied before: a retry or a replay
            for period in Period:
                slot = totals.setdefault((key_id, period.value, period.start(at)), [0, 0, 0])
                slot[0] += tokens_in
                slot[1] += tokens_out
                slot[2] += 1
        if not totals:
            return
        params = [(k, p, s, t[0], t[1], t[2]) for (k, p, s), t in sorted(totals.items())]
        async with conn.cursor() as cur2:
            await cur2.executemany(_ADD, params)

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
        for _sid, row_key, at, tokens_in, tokens_out in self.pending_rows():
            if row_key == key_id:
                for period, start in starts.items():
                    if period.start(at) == start:
                        used[period] += tokens_in + tokens_out
        return used
