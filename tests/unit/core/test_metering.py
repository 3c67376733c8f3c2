from __future__ import annotations

import asyncio

import pytest

from gateway_core.admission import Settlement
from gateway_core.budget import Budget
from gateway_core.errors import BudgetExhausted, RateLimitExceeded
from gateway_core.limits import Limits
from gateway_core.metering import Metering
from gateway_core.models import Principal, Scope
from gateway_core.ports import LedgerEntry
from tests.fakes import FrozenClock, InMemoryAdmission, InMemoryLedger


def _principal(budget: Budget = Budget(), key_limits: Limits = Limits()) -> Principal:
    return Principal(key_id=5, key_prefix="nz_abcdefghi", tenant_id=9, tenant_name="acme",
                     scopes=frozenset(Scope), key_limits=key_limits,
                     tenant_limits=Limits(rpm=1000, tpm=1_000_000, concurrent=100), budget=budget)


Rig = tuple[Metering, InMemoryAdmission, InMemoryLedger, FrozenClock]


@pytest.fixture
def rig() -> Rig:
    store, ledger, clock = InMemoryAdmission(), InMemoryLedger(), FrozenClock()
    return Metering(store, ledger, clock, default_completion_reserve=512), store, ledger, clock


class TestMetering:
    async def test_settlement_charges_real_usage_to_the_ledger(self, rig: Rig) -> None:
        metering, _, ledger, clock = rig
        grant = await metering.admit(_principal(), prompt_tokens=10, completion_tokens=None)
        assert grant.admission.completion_tokens == 512 and grant.completion_cap is None
        await metering.settle(grant, 9, 20)
        await metering.settle(grant, 9, 20)  # settling twice charges once
        assert ledger.entries == [LedgerEntry(grant.ticket.lease_id, 5, clock.now(), 9, 20)]

    async def test_a_budget_caps_the_completion_and_exhaustion_is_budget_exhausted(self, rig: Rig) -> None:
        metering, _, _, _ = rig
        principal = _principal(Budget(daily=100))
        grant = await metering.admit(principal, prompt_tokens=40, completion_tokens=200)
        assert grant.completion_cap == 60
        await metering.settle(grant, 40, 60)
        with pytest.raises(BudgetExhausted) as caught:
            await metering.admit(principal, prompt_tokens=1, completion_tokens=1)
        assert "daily" in caught.value.message and caught.value.retry_after_s
        assert caught.value.headers["X-Budget-Tokens-Remaining"] == "0"

    async def test_a_lost_counter_is_rebuilt_from_the_ledger_not_refilled(self, rig: Rig) -> None:
        metering, store, ledger, clock = rig
        principal = _principal(Budget(total=100))
        grant = await metering.admit(principal, prompt_tokens=30, completion_tokens=30)
        await metering.settle(grant, 30, 30)
        store.flush()  # Redis restarted
        with pytest.raises(BudgetExhausted):  # 40 left cannot even cover a 45-token prompt
            await metering.admit(principal, prompt_tokens=45, completion_tokens=30)
        grant = await metering.admit(principal, prompt_tokens=20, completion_tokens=100)
        assert grant.completion_cap == 20  # 100 - 60 already spent - 20 prompt

    async def test_rate_denials_are_rate_limit_exceeded_with_retry_after(self, rig: Rig) -> None:
        metering, _, _, _ = rig
        principal = _principal(key_limits=Limits(rpm=1))
        await metering.admit(principal, 1, 1)
        with pytest.raises(RateLimitExceeded) as caught:
            await metering.admit(principal, 1, 1)
        assert not isinstance(caught.value, BudgetExhausted)
        assert caught.value.retry_after_s and caught.value.retry_after_s >= 1
        assert "1 requests per minute" in caught.value.message

    async def test_release_returns_the_slot_and_charges_nothing(self, rig: Rig) -> None:
        metering, _, ledger, _ = rig
        principal = _principal(key_limits=Limits(concurrent=1))
        grant = await metering.admit(principal, 1, 1)
        with pytest.raises(RateLimitExceeded):
            await metering.admit(principal, 1, 1)
        await metering.release(grant)
        assert await metering.admit(principal, 1, 1)
        assert ledger.entries == []


class _SlowSettling(InMemoryAdmission):
    """Redis answering settlements only when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = asyncio.Event()
        self.settled = 0

    async def settle(self, settlement: Settlement) -> None:
        await self.answer.wait()
        self.settled += 1
        await super().settle(settlement)


async def test_drain_waits_for_every_settlement_that_nobody_awaited() -> None:
    store, ledger, clock = _SlowSettling(), InMemoryLedger(), FrozenClock()
    metering = Metering(store, ledger, clock, default_completion_reserve=512)
    grants = [await metering.admit(_principal(), prompt_tokens=10, completion_tokens=20) for _ in range(3)]
    for grant in grants:
        metering.settle_soon(grant, 10, 5)
    assert len(ledger.entries) == 3  # charged at once; the Redis half is still on its way
    draining = asyncio.ensure_future(metering.drain())
    await asyncio.sleep(0.01)
    assert not draining.done() and store.settled == 0  # shutdown would not close Redis under them
    store.answer.set()
    await asyncio.wait_for(draining, 1)
    assert store.settled == 3 and metering.in_flight == {}
