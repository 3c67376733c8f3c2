"""SIGKILL during a PostgreSQL outage (SPEC §8.3): rows reach the spool as they queue, synced at
least once a second, and the next gateway on the same spool writes each exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest_faults import (
    GatewayProcess,
    PrivateStack,
    audit_rows,
    new_key,
    private_stack,
    wait_for_audit,
    wait_for_ledger,
)
from tests.e2e.harness import gateway_settings
from tests.e2e.test_fail_closed import Reply, Stream, refusals_without_a_dependency, send, usage_of
from tests.fake_ollama import FakeOllama


@pytest.fixture(scope="module")
def stack() -> Iterator[PrivateStack]:
    with private_stack() as stack:
        yield stack


class TestCrashDuringPostgresOutage:
    async def test_every_answer_before_a_sigkill_has_one_audit_row_and_its_ledger_usage(
        self, stack: PrivateStack, fake: FakeOllama, tmp_path: Path
    ) -> None:
        spool = tmp_path / "spool"
        settings = gateway_settings(stack.database_url, stack.redis_url, fake.url, spool)
        secret, prefix, _ = await new_key(settings)
        first = GatewayProcess(stack, fake.url, spool, tmp_path / "first.log")
        second = GatewayProcess(stack, fake.url, spool, tmp_path / "second.log")
        answered: list[tuple[float, Reply]] = []
        try:
            await first.start()
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    answered.append((time.monotonic(), await send(http, first.url, secret)))
                fake.token_delay_s = 0.1
                streams = [Stream(http, first.url, secret) for _ in range(3)]
                for stream in streams:
                    await stream.open()
                await asyncio.to_thread(stack.stop_pg)
                streamed = [await stream.finish() for stream in streams]  # settled with PostgreSQL down
                finished = time.monotonic()
                fake.token_delay_s = 0.0
                while time.monotonic() - finished < 3.0:
                    answered.append((time.monotonic(), await send(http, first.url, secret)))
                    await asyncio.sleep(0.05)
            killed = time.monotonic()
            first.kill()  # SIGKILL: no shutdown, no flush, no final spool
            assert [r.status for _, r in answered[:3]] == [200, 200, 200]
            assert {(r.status, r.code) for _, r in answered[3:]} == {(503, "dependency_unavailable")}
            assert not refusals_without_a_dependency(first.log, [r for _, r in answered[3:]])

            await asyncio.to_thread(stack.start_pg)
            await second.start()  # replays the spool the killed gateway left
            must = {r.request_id: r.status for at, r in answered if killed - at >= 1.0}
            must |= {s.request_id: 200 for s in streams}
            may = [r.request_id for at, r in answered if killed - at < 1.0]
            rows = await wait_for_audit(stack.database_url, list(must), timeout_s=20)
            assert {rid: [row["status"] for row in got] for rid, got in rows.items()} == \
                {rid: [status] for rid, status in must.items()}
            late = await audit_rows(stack.database_url, may)
            assert len(late) == len({row["request_id"] for row in late})  # never twice
            print(f"\n{len(must)} answers before the last second all written once; "
                  f"{len(late)} of the {len(may)} in the last second too")
            told = (3 + len(streams),
                    sum(usage_of(r)[0] for _, r in answered[:3]) + sum(p for p, _ in streamed),
                    sum(usage_of(r)[1] for _, r in answered[:3]) + sum(c for _, c in streamed))
            assert await wait_for_ledger(stack.database_url, prefix, told) == told
            second.sigterm()
            assert await second.wait(20) == 0, second.tail()
        finally:
            first.kill()
            second.kill()
