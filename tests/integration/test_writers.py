"""Writers on real PostgreSQL (SPEC §8.3): a poison row never holds the rows behind it; while
PostgreSQL is failing rows reach the spool as they arrive, synced within a second."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool

from adapters.postgres.audit import AuditWriter, PromptLogWriter
from adapters.postgres.ledger import PostgresLedger
from adapters.postgres.pool import make_pool
from adapters.prometheus import GatewayMetrics
from entrypoints.migrate import upgrade_to_head
from gateway_core.ports import LedgerEntry
from tests.integration.writer_helpers import delete_key, new_key, scalar, spool_empty, within
from tests.services import PrivatePostgres

NOW = 1_790_000_000.0


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = make_pool(database_url, min_size=1, max_size=4)
    await pool.open(wait=True)
    try:
        yield pool
    finally:
        await pool.close()


def rendered(metrics: GatewayMetrics) -> str:
    return metrics.render(["text/plain"])[0].decode()


def prompt_row(key_id: int, prompt: str) -> tuple[object, ...]:
    now = datetime.now(UTC)
    return (f"req-{uuid.uuid4().hex[:8]}", key_id, "llama3.1:8b", prompt, "answer", now,
            now + timedelta(days=1))


class TestPoisonRows:
    async def test_a_nul_prompt_is_repaired_and_marked_and_the_rows_behind_it_land_at_once(
        self, database_url: str, pool: AsyncConnectionPool, tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        key_id, _ = new_key(database_url, prompt_log=True)
        writer = PromptLogWriter(pool, str(tmp_path), flush_every_s=0.05)
        await writer.start()
        try:
            caplog.set_level(logging.WARNING, "neuronetz.batching")
            writer.put(prompt_row(key_id, "before\x00after"))
            for i in range(200):
                writer.put(prompt_row(key_id, f"fine {i}"))
            took = await within(2.0, _count(database_url, "prompt_log WHERE key_id = %s", key_id, 201))
        finally:
            await writer.stop()
        print(f"\n201 prompt rows, one with a NUL, written in {took:.2f}s")
        assert scalar(database_url, "SELECT count(*) FROM gateway.prompt_log WHERE key_id = %s AND repaired"
                      " AND prompt = %s", key_id, "before\ufffdafter") == 1
        assert scalar(database_url, "SELECT count(*) FROM gateway.prompt_log WHERE key_id = %s"
                      " AND NOT repaired", key_id) == 200
        assert writer.repaired == 1 and writer.rejected == 0
        assert any("row repaired" in r.getMessage() for r in caplog.records)
        assert "before" not in caplog.text  # the prompt never reaches the log

    async def test_a_settlement_of_a_deleted_key_is_set_aside_and_the_rest_is_charged(
        self, database_url: str, pool: AsyncConnectionPool, tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        gone, _ = new_key(database_url)
        kept, _ = new_key(database_url)
        ledger = PostgresLedger(pool, str(tmp_path), flush_every_s=0.05)
        ledger.record(LedgerEntry(uuid.uuid4().hex, gone, NOW, 7, 9))  # queued before the writer runs
        for _ in range(50):
            ledger.record(LedgerEntry(uuid.uuid4().hex, kept, NOW, 2, 3))
        delete_key(database_url, gone)
        caplog.set_level(logging.WARNING, "neuronetz.batching")
        metrics = GatewayMetrics()
        await ledger.start()
        try:
            took = await within(2.0, _count(
                database_url, "budget_usage WHERE key_id = %s AND period = 'total' AND requests = 50",
                kept, 1))
        finally:
            await ledger.stop()
        print(f"\nsettlements behind the poison row charged after {took:.2f}s")
        assert scalar(database_url, "SELECT tokens_in FROM gateway.budget_usage WHERE key_id = %s"
                      " AND period = 'total'", kept) == 100
        rejected = [json.loads(line) for line in
                    (tmp_path / "ledger.rejected.jsonl").read_text().splitlines()]
        assert len(rejected) == 1
        assert rejected[0]["table"] == "budget_usage" and rejected[0]["row"][1] == gone
        assert rejected[0]["error"] == "ForeignKeyViolation"
        assert any("row rejected" in r.getMessage() for r in caplog.records)
        metrics.observe_writer(ledger.table, ledger.pending, ledger.rejected, ledger.spool_bytes)
        text = rendered(metrics)
        assert 'gateway_rows_rejected_total{table="budget_usage"} 1' in text
        assert 'gateway_writer_queue_rows{table="budget_usage"} 0' in text


class TestSpoolWhileFailing:
    async def test_rows_reach_the_spool_within_a_second_and_land_once_postgres_is_back(
        self, tmp_path: Path
    ) -> None:
        pg = PrivatePostgres()
        try:
            pg.init()
            await asyncio.to_thread(pg.start)
            await asyncio.to_thread(upgrade_to_head, pg.url)
            pool = make_pool(pg.url, min_size=1, max_size=2, timeout_s=1.0)
            await pool.open(wait=True)
            audit = AuditWriter(pool, str(tmp_path), flush_every_s=0.05)
            await audit.start()
            try:
                await asyncio.to_thread(pg.stop)
                ids = []
                for i in range(30):
                    row = (uuid.uuid4(), f"r{i}", None, None, None, "/v1/chat/completions", 0, 0, 503, 1.0,
                           None, datetime.now(UTC))
                    ids.append(str(row[0]))
                    audit.put(row)
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.1)
                # Read while the writer still runs: what a SIGKILL now would leave behind.
                assert set(ids) <= spooled_ids(tmp_path)
                metrics = GatewayMetrics()
                metrics.observe_writer(audit.table, audit.pending, audit.rejected, audit.spool_bytes)
                assert audit.spool_bytes > 0
                assert 'gateway_spool_bytes{table="audit_log"} 0' not in rendered(metrics)
                await asyncio.to_thread(pg.start)

                async def landed() -> bool:
                    try:
                        return scalar(pg.url, "SELECT count(*) FROM gateway.audit_log"
                                      " WHERE id = ANY(%s::uuid[])", ids) == len(ids)
                    except Exception:
                        return False

                took = await within(15.0, landed)
                print(f"\nspooled rows written {took:.2f}s after PostgreSQL came back")
                await within(5.0, lambda: spool_empty(tmp_path))
            finally:
                await audit.stop()
                await pool.close()
        finally:
            pg.destroy()


def spooled_ids(spool: Path) -> set[str]:
    """Audit row ids on disk (spool and replay files) right now."""
    return {json.loads(line)[0] for path in spool.glob("audit.*") if not path.name.endswith(".jsonl")
            for line in path.read_text().splitlines()}


def _count(database_url: str, where: str, param: object, want: int):  # type: ignore[no-untyped-def]
    async def probe() -> bool:
        return scalar(database_url, f"SELECT count(*) FROM gateway.{where}", param) == want
    return probe


def audit_row(request_id: str, model: str) -> tuple[object, ...]:
    return (str(uuid.uuid4()), request_id, "nz_abcdefghi", None, model, "/v1/chat/completions", 7, 3, 200,
            1.5, "127.0.0.1", datetime.now(UTC))


class TestAuditRows:
    async def test_audit_rows_land_once_even_when_written_twice_and_a_nul_model_is_repaired(
        self, database_url: str, pool: AsyncConnectionPool, tmp_path: Path,
    ) -> None:
        request_id = f"req-{uuid.uuid4().hex}"
        rows = [audit_row(request_id, f"model-{i}") for i in range(300)]
        rows.insert(150, audit_row(request_id, "caller\x00model"))
        writer = AuditWriter(pool, str(tmp_path), flush_every_s=0.05)
        await writer.start()
        try:
            for row in rows:
                writer.put(row)
            await within(2.0, _count(database_url, "audit_log WHERE request_id = %s", request_id, 301))
            # A batch whose commit was not seen is written again; a replayed spool repeats rows too.
            for row in rows[:100]:
                writer.put(row)
            writer.put(audit_row(request_id, "one more"))
            await within(2.0, _count(database_url, "audit_log WHERE request_id = %s", request_id, 302))
        finally:
            await writer.stop()
        assert scalar(database_url, "SELECT count(DISTINCT id) FROM gateway.audit_log WHERE request_id = %s",
                      request_id) == 302
        assert scalar(database_url, "SELECT count(*) FROM gateway.audit_log WHERE request_id = %s"
                      " AND repaired AND model = %s", request_id, "caller\ufffdmodel") == 1
        assert scalar(database_url, "SELECT sum(tokens_in + tokens_out) FROM gateway.audit_log"
                      " WHERE request_id = %s", request_id) == 302 * 10
        assert writer.rejected == 0 and writer.repaired == 1
