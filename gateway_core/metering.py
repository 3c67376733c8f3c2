"""Admission and settlement use cases (SPEC §4.1, §6.2): reserve before forwarding, settle after."""

from __future__ import annotations

import asyncio
from collections import deque

import attrs
from attrs import define

from gateway_core.admission import Admission, Denial, Settlement, Ticket
from gateway_core.budget import NO_RESET_RETRY_AFTER_S, Period
from gateway_core.errors import BudgetExhausted, DependencyUnavailable, RateLimitExceeded
from gateway_core.ids import new_id
from gateway_core.models import Principal
from gateway_core.ports import AdmissionStore, AdmissionView, Clock, LedgerEntry, UsageLedger
from gateway_core.rate_headers import rate_limit_headers

_DENIAL_TEXT = {
    Denial.CONCURRENCY: "Too many requests in flight for this {who} (limit {limit}); "
                         "retry when one finishes.",
    Denial.RPM: "Request rate limit reached for this {who}: {limit} requests per minute.",
    Denial.TPM: "Token rate limit reached for this {who}: {limit} tokens per minute.",
}


@define
class Grant:
    """An admitted request: its ticket, the decision, and the headers the caller gets."""

    ticket: Ticket
    admission: Admission
    headers: dict[str, str]
    settled: bool = False

    @property
    def completion_cap(self) -> int | None:
        """The completion allowance to enforce upstream, or None when the caller's own applies."""
        return self.admission.completion_tokens if self.ticket.budget.is_set else None

    @property
    def reserved_tokens(self) -> int:
        return self.ticket.prompt_tokens + self.admission.completion_tokens


class Metering:
    def __init__(self, store: AdmissionStore, ledger: UsageLedger, clock: Clock,
                 default_completion_reserve: int, view: AdmissionView | None = None) -> None:
        self._store = store
        self._view = view
        self._ledger = ledger
        self._clock = clock
        self._default_reserve = default_completion_reserve
        self.in_flight: dict[str, Ticket] = {}
        # Redis halves of settlements and releases that failed: retried until Redis answers again.
        # The ledger half is never in here (it is recorded first), so the counters can lag but the
        # source of truth cannot. Bounded: past it the oldest are dropped; their leases expire and
        # a rebuilt counter comes from the ledger.
        self.unsettled: deque[Settlement | tuple[Ticket, int]] = deque(maxlen=100_000)
        # Redis halves of settlements on their way: nobody awaits them, so they are held here
        # until done and awaited by `drain` at shutdown.
        self._settling: set[asyncio.Future[None]] = set()

    async def admit(self, principal: Principal, prompt_tokens: int, completion_tokens: int | None) -> Grant:
        """Reserve the request's estimate, or raise RateLimitExceeded / BudgetExhausted (429)."""
        asked = self._default_reserve if completion_tokens is None else max(completion_tokens, 0)
        ticket = self._ticket(principal, prompt_tokens, asked)
        admission = await self._store.admit(ticket)
        if admission.missing_periods:
            # Redis lost the counter (restart, flush) or a period began: rebuild it from the ledger.
            starts = {p: p.start(ticket.now) for p in admission.missing_periods}
            seeds = await self._ledger.used(ticket.key_id, starts)
            admission = await self._store.admit(ticket, seeds)
        headers = rate_limit_headers(admission)
        if not admission.granted:
            raise _denied(admission, principal, headers)
        self.in_flight[ticket.lease_id] = ticket
        return Grant(ticket, admission, headers)

    async def current_headers(self, principal: Principal) -> dict[str, str]:
        """The §3.4 / §6.5 headers as they stand, consuming nothing (listings, refusals)."""
        if self._view is None:
            return {}
        ticket = self._ticket(principal, 0, 0)
        admission = await self._view.peek(ticket)
        if admission.missing_periods:
            # A counter Redis does not hold yet: what the ledger says was used is what remains.
            caps = ticket.budget.caps()
            used = await self._ledger.used(ticket.key_id, {p: p.start(ticket.now) for p in caps})
            remaining = {p: max(0, caps[p] - used.get(p, 0)) for p in caps}
            period = min(remaining, key=lambda p: remaining[p])
            admission = attrs.evolve(admission, budget_period=period, budget_remaining=remaining[period])
        return rate_limit_headers(admission)

    def _ticket(self, principal: Principal, prompt_tokens: int, completion_tokens: int) -> Ticket:
        return Ticket(
            lease_id=new_id(), tenant_id=principal.tenant_id, key_id=principal.key_id,
            key_limits=principal.limits, tenant_limits=principal.tenant_limits, budget=principal.budget,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, now=self._clock.now(),
        )

    async def settle(self, grant: Grant, prompt_tokens: int, completion_tokens: int) -> None:
        """Charge real usage (SPEC §6.2); the unused part of the reservation returns."""
        settlement = self._charge(grant, prompt_tokens, completion_tokens)
        if settlement is not None:
            await self._settle_store(settlement)

    def settle_soon(self, grant: Grant, prompt_tokens: int, completion_tokens: int) -> None:
        """`settle`, with the charge made before this returns and the Redis half on its way: queued
        for Redis before the loop reads anything new, so the key's next admission from this process
        is ordered after it, but nobody waits for its reply. `drain` waits for all of them."""
        settlement = self._charge(grant, prompt_tokens, completion_tokens)
        if settlement is None:
            return
        task = asyncio.ensure_future(self._settle_store(settlement))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def drain(self) -> None:
        """Until every settlement begun has its Redis half done (or put in `unsettled`)."""
        while self._settling:
            await asyncio.wait(list(self._settling))

    def _charge(self, grant: Grant, prompt_tokens: int, completion_tokens: int) -> Settlement | None:
        if grant.settled:
            return None
        grant.settled = True
        self.in_flight.pop(grant.ticket.lease_id, None)
        # The admission's period instances, as in Redis: a stream crossing midnight stays on its day.
        self._ledger.record(LedgerEntry(grant.ticket.lease_id, grant.ticket.key_id, grant.ticket.now,
                                        prompt_tokens, completion_tokens))
        return Settlement(grant.ticket, grant.reserved_tokens, prompt_tokens, completion_tokens,
                          self._clock.now())

    async def _settle_store(self, settlement: Settlement) -> None:
        try:
            await self._store.settle(settlement)
        except DependencyUnavailable:
            # The answer was produced and is charged in the ledger: the caller still gets it, and
            # the Redis side is put right when Redis is back (settle is idempotent per lease, §6.3).
            self.unsettled.append(settlement)

    async def release(self, grant: Grant) -> None:
        """The request never reached a model: nothing is charged and the slot returns."""
        if grant.settled:
            return
        grant.settled = True
        self.in_flight.pop(grant.ticket.lease_id, None)
        try:
            await self._store.release(grant.ticket, grant.reserved_tokens)
        except DependencyUnavailable:
            # Whatever made the caller's request end is what the caller hears about; the slot
            # and reservation return when Redis does (or the lease expires first).
            self.unsettled.append((grant.ticket, grant.reserved_tokens))

    async def retry_unsettled(self) -> int:
        """Re-run the Redis half of failed settlements and releases, oldest first; stops at the first
        failure (Redis is still away). Returns how many went through."""
        done = 0
        while self.unsettled:
            item = self.unsettled[0]
            if isinstance(item, Settlement):
                await self._store.settle(item)
            else:
                await self._store.release(*item)
            self.unsettled.popleft()
            done += 1
        return done

    async def renew_leases(self) -> None:
        if self.unsettled:
            await self.retry_unsettled()
        if self.in_flight:
            await self._store.renew(list(self.in_flight.values()), self._clock.now())


def _denied(admission: Admission, principal: Principal, headers: dict[str, str]) -> RateLimitExceeded:
    if admission.denial is Denial.BUDGET:
        period = admission.denied_period or Period.TOTAL
        if period is Period.TOTAL:
            return BudgetExhausted(
                "This key's total token budget is used up; it does not reset. Ask an operator to raise it.",
                retry_after_s=NO_RESET_RETRY_AFTER_S, should_retry=False, headers=headers)
        boundary = "midnight" if period is Period.DAILY else "month start"
        return BudgetExhausted(
            f"This key's {period.value} token budget is used up; it resets in "
            f"{int(admission.retry_after_s)} seconds (UTC {boundary}).",
            retry_after_s=admission.retry_after_s,
            should_retry=False if admission.retry_after_s > 120 else None, headers=headers)
    limits = principal.limits
    limit = {Denial.CONCURRENCY: limits.concurrent, Denial.RPM: limits.rpm, Denial.TPM: limits.tpm}.get(
        admission.denial or Denial.RPM)
    text = _DENIAL_TEXT.get(admission.denial or Denial.RPM, "Rate limit exceeded.")
    if not admission.should_retry:
        text += " This request can never fit: waiting will not help."
    return RateLimitExceeded(text.format(who="key or its tenant", limit=limit),
                             retry_after_s=max(admission.retry_after_s, 1.0),
                             should_retry=None if admission.should_retry else False, headers=headers)
