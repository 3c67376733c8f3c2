"""Concurrent admissions and settlements share pipelined round trips (issue 11) without losing
atomicity, order or fail-closed behaviour."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters.redis.admission import RedisAdmission
from adapters.redis.admission_view import RedisAdmissionView
from adapters.redis.script_batch import ScriptBatch
from gateway_core.admission import Settlement, Ticket
from gateway_core.budget import Budget, Period
from gateway_core.errors import DependencyUnavailable
from gateway_core.limits import Limits
from tests.services import free_port

NOW = 1_789_999_980.0


def _ticket(tenant: int, limits: Limits, budget: Budget, key_id: int = 1) -> Ticket:
    return Ticket(lease_id=uuid.uuid4().hex, tenant_id=tenant, key_id=key_id, key_limits=limits,
                  tenant_limits=limits, budget=budget, prompt_tokens=10, completion_tokens=10, now=NOW)


async def _reads(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_reads_processed"])


async def test_64_concurrent_admissions_take_far_fewer_reads_than_calls(redis_url: str) -> None:
    redis, probe = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        store, tenant = RedisAdmission(redis), uuid.uuid4().int % 10**9
        limits, budget = Limits(concurrent=40, rpm=1000), Budget(daily=10**9)
        for key_id in range(4):  # loads the script and seeds each key's budget counter
            await store.admit(_ticket(tenant, Limits(), budget, key_id=key_id), seeds={Period.DAILY: 0})
        tickets = [_ticket(tenant, limits, budget, key_id=i % 4) for i in range(64)]
        before = await _reads(probe)
        answers = await asyncio.gather(*(store.admit(t) for t in tickets))
        reads = await _reads(probe) - before
        # Atomic per call: exactly the concurrency limit is granted, whatever the batching.
        granted = [t for t, a in zip(tickets, answers, strict=True) if a.granted]
        assert len(granted) == 40
        assert reads < 16, reads  # one read per batch (+ this probe's own), not one per call
        await asyncio.gather(*(store.settle(Settlement(t, 20, 10, 5, NOW)) for t in granted))
        again = await asyncio.gather(*(store.admit(_ticket(tenant, limits, budget)) for _ in range(41)))
        assert sum(a.granted for a in again) == 40  # every slot came back with its settlement
    finally:
        await redis.aclose()
        await probe.aclose()


async def test_a_settlement_is_seen_by_the_next_admission_of_its_key(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        store, tenant = RedisAdmission(redis), uuid.uuid4().int % 10**9
        budget = Budget(daily=100)
        first = _ticket(tenant, Limits(), budget)
        await store.admit(first, seeds={Period.DAILY: 0})
        # Settled far below its reservation of 20, then admitted again in the same loop round.
        await store.settle(Settlement(first, 20, 1, 1, NOW))
        nxt = await store.admit(_ticket(tenant, Limits(), budget))
        assert nxt.granted and nxt.budget_remaining == 100 - 2 - 20
    finally:
        await redis.aclose()


async def test_every_call_of_a_batch_fails_closed_when_redis_is_gone() -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        store = RedisAdmission(redis)
        results = await asyncio.gather(*(store.admit(_ticket(1, Limits(rpm=1), Budget())) for _ in range(8)),
                                       return_exceptions=True)
    finally:
        await redis.aclose()
    assert all(isinstance(r, DependencyUnavailable) for r in results), results


@pytest.mark.parametrize("flush_between", [False, True])
async def test_a_flushed_script_cache_mid_load_reloads_and_runs_each_call_once(
        redis_url: str, flush_between: bool) -> None:
    redis = Redis.from_url(redis_url)
    try:
        store, tenant = RedisAdmission(redis), uuid.uuid4().int % 10**9
        limits = Limits(rpm=1000)
        await store.admit(_ticket(tenant, limits, Budget()))
        if flush_between:
            await redis.script_flush()
        answers = await asyncio.gather(*(store.admit(_ticket(tenant, limits, Budget())) for _ in range(20)))
        assert all(a.granted for a in answers)
        assert await redis.zcard(f"gw:{{t:{tenant}}}:rq:t") == 21  # no call ran twice
    finally:
        await redis.aclose()


class _SlowScriptServer:
    """Speaks just enough RESP for a client: +OK to anything, and to EVALSHA the call's last argument
    back, the first one only after *first_delay_s* (a Redis stuck in a slow script)."""

    def __init__(self, first_delay_s: float) -> None:
        self.first_delay_s = first_delay_s
        self.evalshas = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readline()
                if not head:
                    return
                parts = []
                for _ in range(int(head[1:])):
                    size = int((await reader.readline())[1:])
                    parts.append((await reader.readexactly(size + 2))[:-2])
                if parts[0].upper() != b"EVALSHA":
                    writer.write(b"+OK\r\n")
                    continue
                self.evalshas += 1
                if self.evalshas == 1:
                    await asyncio.sleep(self.first_delay_s)
                writer.write(b"$%d\r\n%b\r\n" % (len(parts[-1]), parts[-1]))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return


async def test_a_reply_that_comes_too_late_fails_its_batch_and_is_never_read_as_the_next_one() -> None:
    fake = _SlowScriptServer(first_delay_s=0.6)
    port = await fake.start()
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2)
    batch = ScriptBatch(redis, "return ARGV[1]")
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RedisTimeoutError):
            await batch.call(["k"], ["first"])
        assert asyncio.get_running_loop().time() - started < 0.5  # one timeout for the batch, then out
        await asyncio.sleep(0.6)  # the late reply to "first" has been sent by now
        assert await batch.call(["k"], ["second"]) == b"second"
        both = await asyncio.gather(batch.call(["k"], ["a"]), batch.call(["k"], ["b"]))
        assert both == [b"a", b"b"]
    finally:
        await redis.aclose()
        assert fake.server is not None
        fake.server.close()


async def test_a_settlement_waits_briefly_for_company_and_goes_out_alone_without_it(redis_url: str) -> None:
    redis, probe = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        store, tenant = RedisAdmission(redis), uuid.uuid4().int % 10**9
        budget = Budget(daily=1000)
        first = _ticket(tenant, Limits(concurrent=1), budget)
        await store.admit(first, seeds={Period.DAILY: 0})
        loop = asyncio.get_running_loop()

        # Alone: it still goes out, after at most a few milliseconds.
        started = loop.time()
        await store.settle(Settlement(first, 20, 2, 3, NOW))
        assert loop.time() - started < 0.5
        second = _ticket(tenant, Limits(concurrent=1), budget)
        admitted = await store.admit(second)
        assert admitted.granted and admitted.budget_remaining == 1000 - 5 - 20

        # With an admission right behind it: one round trip for both, the settlement first (the
        # concurrency slot it frees is what lets the admission in).
        before = await _reads(probe)
        settling = asyncio.ensure_future(store.settle(Settlement(second, 20, 1, 1, NOW)))
        await asyncio.sleep(0)
        third = await store.admit(_ticket(tenant, Limits(concurrent=1), budget))
        await settling
        assert third.granted and third.budget_remaining == 1000 - 5 - 2 - 20
        assert await _reads(probe) - before == 2  # the batch's read and this probe's own
    finally:
        await redis.aclose()
        await probe.aclose()


async def test_the_read_only_view_sees_this_process_settlements_still_on_their_way(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        store, tenant = RedisAdmission(redis), uuid.uuid4().int % 10**9
        view = RedisAdmissionView(redis, settled=store.flush)
        budget = Budget(daily=1000)
        ticket = _ticket(tenant, Limits(), budget)
        await store.admit(ticket, seeds={Period.DAILY: 0})
        settling = asyncio.ensure_future(store.settle(Settlement(ticket, 20, 1, 1, NOW)))
        await asyncio.sleep(0)  # queued, waiting for company
        seen = await view.peek(_ticket(tenant, Limits(), budget))
        assert seen.budget_remaining == 1000 - 2
        await settling
    finally:
        await redis.aclose()


class TestExpiries:
    """Every window and lease structure expires once idle, though admissions push expiries out only
    every REFRESH_EVERY_S per key (and whenever a structure is created)."""

    @staticmethod
    async def _ttls(redis: Redis, tenant: int) -> dict[str, int]:
        names = [n.decode() for n in await redis.keys(f"gw:{{t:{tenant}}}:*")]
        return {n.split(":", 2)[2]: await redis.pttl(n) for n in names if ":ls:" not in n}

    async def test_structures_created_between_refreshes_still_get_an_expiry(
            self, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        redis = Redis.from_url(redis_url)
        try:
            store, tenant = RedisAdmission(redis), uuid.uuid4().int % 10**9
            limits = Limits(concurrent=5, rpm=100, tpm=100_000)
            first = _ticket(tenant, limits, Budget())
            assert (await store.admit(first)).granted
            after_first = await self._ttls(redis, tenant)
            assert len(after_first) == 8 and all(ttl > 0 for ttl in after_first.values()), after_first
            # Settled: the lease sets are empty, so Redis drops them. The next admission, well within
            # the refresh interval, creates them again and must give them an expiry.
            await store.settle(Settlement(first, 20, 10, 5, NOW))
            settled = await self._ttls(redis, tenant)
            assert not [n for n in settled if n.startswith("cc:")]
            # The token logs hold the real count now, still with their expiry (a key used once and
            # never again must not leave a set behind for good).
            assert len(settled) == 6 and all(ttl > 0 for ttl in settled.values()), settled
            second = _ticket(tenant, limits, Budget())
            assert (await store.admit(second)).granted
            after_second = await self._ttls(redis, tenant)
            assert len(after_second) == 8 and all(ttl > 0 for ttl in after_second.values()), after_second
            # Not refreshed: the windows kept the expiry of the first admission.
            await redis.pexpire(f"gw:{{t:{tenant}}}:rq:k:1", 5_000)
            assert (await store.admit(_ticket(tenant, limits, Budget()))).granted
            assert await redis.pttl(f"gw:{{t:{tenant}}}:rq:k:1") <= 5_000
            # Past the interval the next granted admission pushes every expiry out again.
            clock = [time.monotonic() + 31]
            monkeypatch.setattr("adapters.redis.admission.time.monotonic", lambda: clock[0])
            assert (await store.admit(_ticket(tenant, limits, Budget()))).granted
            assert await redis.pttl(f"gw:{{t:{tenant}}}:rq:k:1") > 100_000
        finally:
            await redis.aclose()
