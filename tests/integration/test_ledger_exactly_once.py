"""The ledger applies each settlement once and in its admission's period instances (SPEC §6.3),
on real PostgreSQL and Redis."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from adapters.postgres.audit import AuditWriter
from adapters.postgres.batching import Row
from adapters.postgres.ledger import PostgresLedger
from adapters.postgres.pool import make_pool
from adapters.redis.admission import RedisAdmission, budget_key
from gateway_core.budget import Budget, Period
from gateway_core.limits import Limits
from gateway_core.metering import Metering
from gateway_core.models import Principal, Scope
from gateway_core.ports import LedgerEntry
from tests.fakes import FrozenClock
from tests.integration.writer_helpers import new_key, scalar, spool_empty, within

NOW = 1_790_000_000.0


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = make_pool(database_url, min_size=1, max_size=4)
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


def usage(database_url: str, key_id: int) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT period, period_start, tokens_in, tokens_out, requests FROM"
                            " gateway.budget_usage WHERE key_id = %s ORDER BY period", (key_id,)).fetchall()


class LostCommitAck(PostgresLedger):
    """The first batch commits, then the connection 'drops' before the writer hears of it."""

    lost = 0

    async def _commit(self, rows: Sequence[Row]) -> None:
        await super()._commit(rows)
        if not self.lost:
            self.lost = len(rows)
            raise psycopg.OperationalError("server closed the connection unexpectedly")


class TestExactlyOnce:
    async def test_a_batch_retried_after_its_commit_changes_nothing_the_second_time(
        self, database_url: str, pool: AsyncConnectionPool, tmp_path: Path
    ) -> None:
        key_id, _ = new_key(database_url)
        ledger = LostCommitAck(pool, str(tmp_path), flush_every_s=0.05)
        for _ in range(20):
            ledger.record(LedgerEntry(uuid.uuid4().hex, key_id, NOW, 3, 4))
        await ledger.start()
        try:
            await within(10.0, _written_twice(ledger, tmp_path))
        finally:
            await ledger.stop()
        assert ledger.lost == 20  # the whole batch was committed, then retried from the spool
        day = Period.DAILY.start(NOW)
        assert usage(database_url, key_id) == [
            ("daily", day, 60, 80, 20), ("monthly", day.replace(day=1), 60, 80, 20),
            ("total", date(1970, 1, 1), 60, 80, 20)]
        assert scalar(database_url, "SELECT count(*) FROM gateway.ledger_settlements WHERE key_id = %s",
                      key_id) == 20

    async def test_a_spool_replayed_twice_counts_once(
        self, database_url: str, pool: AsyncConnectionPool, tmp_path: Path
    ) -> None:
        key_id, prefix = new_key(database_url)
        rows = [[uuid.uuid4().hex, key_id, NOW, 5, 6] for _ in range(10)]
        audit_ids = [str(uuid.uuid4()) for _ in range(10)]
        (tmp_path / "ledger.spool").write_text("".join(f"{_json(r)}\n" for r in rows))
        (tmp_path / "audit.spool").write_text("".join(
            _json([i, "same-request-id", prefix, None, "m", "/api/chat", 1, 2, 200, 3.5, None,
                   datetime.fromtimestamp(NOW, UTC).isoformat()]) + "\n" for i in audit_ids))
        kept = tmp_path / "copy"
        kept.mkdir()
        for name in ("ledger.spool", "audit.spool"):
            shutil.copy(tmp_path / name, kept / name)
        for run in range(2):
            if run:
                for name in ("ledger.spool", "audit.spool"):
                    shutil.copy(kept / name, tmp_path / name)  # the same spool, once more
            ledger = PostgresLedger(pool, str(tmp_path), flush_every_s=0.05)
            audit = AuditWriter(pool, str(tmp_path), flush_every_s=0.05)
            await ledger.start()
            await audit.start()
            await within(5.0, lambda: spool_empty(tmp_path))
            await ledger.stop()
            await audit.stop()
            assert usage(database_url, key_id)[-1] == ("total", date(1970, 1, 1), 50, 60, 10), run
            # A caller's X-Request-Id may repeat: the gateway's row id decides, all ten rows stay.
            assert scalar(database_url, "SELECT count(*) FROM gateway.audit_log WHERE key_prefix = %s",
                          prefix) == 10


class TestPeriodOfAdmission:
    async def test_a_stream_admitted_before_midnight_and_settled_after_is_charged_to_its_day(
        self, database_url: str, redis_url: str, pool: AsyncConnectionPool, tmp_path: Path
    ) -> None:
        key_id, prefix = new_key(database_url)
        before_midnight = datetime(2026, 9, 21, 23, 59, 58, tzinfo=UTC).timestamp()
        clock = FrozenClock(before_midnight)
        redis = Redis.from_url(redis_url)
        ledger = PostgresLedger(pool, str(tmp_path), flush_every_s=0.05)
        await ledger.start()
        try:
            metering = Metering(RedisAdmission(redis), ledger, clock, default_completion_reserve=100)
            principal = Principal(key_id=key_id, key_prefix=prefix, tenant_id=key_id, tenant_name="t",
                                  scopes=frozenset(Scope), key_limits=Limits(), tenant_limits=Limits(),
                                  budget=Budget(daily=10_000, monthly=100_000))
            grant = await metering.admit(principal, prompt_tokens=40, completion_tokens=200)
            clock.advance(5.0)  # the stream ends at 00:00:03 the next day
            await metering.settle(grant, 40, 120)
            next_day = await metering.admit(principal, prompt_tokens=1, completion_tokens=1)
            await within(5.0, lambda: _rows(database_url, key_id, 3))
        finally:
            await ledger.stop()
            await redis.aclose()
        day = date(2026, 9, 21)
        assert await redis_counter(redis_url, grant.ticket, Period.DAILY) == 160
        # The next day's counter was seeded from the ledger, which holds nothing for that day.
        assert await redis_counter(redis_url, next_day.ticket, Period.DAILY) == 2
        assert usage(database_url, key_id) == [
            ("daily", day, 40, 120, 1), ("monthly", date(2026, 9, 1), 40, 120, 1),
            ("total", date(1970, 1, 1), 40, 120, 1)]
        assert scalar(database_url, "SELECT count(*) FROM gateway.ledger_settlements WHERE key_id = %s"
                      " AND day_start = %s", key_id, day) == 1


async def redis_counter(redis_url: str, ticket: object, period: Period) -> int | None:
    redis = Redis.from_url(redis_url)
    try:
        raw = await redis.get(budget_key(ticket, period))  # type: ignore[arg-type]
    finally:
        await redis.aclose()
    return None if raw is None else int(raw)


def _json(value: object) -> str:
    return json.dumps(value)


def _written_twice(ledger: LostCommitAck, spool: Path) -> Callable[[], bool]:
    def probe() -> bool:
        return bool(ledger.lost) and ledger.healthy and spool_empty(spool) and not ledger.pending
    return probe


async def _rows(database_url: str, key_id: int, want: int) -> bool:
    return len(usage(database_url, key_id)) == want
