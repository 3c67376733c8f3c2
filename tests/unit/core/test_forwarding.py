"""The forward-and-settle use case: every exit path settles or releases exactly once."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from gateway_core.admission import Settlement, Ticket
from gateway_core.budget import Budget, Period
from gateway_core.errors import (
    DependencyUnavailable,
    InvalidRequest,
    ModelNotAllowed,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from gateway_core.forwarding import Answer, Forwarding, Relayed
from gateway_core.limits import Limits
from gateway_core.metering import Grant, Metering
from gateway_core.models import Principal, Scope
from gateway_core.ports import UpstreamAnswer
from gateway_core.request import ROUTES, CallerRequest, parse_request
from gateway_core.routing import Outcome
from gateway_core.tokens import estimate_chunks
from tests.fakes import (
    FrozenClock,
    InMemoryAdmission,
    InMemoryLedger,
    ScriptedAnswer,
    ScriptedBackends,
    ScriptedUpstream,
)

PRINCIPAL = Principal(key_id=5, key_prefix="nz_abcdefghi", tenant_id=9, tenant_name="acme",
                      scopes=frozenset(Scope), key_limits=Limits(concurrent=1),
                      tenant_limits=Limits(rpm=1000, tpm=1_000_000, concurrent=100),
                      budget=Budget(daily=10_000))
ANSWER = json.dumps({"model": "m", "message": {"role": "assistant", "content": "hello"}, "done": True,
                     "prompt_eval_count": 7, "eval_count": 3}).encode()


class CountingAdmission(InMemoryAdmission):
    """Counts settle/release per lease; can hold admissions and fail the Redis side of settling."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: Counter[str] = Counter()
        self.hold: asyncio.Event | None = None
        self.down = False

    async def admit(self, ticket: Ticket, seeds: dict[Period, int] | None = None):  # type: ignore[no-untyped-def]
        if self.hold is not None:
            await self.hold.wait()
        return await super().admit(ticket, seeds)

    async def settle(self, settlement: Settlement) -> None:
        if self.down:
            raise DependencyUnavailable()
        self.ends[settlement.ticket.lease_id] += 1
        await super().settle(settlement)

    async def release(self, ticket: Ticket, reserved_tokens: int) -> None:
        if self.down:
            raise DependencyUnavailable()
        self.ends[ticket.lease_id] += 1
        await super().release(ticket, reserved_tokens)


class Recorder:
    """A Delivery that relays nothing but what the test scripts."""

    def __init__(self, on_relay: str = "complete") -> None:
        self.grant: Grant | None = None
        self.charges: list[tuple[int, int]] = []
        self.on_relay = on_relay
        self.delivered: Answer | None = None

    def admitted(self, grant: Grant) -> None:
        self.grant = grant

    def charged(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.charges.append((prompt_tokens, completion_tokens))

    async def deliver(self, answer: Answer) -> None:
        self.delivered = answer

    async def relay(self, answer: UpstreamAnswer, relayed: Relayed) -> None:
        async for _ in answer.chunks():
            relayed.chunks += 1
            if self.on_relay == "gone_after_first":
                relayed.client_gone = True
                return
        if self.on_relay == "complete":
            relayed.prompt_tokens, relayed.completion_tokens, relayed.completed = 7, 3, True


class Rig:
    def __init__(self, upstream: ScriptedUpstream | ScriptedBackends | None = None) -> None:
        self.store = CountingAdmission()
        self.ledger = InMemoryLedger()
        self.clock = FrozenClock()
        self.metering = Metering(self.store, self.ledger, self.clock, default_completion_reserve=100)
        self.upstream = upstream or ScriptedUpstream(ScriptedAnswer(body=ANSWER))
        self.forwarding = Forwarding(self.metering, self.upstream)

    def request(self, **extra: object) -> CallerRequest:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": False, **extra}
        return parse_request(ROUTES["/api/chat"], json.dumps(body).encode())

    async def assert_ended_once(self, delivery: Recorder) -> None:
        # Settlements are not awaited by the request; by the time they are done, exactly one per lease.
        await self.metering.drain()
        assert delivery.grant is not None
        assert self.store.ends[delivery.grant.ticket.lease_id] == 1
        assert self.metering.in_flight == {}
        assert all(not leases for leases in self.store.leases.values()), self.store.leases

    async def slot_is_free(self) -> bool:
        grant = await self.metering.admit(PRINCIPAL, 1, 1)
        await self.metering.release(grant)
        return True


def charged(rig: Rig) -> list[tuple[int, float, int, int]]:
    """The ledger entries without their settlement ids (a fresh lease id per request)."""
    return [(e.key_id, e.admitted_at, e.tokens_in, e.tokens_out) for e in rig.ledger.entries]


async def test_success_settles_real_usage_once() -> None:
    rig, delivery = Rig(), Recorder()
    await rig.forwarding.forward(PRINCIPAL, rig.request(), "m:latest", delivery)
    assert delivery.delivered is not None and delivery.delivered.body == ANSWER
    assert charged(rig) == [(5, rig.clock.now(), 7, 3)]
    assert delivery.charges == [(7, 3)] and rig.upstream.outcomes == [Outcome.OK]
    await rig.assert_ended_once(delivery)
    sent = json.loads(rig.upstream.sent[0][1])
    assert sent["model"] == "m:latest" and 1 <= sent["options"]["num_predict"] <= 10_000


@pytest.mark.parametrize("status,error", [(500, UpstreamUnavailable), (404, ModelNotAllowed)])
async def test_an_upstream_error_status_releases_and_charges_nothing(status: int, error: type) -> None:
    rig, delivery = Rig(ScriptedUpstream(ScriptedAnswer(status=status))), Recorder()
    with pytest.raises(error):
        await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
    assert rig.ledger.entries == [] and delivery.charges == []
    assert rig.upstream.outcomes == [Outcome.OK if status < 500 else Outcome.MODEL_FAILED]
    await rig.assert_ended_once(delivery)
    assert await rig.slot_is_free()


async def test_an_unreachable_upstream_releases_and_counts_as_a_failure() -> None:
    failure = UpstreamUnavailable(retry_after_s=1.0)
    failure.__cause__ = OSError("refused")
    rig, delivery = Rig(ScriptedUpstream(error=failure)), Recorder()
    with pytest.raises(UpstreamUnavailable):
        await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
    assert rig.upstream.outcomes == [Outcome.BACKEND_FAILED] and rig.ledger.entries == []
    await rig.assert_ended_once(delivery)


async def test_caller_gone_before_the_first_byte_is_charged_the_prompt_once() -> None:
    stall = asyncio.Event()
    rig, delivery = Rig(ScriptedUpstream(ScriptedAnswer(body=ANSWER, stall=stall))), Recorder()
    task = asyncio.create_task(rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery))
    while rig.upstream.open == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert delivery.grant is not None
    prompt = delivery.grant.ticket.prompt_tokens
    assert charged(rig) == [(5, rig.clock.now(), prompt, 0)]
    await rig.assert_ended_once(delivery)
    assert rig.upstream.open == 0  # the upstream connection was closed, which stops generation


async def test_caller_gone_after_the_first_byte_is_charged_what_was_relayed() -> None:
    chunks = [b'{"done":false}\n', b'{"done":false}\n', b'{"done":true}\n']
    rig = Rig(ScriptedUpstream(ScriptedAnswer(chunks=chunks)))
    delivery = Recorder(on_relay="gone_after_first")
    assert await rig.forwarding.forward(PRINCIPAL, rig.request(stream=True), "m", delivery) is None
    assert delivery.grant is not None
    assert charged(rig) == [(5, rig.clock.now(), delivery.grant.ticket.prompt_tokens, 1)]
    await rig.assert_ended_once(delivery)


async def test_cancelled_mid_stream_settles_once_with_the_chunks_so_far() -> None:
    stall = asyncio.Event()
    rig = Rig(ScriptedUpstream(ScriptedAnswer(chunks=[b"a", b"b"], stall=stall)))
    delivery = Recorder()
    task = asyncio.create_task(rig.forwarding.forward(PRINCIPAL, rig.request(stream=True), "m", delivery))
    while rig.upstream.open == 0:
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert delivery.grant is not None
    assert delivery.charges == [(delivery.grant.ticket.prompt_tokens, 1)]
    await rig.assert_ended_once(delivery)


async def test_a_complete_stream_settles_the_upstream_count() -> None:
    rig, delivery = Rig(ScriptedUpstream(ScriptedAnswer(chunks=[b"a", b"b"]))), Recorder()
    assert await rig.forwarding.forward(PRINCIPAL, rig.request(stream=True), "m", delivery) is None
    assert charged(rig) == [(5, rig.clock.now(), 7, 3)]
    await rig.assert_ended_once(delivery)


async def test_cancellation_during_admission_releases_the_grant_when_it_returns() -> None:
    rig, delivery = Rig(), Recorder()
    rig.store.hold = asyncio.Event()
    task = asyncio.create_task(rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rig.store.hold.set()  # the admission script "returns" after the caller left
    for _ in range(20):
        await asyncio.sleep(0)
    assert delivery.grant is None and rig.upstream.sent == []
    assert sum(rig.store.ends.values()) == 1 and rig.metering.in_flight == {}
    assert await rig.slot_is_free()
    assert rig.ledger.entries == []


async def test_a_redis_failure_at_settlement_still_delivers_and_is_put_right_later() -> None:
    rig, delivery = Rig(), Recorder()
    rig.store.down = True
    real_admit = rig.store.admit

    async def admit_while_up(ticket: Ticket, seeds: dict[Period, int] | None = None):  # type: ignore[no-untyped-def]
        rig.store.down = False
        try:
            return await real_admit(ticket, seeds)
        finally:
            rig.store.down = True

    rig.store.admit = admit_while_up  # type: ignore[method-assign]
    await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
    assert delivery.delivered is not None and delivery.delivered.body == ANSWER  # not a 503
    assert charged(rig) == [(5, rig.clock.now(), 7, 3)]
    await rig.metering.drain()  # the Redis half failed after the answer went out
    assert len(rig.metering.unsettled) == 1
    with pytest.raises(DependencyUnavailable):
        await rig.metering.retry_unsettled()  # still down: kept
    assert len(rig.metering.unsettled) == 1
    rig.store.down = False
    await rig.metering.renew_leases()  # the periodic job retries
    assert len(rig.metering.unsettled) == 0
    await rig.assert_ended_once(delivery)
    assert await rig.slot_is_free()


class SlowReader(Recorder):
    """A caller still reading its answer; what the gateway has done by then is recorded."""

    def __init__(self, rig: Rig, *, hang_up: bool = False) -> None:
        super().__init__()
        self.rig, self.hang_up = rig, hang_up
        self.seen: tuple[int, int] | None = None

    async def deliver(self, answer: Answer) -> None:
        assert self.grant is not None
        # Charged before the first byte goes out; Redis may still be settling meanwhile.
        self.seen = (len(self.rig.ledger.entries), self.rig.store.ends[self.grant.ticket.lease_id])
        await asyncio.sleep(0.01)
        if self.hang_up:
            raise asyncio.CancelledError
        self.delivered = answer


async def test_a_complete_answer_is_charged_before_delivery_and_settled_once_after() -> None:
    rig = Rig()
    delivery = SlowReader(rig)
    await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
    assert delivery.seen is not None and delivery.seen[0] == 1  # in the ledger before delivery
    assert delivery.delivered is not None and charged(rig) == [(5, rig.clock.now(), 7, 3)]
    await rig.assert_ended_once(delivery)  # and settled in Redis once, after
    assert await rig.slot_is_free()


async def test_a_caller_gone_while_reading_the_answer_is_charged_the_real_usage_once() -> None:
    rig = Rig()
    delivery = SlowReader(rig, hang_up=True)
    with pytest.raises(asyncio.CancelledError):
        await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
    assert charged(rig) == [(5, rig.clock.now(), 7, 3)]  # the model's count, not the prompt alone
    await rig.assert_ended_once(delivery)


def _refused(kind: type[UpstreamUnavailable] = UpstreamUnreachable) -> UpstreamUnavailable:
    failure = kind(retry_after_s=1.0)
    failure.__cause__ = OSError("refused")
    return failure


class TestSeveralBackends:
    async def test_a_connection_refused_before_sending_is_retried_once_on_another_backend(self) -> None:
        first, second = ScriptedUpstream(error=_refused()), ScriptedUpstream(ScriptedAnswer(body=ANSWER))
        rig, delivery = Rig(ScriptedBackends(first, second)), Recorder()
        await rig.forwarding.forward(PRINCIPAL, rig.request(), "m:latest", delivery)
        assert delivery.delivered is not None and delivery.delivered.body == ANSWER
        assert (first.outcomes, second.outcomes) == ([Outcome.BACKEND_FAILED], [Outcome.OK])
        assert second.picked == [("m:latest", frozenset({0}))]  # the failed one is avoided
        assert charged(rig) == [(5, rig.clock.now(), 7, 3)] and delivery.charges == [(7, 3)]
        await rig.assert_ended_once(delivery)

    async def test_a_failure_after_the_request_was_sent_is_never_resent(self) -> None:
        first = ScriptedUpstream(error=_refused(UpstreamUnavailable))  # e.g. a read timeout
        second = ScriptedUpstream(ScriptedAnswer(body=ANSWER))
        rig, delivery = Rig(ScriptedBackends(first, second)), Recorder()
        with pytest.raises(UpstreamUnavailable):
            await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
        assert second.sent == [] and first.outcomes == [Outcome.BACKEND_FAILED]
        assert rig.ledger.entries == []
        await rig.assert_ended_once(delivery)

    async def test_only_one_retry_and_the_first_failure_is_reported(self) -> None:
        backends = [ScriptedUpstream(error=_refused()) for _ in range(3)]
        rig, delivery = Rig(ScriptedBackends(*backends)), Recorder()
        with pytest.raises(UpstreamUnreachable):
            await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
        assert [len(b.sent) for b in backends] == [1, 1, 0]
        assert rig.ledger.entries == []
        await rig.assert_ended_once(delivery)

    async def test_no_other_backend_with_the_model_gives_the_first_failure(self) -> None:
        only = ScriptedUpstream(error=_refused())
        rig, delivery = Rig(ScriptedBackends(only)), Recorder()
        with pytest.raises(UpstreamUnreachable) as raised:
            await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
        assert raised.value.retry_after_s == 1.0 and len(only.sent) == 1
        await rig.assert_ended_once(delivery)

    async def test_a_5xx_answer_counts_against_the_model_and_is_not_retried(self) -> None:
        first = ScriptedUpstream(ScriptedAnswer(status=500))
        second = ScriptedUpstream(ScriptedAnswer(body=ANSWER))
        rig, delivery = Rig(ScriptedBackends(first, second)), Recorder()
        with pytest.raises(UpstreamUnavailable):
            await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
        assert first.outcomes == [Outcome.MODEL_FAILED] and second.sent == []
        await rig.assert_ended_once(delivery)


class BrokenRelay(Recorder):
    """Relays chunks, then breaks: the upstream (failed) or a fault of the gateway's own."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    async def relay(self, answer: UpstreamAnswer, relayed: Relayed) -> None:
        async for _ in answer.chunks():
            relayed.chunks += 1
        if self.how == "upstream":
            relayed.failed = True
            return
        raise RuntimeError("a bug after the first byte")


class StickyUpstream(ScriptedUpstream):
    """Records a failure only after a while: the caller can be cancelled meanwhile."""

    def __init__(self, answer: ScriptedAnswer) -> None:
        super().__init__(answer)
        self.entered = asyncio.Event()

    async def record(self, outcome: Outcome) -> None:
        if outcome is not Outcome.OK:
            self.entered.set()
            await asyncio.sleep(3600)
        await super().record(outcome)


async def test_a_broken_stream_is_charged_its_chunks_even_if_the_caller_is_cancelled_meanwhile() -> None:
    sticky = StickyUpstream(ScriptedAnswer(chunks=[b"a", b"b", b"c"]))
    rig = Rig(sticky)
    delivery = BrokenRelay("upstream")
    task = asyncio.create_task(rig.forwarding.forward(PRINCIPAL, rig.request(stream=True), "m", delivery))
    await asyncio.wait_for(sticky.entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert delivery.grant is not None
    assert delivery.charges == [(delivery.grant.ticket.prompt_tokens, estimate_chunks(3))]
    await rig.assert_ended_once(delivery)


async def test_a_fault_after_the_first_byte_is_settled_once_and_is_not_an_upstream_failure() -> None:
    rig = Rig(ScriptedUpstream(ScriptedAnswer(chunks=[b"a", b"b"])))
    delivery = BrokenRelay("gateway")
    with pytest.raises(RuntimeError):
        await rig.forwarding.forward(PRINCIPAL, rig.request(stream=True), "m", delivery)
    assert delivery.grant is not None
    assert charged(rig) == [(5, rig.clock.now(), delivery.grant.ticket.prompt_tokens, estimate_chunks(2))]
    assert rig.upstream.outcomes == [Outcome.OK]  # the upstream answered; the fault was ours
    await rig.assert_ended_once(delivery)


async def test_an_upstream_400_is_the_callers_error_and_not_a_breaker_failure() -> None:
    rig, delivery = Rig(ScriptedUpstream(ScriptedAnswer(status=400))), Recorder()
    with pytest.raises(InvalidRequest):
        await rig.forwarding.forward(PRINCIPAL, rig.request(), "m", delivery)
    assert rig.upstream.outcomes == [Outcome.OK] and rig.ledger.entries == []
    await rig.assert_ended_once(delivery)
    assert await rig.slot_is_free()
