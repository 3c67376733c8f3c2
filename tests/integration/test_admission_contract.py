"""The AdmissionStore contract (SPEC §4.1, §4.2, §4.4, §6.2), once, for the fake and for Redis + Lua."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import pytest
from redis.asyncio import Redis

from adapters.redis.admission import RedisAdmission, budget_key
from gateway_core.admission import LEASE_TTL_S, Admission, Denial, Settlement, Ticket
from gateway_core.budget import NO_RESET_RETRY_AFTER_S, Budget, Period
from gateway_core.errors import DependencyUnavailable
from gateway_core.limits import Limits
from tests.fake_admission import InMemoryAdmission
from tests.services import free_port, redis_client

MINUTE = 1_789_999_980.0  # 2026-09-21 14:13:00 UTC, on a minute boundary


class Store(Protocol):
    async def admit(self, ticket: Ticket, seeds: dict[Period, int] | None = None) -> Admission: ...
    async def settle(self, settlement: Settlement) -> None: ...
    async def release(self, ticket: Ticket, reserved_tokens: int) -> None: ...
    async def renew(self, tickets: list[Ticket], now: float) -> None: ...


class Harness(Protocol):
    store: Store

    async def counter(self, ticket: Ticket, period: Period) -> int | None: ...
    async def flush(self, tenant_id: int) -> None: ...


class FakeHarness:
    def __init__(self) -> None:
        self.fake = InMemoryAdmission()
        self.store: Store = self.fake

    async def counter(self, ticket: Ticket, period: Period) -> int | None:
        return self.fake.counter(ticket, period)

    async def flush(self, tenant_id: int) -> None:
        self.fake.flush()


class RedisHarness:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        # The contract drives time through the tickets; TestRedisTime covers Redis' own clock.
        self.store: Store = RedisAdmission(redis, redis_time=False)

    async def counter(self, ticket: Ticket, period: Period) -> int | None:
        raw = await self.redis.get(budget_key(ticket, period))
        return None if raw is None else int(raw)

    async def flush(self, tenant_id: int) -> None:
        async for key in self.redis.scan_iter(match=f"gw:{{t:{tenant_id}}}:*"):
            await self.redis.delete(key)


@pytest.fixture(params=["fake", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "fake":
        yield FakeHarness()
        return
    redis = redis_client(request.getfixturevalue("redis_url"))
    try:
        yield RedisHarness(redis)
    finally:
        await redis.aclose()


@pytest.fixture
def store(harness: Harness) -> Store:
    return harness.store


@pytest.fixture
def tenant() -> int:
    return uuid.uuid4().int % 10**9


def ticket(tenant_id: int, *, key_id: int = 1, now: float = MINUTE, key: Limits | None = None,
           tenant: Limits | None = None, budget: Budget | None = None, prompt: int = 10,
           completion: int = 10) -> Ticket:
    tenant_limits = tenant or Limits()
    return Ticket(lease_id=uuid.uuid4().hex, tenant_id=tenant_id, key_id=key_id,
                  key_limits=(key or Limits()).over(tenant_limits), tenant_limits=tenant_limits,
                  budget=budget or Budget(), prompt_tokens=prompt, completion_tokens=completion, now=now)


def settlement(t: Ticket, admission: Admission, prompt: int, completion: int, at: float = 1.0) -> Settlement:
    reserved = t.prompt_tokens + admission.completion_tokens
    return Settlement(ticket=t, reserved_tokens=reserved, prompt_tokens=prompt,
                      completion_tokens=completion, now=t.now + at)


class TestRequestsPerMinute:
    async def test_sixth_request_within_a_minute_is_denied(self, store: Store, tenant: int) -> None:
        rpm5 = Limits(rpm=5)
        for i in range(5):
            a = await store.admit(ticket(tenant, tenant=rpm5, now=MINUTE + i))
            assert a.granted
            assert a.requests is not None and a.requests.remaining == 4 - i
        denied = await store.admit(ticket(tenant, tenant=rpm5, now=MINUTE + 10))
        assert (denied.granted, denied.denial) == (False, Denial.RPM)
        assert denied.retry_after_s >= 1
        assert denied.retry_after_s == pytest.approx(50)
        assert denied.requests is not None
        assert (denied.requests.limit, denied.requests.remaining) == (5, 0)

    async def test_no_double_burst_across_a_minute_boundary(self, store: Store, tenant: int) -> None:
        rpm5 = Limits(rpm=5)
        for _ in range(5):
            assert (await store.admit(ticket(tenant, tenant=rpm5, now=MINUTE + 59.9))).granted
        after_boundary = await store.admit(ticket(tenant, tenant=rpm5, now=MINUTE + 60.1))
        assert after_boundary.denial is Denial.RPM
        assert after_boundary.retry_after_s == pytest.approx(59.8)
        assert (await store.admit(ticket(tenant, tenant=rpm5, now=MINUTE + 119.8))).denial is Denial.RPM
        assert (await store.admit(ticket(tenant, tenant=rpm5, now=MINUTE + 119.9))).granted

    async def test_a_grant_reports_remaining_and_full_reset(self, store: Store, tenant: int) -> None:
        a = await store.admit(ticket(tenant, tenant=Limits(rpm=3, tpm=1000), prompt=100, completion=50))
        assert a.requests is not None and a.tokens is not None
        assert (a.requests.limit, a.requests.remaining, a.requests.reset_s) == (3, 2, 60)
        assert (a.tokens.limit, a.tokens.remaining, a.tokens.reset_s) == (1000, 850, 60)
        assert a.completion_tokens == 50

    async def test_unlimited_keys_report_no_windows(self, store: Store, tenant: int) -> None:
        a = await store.admit(ticket(tenant))
        assert a.granted and a.requests is None and a.tokens is None and a.budget_period is None

    async def test_a_zero_limit_denies_and_says_waiting_cannot_help(self, store: Store, tenant: int) -> None:
        a = await store.admit(ticket(tenant, key=Limits(rpm=0), tenant=Limits(rpm=10)))
        assert (a.denial, a.should_retry) == (Denial.RPM, False)


class TestTokensPerMinute:
    async def test_the_estimate_enters_the_window_at_admission(self, store: Store, tenant: int) -> None:
        tpm = Limits(tpm=1000)
        first = await store.admit(ticket(tenant, tenant=tpm, prompt=300, completion=200))
        second = await store.admit(ticket(tenant, tenant=tpm, now=MINUTE + 20, prompt=300, completion=200))
        assert first.tokens is not None and first.tokens.remaining == 500
        assert second.tokens is not None and second.tokens.remaining == 0
        third = await store.admit(ticket(tenant, tenant=tpm, now=MINUTE + 30, prompt=1))
        assert third.denial is Denial.TPM
        assert third.retry_after_s == pytest.approx(30)  # when the first estimate leaves
        assert third.should_retry

    async def test_settlement_replaces_the_estimate_with_real_usage(self, store: Store, tenant: int) -> None:
        tpm = Limits(tpm=1000)
        t1 = ticket(tenant, tenant=tpm, prompt=300, completion=200)
        a1 = await store.admit(t1)
        assert (await store.admit(ticket(tenant, tenant=tpm, prompt=300, completion=200))).granted
        await store.settle(settlement(t1, a1, prompt=280, completion=20))
        after = await store.admit(ticket(tenant, tenant=tpm, now=MINUTE + 5, prompt=100, completion=100))
        assert after.granted
        assert after.tokens is not None and after.tokens.remaining == 1000 - 300 - 500 - 200
        # The corrected entry keeps its admission time: it leaves the window at MINUTE + 60.
        big = await store.admit(ticket(tenant, tenant=tpm, now=MINUTE + 6, prompt=350, completion=0))
        assert big.denial is Denial.TPM and big.retry_after_s == pytest.approx(54)

    async def test_retry_after_waits_until_enough_tokens_have_left(self, store: Store, tenant: int) -> None:
        tpm = Limits(tpm=1000)
        for at in (0, 10, 20):
            assert (await store.admit(ticket(tenant, tenant=tpm, now=MINUTE + at, prompt=300))).granted
        a = await store.admit(ticket(tenant, tenant=tpm, now=MINUTE + 30, prompt=600))
        assert a.denial is Denial.TPM
        assert a.retry_after_s == pytest.approx(40)  # the first two entries (310 each) must leave

    async def test_an_estimate_above_the_limit_is_denied_for_good(self, store: Store, tenant: int) -> None:
        a = await store.admit(ticket(tenant, tenant=Limits(tpm=100), prompt=80, completion=80))
        assert (a.denial, a.should_retry) == (Denial.TPM, False)
        assert a.retry_after_s == pytest.approx(60)


class TestConcurrency:
    async def test_third_concurrent_request_is_denied(self, store: Store, tenant: int) -> None:
        two = Limits(concurrent=2)
        assert (await store.admit(ticket(tenant, tenant=two))).granted
        assert (await store.admit(ticket(tenant, tenant=two))).granted
        third = await store.admit(ticket(tenant, tenant=two))
        assert third.denial is Denial.CONCURRENCY and third.retry_after_s == pytest.approx(1)

    async def test_settle_and_release_return_the_slot(self, store: Store, tenant: int) -> None:
        two = Limits(concurrent=2)
        t1, t2 = ticket(tenant, tenant=two), ticket(tenant, tenant=two)
        a1, _ = await store.admit(t1), await store.admit(t2)
        await store.settle(settlement(t1, a1, 10, 5))
        t3 = ticket(tenant, tenant=two, now=MINUTE + 2)
        assert (await store.admit(t3)).granted
        assert (await store.admit(ticket(tenant, tenant=two, now=MINUTE + 2))).denial is Denial.CONCURRENCY
        await store.release(t2, 20)
        assert (await store.admit(ticket(tenant, tenant=two, now=MINUTE + 3))).granted

    async def test_an_expired_lease_frees_its_slot(self, store: Store, tenant: int) -> None:
        one = Limits(concurrent=1)
        assert (await store.admit(ticket(tenant, tenant=one))).granted
        assert (await store.admit(ticket(tenant, tenant=one, now=MINUTE + LEASE_TTL_S - 1))).denial \
            is Denial.CONCURRENCY
        assert (await store.admit(ticket(tenant, tenant=one, now=MINUTE + LEASE_TTL_S))).granted

    async def test_renewal_keeps_a_live_lease_past_its_first_expiry(self, store: Store, tenant: int) -> None:
        one = Limits(concurrent=1)
        live = ticket(tenant, tenant=one)
        assert (await store.admit(live)).granted
        await store.renew([live], MINUTE + LEASE_TTL_S - 5)
        later = MINUTE + 2 * LEASE_TTL_S - 6
        assert (await store.admit(ticket(tenant, tenant=one, now=later))).denial is Denial.CONCURRENCY
        assert (await store.admit(ticket(tenant, tenant=one, now=later + 1))).granted

    async def test_renewal_does_not_revive_a_settled_lease(self, store: Store, tenant: int) -> None:
        one = Limits(concurrent=1)
        done = ticket(tenant, tenant=one)
        await store.settle(settlement(done, await store.admit(done), 10, 10))
        await store.renew([done], MINUTE + 5)
        assert (await store.admit(ticket(tenant, tenant=one, now=MINUTE + 6))).granted


class TestKeyAndTenantLimits:
    async def test_keys_of_one_tenant_share_the_tenant_rpm(self, store: Store, tenant: int) -> None:
        rpm3 = Limits(rpm=3)
        assert (await store.admit(ticket(tenant, key_id=1, tenant=rpm3))).granted
        assert (await store.admit(ticket(tenant, key_id=1, tenant=rpm3))).granted
        assert (await store.admit(ticket(tenant, key_id=2, tenant=rpm3))).granted
        denied = await store.admit(ticket(tenant, key_id=2, tenant=rpm3))
        assert denied.denial is Denial.RPM
        assert denied.requests is not None and (denied.requests.limit, denied.requests.remaining) == (3, 0)

    async def test_a_keys_own_lower_limit_binds_first(self, store: Store, tenant: int) -> None:
        tenant_limits = Limits(rpm=10)
        for _ in range(2):
            a = await store.admit(ticket(tenant, key_id=1, key=Limits(rpm=2), tenant=tenant_limits))
            assert a.granted and a.requests is not None and a.requests.limit == 2
        assert (await store.admit(ticket(tenant, key_id=1, key=Limits(rpm=2), tenant=tenant_limits))).denial \
            is Denial.RPM
        other = await store.admit(ticket(tenant, key_id=2, tenant=tenant_limits))
        assert other.granted and other.requests is not None
        assert (other.requests.limit, other.requests.remaining) == (10, 7)

    async def test_tenant_concurrency_is_an_aggregate(self, store: Store, tenant: int) -> None:
        two = Limits(concurrent=2)
        assert (await store.admit(ticket(tenant, key_id=1, tenant=two))).granted
        assert (await store.admit(ticket(tenant, key_id=2, tenant=two))).granted
        assert (await store.admit(ticket(tenant, key_id=3, tenant=two))).denial is Denial.CONCURRENCY

    async def test_tenants_do_not_share_windows(self, store: Store, tenant: int) -> None:
        one = Limits(rpm=1)
        assert (await store.admit(ticket(tenant, tenant=one))).granted
        assert (await store.admit(ticket(tenant + 1, tenant=one))).granted


class TestOrderOfChecks:
    async def test_concurrency_is_reported_before_rpm(self, store: Store, tenant: int) -> None:
        limits = Limits(rpm=1, concurrent=1)
        first = ticket(tenant, tenant=limits)
        a = await store.admit(first)
        assert (await store.admit(ticket(tenant, tenant=limits))).denial is Denial.CONCURRENCY
        await store.settle(settlement(first, a, 10, 10))
        assert (await store.admit(ticket(tenant, tenant=limits))).denial is Denial.RPM

    async def test_tpm_is_reported_before_an_exhausted_budget(self, store: Store, tenant: int) -> None:
        t = ticket(tenant, tenant=Limits(tpm=50), budget=Budget(daily=100), prompt=40, completion=40)
        a = await store.admit(t, seeds={Period.DAILY: 100})
        assert a.denial is Denial.TPM


class TestDeniedConsumesNothing:
    async def test_a_tpm_denial_takes_no_slot_no_request_and_no_budget(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        limits, budget = Limits(rpm=2, tpm=100, concurrent=2), Budget(daily=1000)
        big = ticket(tenant, tenant=limits, budget=budget, prompt=90, completion=90)
        assert (await store.admit(big, seeds={Period.DAILY: 0})).denial is Denial.TPM
        assert await harness.counter(big, Period.DAILY) == 0
        for _ in range(2):
            assert (await store.admit(ticket(tenant, tenant=limits, budget=budget, prompt=20))).granted
        assert await harness.counter(big, Period.DAILY) == 60

    async def test_a_budget_denial_takes_no_slot_no_request_and_no_tokens(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        limits = Limits(rpm=1, tpm=100, concurrent=1)
        broke = ticket(tenant, tenant=limits, budget=Budget(daily=50), prompt=60)
        assert (await store.admit(broke, seeds={Period.DAILY: 0})).denial is Denial.BUDGET
        after = await store.admit(ticket(tenant, tenant=limits, prompt=90, completion=10))
        assert after.granted
        assert await harness.counter(broke, Period.DAILY) == 0

    async def test_a_concurrency_denial_takes_no_request(self, store: Store, tenant: int) -> None:
        limits = Limits(rpm=2, concurrent=1)
        assert (await store.admit(ticket(tenant, tenant=limits))).granted
        assert (await store.admit(ticket(tenant, tenant=limits))).denial is Denial.CONCURRENCY
        late = await store.admit(ticket(tenant, tenant=limits, now=MINUTE + LEASE_TTL_S - 0.5))
        assert late.denial is Denial.CONCURRENCY
        assert late.requests is not None and late.requests.remaining == 1


class TestBudget:
    async def test_a_grant_reserves_in_every_configured_period(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        t = ticket(tenant, budget=Budget(daily=1000, monthly=5000), prompt=100, completion=200)
        a = await store.admit(t, seeds={Period.DAILY: 0, Period.MONTHLY: 4100})
        assert a.granted and a.completion_tokens == 200
        assert a.reserved == {Period.DAILY: 300, Period.MONTHLY: 300}
        assert (a.budget_period, a.budget_remaining) == (Period.MONTHLY, 600)
        assert await harness.counter(t, Period.DAILY) == 300
        assert await harness.counter(t, Period.MONTHLY) == 4400

    async def test_completion_is_capped_to_what_remains(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        t = ticket(tenant, budget=Budget(daily=1000), prompt=100, completion=200)
        a = await store.admit(t, seeds={Period.DAILY: 850})
        assert a.granted and a.completion_tokens == 50
        assert a.reserved == {Period.DAILY: 150}
        assert (a.budget_period, a.budget_remaining) == (Period.DAILY, 0)
        assert await harness.counter(t, Period.DAILY) == 1000

    async def test_exhaustion_denies_until_the_period_resets(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        t = ticket(tenant, budget=Budget(daily=1000, monthly=10_000), prompt=100)
        a = await store.admit(t, seeds={Period.DAILY: 900, Period.MONTHLY: 0})
        assert (a.granted, a.denial, a.denied_period) == (False, Denial.BUDGET, Period.DAILY)
        assert a.retry_after_s == pytest.approx(Period.DAILY.seconds_to_reset(MINUTE))
        assert a.should_retry
        assert (a.budget_period, a.budget_remaining) == (Period.DAILY, 100)
        assert await harness.counter(t, Period.DAILY) == 900

    async def test_of_several_exhausted_periods_the_later_reset_is_reported(
        self, store: Store, tenant: int
    ) -> None:
        t = ticket(tenant, budget=Budget(daily=100, monthly=100), prompt=10)
        a = await store.admit(t, seeds={Period.DAILY: 100, Period.MONTHLY: 100})
        assert a.denied_period is Period.MONTHLY
        assert a.retry_after_s == pytest.approx(Period.MONTHLY.seconds_to_reset(MINUTE))

    async def test_an_exhausted_total_budget_never_resets(self, store: Store, tenant: int) -> None:
        t = ticket(tenant, budget=Budget(daily=10_000, total=500), prompt=10)
        a = await store.admit(t, seeds={Period.DAILY: 0, Period.TOTAL: 495})
        assert (a.denial, a.denied_period) == (Denial.BUDGET, Period.TOTAL)
        assert a.retry_after_s == NO_RESET_RETRY_AFTER_S == 86400
        assert not a.should_retry

    async def test_settlement_returns_the_unused_reservation(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        t = ticket(tenant, budget=Budget(daily=1000, total=10_000), prompt=100, completion=200)
        a = await store.admit(t, seeds={Period.DAILY: 0, Period.TOTAL: 50})
        await store.settle(settlement(t, a, prompt=90, completion=30))
        assert await harness.counter(t, Period.DAILY) == 120
        assert await harness.counter(t, Period.TOTAL) == 170

    async def test_release_returns_the_whole_reservation(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        tpm, budget = Limits(tpm=1000), Budget(daily=1000)
        t = ticket(tenant, tenant=tpm, budget=budget, prompt=100, completion=200)
        a = await store.admit(t, seeds={Period.DAILY: 10})
        await store.release(t, a.reserved[Period.DAILY])
        assert await harness.counter(t, Period.DAILY) == 10
        again = await store.admit(ticket(tenant, tenant=tpm, budget=budget, prompt=5))
        assert again.tokens is not None and again.tokens.remaining == 1000 - 15

    async def test_settlement_does_not_recreate_a_flushed_counter(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        t = ticket(tenant, budget=Budget(daily=1000), prompt=100, completion=200)
        a = await store.admit(t, seeds={Period.DAILY: 0})
        await harness.flush(tenant)
        await store.settle(settlement(t, a, prompt=100, completion=150))
        assert await harness.counter(t, Period.DAILY) is None

    async def test_a_settlement_lost_in_a_flush_adds_its_real_usage(
            self, harness: Harness, store: Store, tenant: int) -> None:
        t = ticket(tenant, budget=Budget(daily=1000), prompt=100, completion=200)
        a = await store.admit(t, seeds={Period.DAILY: 0})
        await harness.flush(tenant)
        assert (await store.admit(ticket(tenant, budget=Budget(daily=1000)), seeds={Period.DAILY: 0})).granted
        await store.settle(settlement(t, a, prompt=10, completion=0))
        # The flush took t's reservation with it and the rebuilt counter lacks t: its real 10 is
        # added, and its 300 reservation is not taken back from a counter that never held it.
        assert await harness.counter(t, Period.DAILY) == 30

    async def test_a_missing_counter_asks_for_seeds_then_decides(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        budget, rpm1 = Budget(daily=1000, monthly=5000, total=9000), Limits(rpm=1)
        t = ticket(tenant, tenant=rpm1, budget=budget, prompt=100, completion=100)
        first = await store.admit(t, seeds={Period.MONTHLY: 1000})
        assert not first.granted and first.denial is None
        assert first.missing_periods == (Period.DAILY, Period.TOTAL)
        assert await harness.counter(t, Period.DAILY) is None
        seeded = await store.admit(t, seeds={Period.DAILY: 200, Period.TOTAL: 8500})
        assert seeded.granted, "asking for seeds must not have used the only request of the minute"
        assert seeded.reserved == {Period.DAILY: 200, Period.MONTHLY: 200, Period.TOTAL: 200}
        assert (seeded.budget_period, seeded.budget_remaining) == (Period.TOTAL, 300)
        assert await harness.counter(t, Period.MONTHLY) == 1200

    async def test_seeds_never_overwrite_an_existing_counter(
        self, harness: Harness, store: Store, tenant: int
    ) -> None:
        budget = Budget(daily=1000)
        t1 = ticket(tenant, budget=budget, prompt=100, completion=200)
        assert (await store.admit(t1, seeds={Period.DAILY: 0})).granted
        t2 = ticket(tenant, budget=budget, prompt=10, completion=10)
        assert (await store.admit(t2, seeds={Period.DAILY: 0})).granted
        assert await harness.counter(t1, Period.DAILY) == 320

    async def test_a_new_day_starts_a_new_counter(self, store: Store, tenant: int) -> None:
        budget = Budget(daily=1000)
        assert (await store.admit(ticket(tenant, budget=budget), seeds={Period.DAILY: 0})).granted
        to_midnight = Period.DAILY.seconds_to_reset(MINUTE)
        assert to_midnight is not None
        a = await store.admit(ticket(tenant, budget=budget, now=MINUTE + to_midnight + 1))
        assert a.missing_periods == (Period.DAILY,)

    async def test_concurrent_admissions_never_reserve_beyond_the_budget(
        self, request: pytest.FixtureRequest, harness: Harness, tenant: int
    ) -> None:
        # Two stores, as two replicas would be; for Redis each with its own client.
        second = redis_client(request.getfixturevalue("redis_url"))
        replica = RedisAdmission(second, redis_time=False) if isinstance(harness, RedisHarness) \
            else harness.store
        budget = Budget(total=2050)
        seed = ticket(tenant, budget=budget)
        await harness.store.admit(seed, seeds={Period.TOTAL: 0})
        await harness.store.release(seed, 20)
        tickets = [ticket(tenant, budget=budget, prompt=30, completion=70, now=MINUTE + i / 100)
                   for i in range(40)]
        try:
            results = await asyncio.gather(
                *((harness.store, replica)[i % 2].admit(t) for i, t in enumerate(tickets)))
        finally:
            await second.aclose()
        reserved = sum(a.reserved.get(Period.TOTAL, 0) for a in results)
        assert reserved == 2050
        assert sum(a.granted for a in results) == 21
        assert all(a.denial is Denial.BUDGET for a in results if not a.granted)
        assert await harness.counter(seed, Period.TOTAL) == 2050


class TestSettleOnce:
    async def test_a_second_settle_of_the_same_lease_changes_nothing(
            self, harness: Harness, store: Store, tenant: int) -> None:
        budget, tpm = Budget(daily=1000), Limits(tpm=1000, concurrent=1)
        t = ticket(tenant, tenant=tpm, budget=budget, prompt=100, completion=200)
        a = await store.admit(t, seeds={Period.DAILY: 0})
        assert a.granted
        done = settlement(t, a, 100, 50)
        await store.settle(done)
        await store.settle(done)  # a retry after a lost answer
        await store.release(t, 300)  # and a late release
        assert await harness.counter(t, Period.DAILY) == 150
        # tpm and the budget hold the real 150 once, and the one slot is free again
        probe = await store.admit(ticket(tenant, tenant=tpm, budget=budget, prompt=849, completion=0,
                                         now=MINUTE + 2))
        assert probe.granted and probe.budget_remaining == 1
        assert await harness.counter(t, Period.DAILY) == 999

    async def test_a_second_release_changes_nothing(
            self, harness: Harness, store: Store, tenant: int) -> None:
        budget = Budget(daily=1000)
        first = ticket(tenant, budget=budget, prompt=100, completion=100)
        await store.admit(first, seeds={Period.DAILY: 0})
        second = ticket(tenant, budget=budget, prompt=100, completion=100, now=MINUTE + 1)
        await store.admit(second)
        await store.release(first, 200)
        await store.release(first, 200)
        assert await harness.counter(first, Period.DAILY) == 200


class TestRedisTime:
    """Leases and windows run on Redis' clock: replicas whose clocks disagree still agree."""

    async def test_a_replica_clock_far_ahead_does_not_escape_the_rpm_window(self, redis_url: str) -> None:
        redis = Redis.from_url(redis_url)
        try:
            store, tenant, one = RedisAdmission(redis), uuid.uuid4().int % 10**9, Limits(rpm=1)
            wall = float((await redis.time())[0])
            assert (await store.admit(ticket(tenant, tenant=one, now=wall - 300))).granted
            ahead = await store.admit(ticket(tenant, tenant=one, now=wall + 300))
        finally:
            await redis.aclose()
        assert ahead.denial is Denial.RPM
        assert 50 < ahead.retry_after_s <= 60

    async def test_a_replica_clock_behind_does_not_shorten_a_lease(self, redis_url: str) -> None:
        redis = Redis.from_url(redis_url)
        try:
            store, tenant, one = RedisAdmission(redis), uuid.uuid4().int % 10**9, Limits(concurrent=1)
            secs, micros = await redis.time()
            wall = secs + micros / 1e6
            t = ticket(tenant, tenant=one, now=wall - 3600)  # this replica is an hour behind
            assert (await store.admit(t)).granted
            (_, expiry), = await redis.zrange(f"gw:{{t:{tenant}}}:cc:t", 0, -1, withscores=True)
            assert abs(expiry / 1000 - (wall + LEASE_TTL_S)) < 5
            # another replica an hour ahead still sees the slot taken
            assert (await store.admit(ticket(tenant, tenant=one, now=wall + 3600))).denial \
                is Denial.CONCURRENCY
            await store.renew([t], wall - 3600)
            (_, renewed), = await redis.zrange(f"gw:{{t:{tenant}}}:cc:t", 0, -1, withscores=True)
            assert renewed >= expiry
            await store.settle(Settlement(ticket=t, reserved_tokens=20, prompt_tokens=10,
                                          completion_tokens=5, now=wall))
            assert (await store.admit(ticket(tenant, tenant=one, now=wall + 3600))).granted
        finally:
            await redis.aclose()


class TestFakeMatchesRedis:
    async def test_a_random_workload_gets_identical_answers(self, redis_url: str) -> None:
        redis, fake = redis_client(redis_url), FakeHarness()
        real = RedisHarness(redis)
        rng, tenant, now = random.Random(20260921), uuid.uuid4().int % 10**9, MINUTE
        tenant_limits = Limits(rpm=7, tpm=3500, concurrent=6)
        keys = {1: (Limits(rpm=4, tpm=1800, concurrent=4), Budget(daily=20_000, total=60_000)),
                2: (Limits(), Budget())}
        in_flight: list[tuple[Ticket, Admission]] = []
        try:
            for _ in range(600):
                now += rng.choice([0, 0.001, 0.2, 0.5, 1, 3, 20])
                roll = rng.random()
                if roll < 0.5:
                    key_id = rng.choice([1, 2])
                    key_limits, budget = keys[key_id]
                    t = ticket(tenant, key_id=key_id, now=now, key=key_limits, tenant=tenant_limits,
                               budget=budget, prompt=rng.randint(0, 200), completion=rng.randint(0, 300))
                    answers = [await h.store.admit(t) for h in (fake, real)]
                    assert answers[0] == answers[1]
                    if answers[0].missing_periods:
                        caps = budget.caps()
                        seeds = {p: rng.randint(0, caps[p]) for p in answers[0].missing_periods}
                        answers = [await h.store.admit(t, seeds) for h in (fake, real)]
                        assert answers[0] == answers[1]
                    if answers[0].granted:
                        in_flight.append((t, answers[0]))
                elif roll < 0.8 and in_flight:
                    t, a = in_flight.pop(rng.randrange(len(in_flight)))
                    done = settlement(t, a, rng.randint(0, 500), rng.randint(0, 700))
                    for h in (fake, real):
                        await h.store.settle(done)
                elif roll < 0.9 and in_flight:
                    t, a = in_flight.pop(rng.randrange(len(in_flight)))
                    for h in (fake, real):
                        await h.store.release(t, t.prompt_tokens + a.completion_tokens)
                elif roll < 0.98:
                    for h in (fake, real):
                        await h.store.renew([t for t, _ in in_flight], now)
                else:
                    for h in (fake, real):
                        await h.flush(tenant)
                probe = ticket(tenant, key_id=1, now=now, budget=keys[1][1])
                for period in keys[1][1].caps():
                    assert await fake.counter(probe, period) == await real.counter(probe, period)
        finally:
            await redis.aclose()


class TestRedisRoundTrips:
    async def test_admit_is_exactly_one_evalsha(self, redis_url: str) -> None:
        # The monitor gets a client of its own, so the store keeps its one warm connection.
        redis, watcher = Redis.from_url(redis_url), Redis.from_url(redis_url)
        try:
            store, tenant = RedisAdmission(redis), uuid.uuid4().int % 10**9
            limits, budget = Limits(rpm=100, tpm=10_000, concurrent=10), Budget(daily=10_000, total=50_000)
            warm = ticket(tenant, tenant=limits, budget=budget)
            await store.admit(warm, seeds={Period.DAILY: 0, Period.TOTAL: 0})  # loads the script
            before = await redis.info("commandstats")
            async with watcher.monitor() as monitor:
                await store.admit(ticket(tenant, tenant=limits, budget=budget, now=MINUTE + 1))
                await redis.echo("admission-round-trip-done")
                sent = []
                while (seen := await monitor.next_command())["command"] != "ECHO admission-round-trip-done":
                    if seen["client_type"] != "lua":
                        sent.append(seen["command"].split(" ")[0].upper())
            after = await redis.info("commandstats")
        finally:
            await redis.aclose()
            await watcher.aclose()
        assert sent == ["EVALSHA"]
        assert _calls(after, "evalsha") - _calls(before, "evalsha") == 1
        assert _calls(after, "script|load") == _calls(before, "script|load")
        assert _calls(after, "eval") == _calls(before, "eval")

    async def test_a_flushed_script_cache_is_reloaded(self, redis_url: str) -> None:
        redis = Redis.from_url(redis_url)
        try:
            store = RedisAdmission(redis)
            await redis.script_flush()
            assert (await store.admit(ticket(uuid.uuid4().int % 10**9, tenant=Limits(rpm=1)))).granted
        finally:
            await redis.aclose()

    async def test_an_unreachable_redis_fails_closed(self) -> None:
        redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
        try:
            with pytest.raises(DependencyUnavailable):
                await RedisAdmission(redis).admit(ticket(1, tenant=Limits(rpm=1)))
        finally:
            await redis.aclose()

    async def test_keys_of_one_decision_share_the_tenant_hash_tag(self, redis_url: str) -> None:
        redis = Redis.from_url(redis_url)
        try:
            tenant = uuid.uuid4().int % 10**9
            t = ticket(tenant, key_id=42, tenant=Limits(rpm=5, tpm=500, concurrent=2),
                       budget=Budget(daily=1000, monthly=2000, total=3000))
            await RedisAdmission(redis).admit(t, seeds=dict.fromkeys(Period, 0))
            keys = [k.decode() async for k in redis.scan_iter(match=f"*{tenant}*")]
        finally:
            await redis.aclose()
        tag = f"gw:{{t:{tenant}}}:"
        assert keys and all(k.startswith(tag) for k in keys)
        assert f"{tag}rq:k:42" in keys and f"{tag}bud:42:daily:20260921" in keys
        assert f"{tag}bud:42:monthly:20260901" in keys and f"{tag}bud:42:total:19700101" in keys


def _calls(commandstats: dict[str, dict[str, int]], command: str) -> int:
    return int(commandstats.get(f"cmdstat_{command}", {}).get("calls", 0))
