"""InMemoryAdmission: the AdmissionStore contract of adapters/redis/admission.lua, in memory.

Same decisions, same order of checks, same millisecond clock and the same lazy trimming, so the
contract tests in tests/integration/test_admission_contract.py hold for both.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from typing import Any

from gateway_core.admission import LEASE_TTL_S, Admission, Denial, Settlement, Ticket, WindowState
from gateway_core.budget import NO_RESET_RETRY_AFTER_S, Period
from gateway_core.limits import WINDOW_S, Limits

# (tenant_id, key_id) for a key's own windows, (tenant_id, None) for the tenant aggregate.
Scope = tuple[int, int | None]
CounterId = tuple[int, int, Period, date]

_WINDOW_MS = WINDOW_S * 1000
_LEASE_MS = round(LEASE_TTL_S * 1000)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class InMemoryAdmission:
    def __init__(self) -> None:
        self.leases: dict[Scope, dict[str, int]] = defaultdict(dict)  # lease_id → expiry ms
        self.requests: dict[Scope, dict[str, int]] = defaultdict(dict)  # lease_id → admitted at ms
        self.tokens: dict[Scope, dict[str, tuple[int, int]]] = defaultdict(dict)  # → (at ms, tokens)
        self.counters: dict[CounterId, int] = {}
        # The script's lease markers: "open" from grant to the first settle or release, then
        # "done", so a second one changes nothing.
        self.lease_state: dict[str, str] = {}

    def flush(self) -> None:
        """What a Redis restart does: every window, lease and counter is gone."""
        self.leases.clear()
        self.requests.clear()
        self.tokens.clear()
        self.counters.clear()
        self.lease_state.clear()

    def counter(self, ticket: Ticket, period: Period) -> int | None:
        return self.counters.get(_counter_id(ticket, period))

    async def admit(self, ticket: Ticket, seeds: dict[Period, int] | None = None) -> Admission:
        now = _ms(ticket.now)
        cutoff = now - _WINDOW_MS
        caps = ticket.budget.caps()
        for period, seed in (seeds or {}).items():
            if period in caps:
                self.counters.setdefault(_counter_id(ticket, period), seed)
        levels = _levels(ticket)
        for scope, limits in levels:
            if limits.concurrent is not None:
                self.leases[scope] = {k: v for k, v in self.leases[scope].items() if v > now}
            if limits.rpm is not None:
                self.requests[scope] = {k: v for k, v in self.requests[scope].items() if v > cutoff}
            if limits.tpm is not None:
                self.tokens[scope] = {k: v for k, v in self.tokens[scope].items() if v[0] > cutoff}
        used = {p: self.counters.get(_counter_id(ticket, p)) for p in caps}
        missing = tuple(p for p, u in used.items() if u is None)

        def deny(denial: Denial, retry_after_s: float, should_retry: bool = True,
                 period: Period | None = None) -> Admission:
            return Admission(granted=False, denial=denial, retry_after_s=retry_after_s,
                             should_retry=should_retry, denied_period=period,
                             **self._report(ticket, now, used, missing, 0))

        for scope, limits in levels:
            if limits.concurrent is not None and len(self.leases[scope]) >= limits.concurrent:
                return deny(Denial.CONCURRENCY, 1.0, limits.concurrent > 0)

        rpm_waits = [self._rpm_wait(scope, limits.rpm, now) for scope, limits in levels
                     if limits.rpm is not None and len(self.requests[scope]) >= limits.rpm]
        if rpm_waits:
            return deny(Denial.RPM, max(w for w, _ in rpm_waits) / 1000, all(ok for _, ok in rpm_waits))

        if missing:
            return Admission(granted=False, missing_periods=missing)

        prompt, completion = ticket.prompt_tokens, ticket.completion_tokens
        exhausted: Period | None = None
        for period, cap in caps.items():
            remaining = cap - (used[period] or 0)
            if remaining <= prompt:
                if exhausted is None or _resets_later(period, exhausted, ticket.now):
                    exhausted = period
            else:
                completion = min(completion, remaining - prompt)
        if exhausted is not None:
            completion = ticket.completion_tokens
        need = prompt + completion

        tpm_waits = [self._tpm_wait(scope, limits.tpm, need, now) for scope, limits in levels
                     if limits.tpm is not None and self._tokens_in(scope) + need > limits.tpm]
        if tpm_waits:
            return deny(Denial.TPM, max(w for w, _ in tpm_waits) / 1000, all(ok for _, ok in tpm_waits))

        if exhausted is not None:
            to_reset = exhausted.seconds_to_reset(ticket.now)
            if to_reset is None:
                return deny(Denial.BUDGET, float(NO_RESET_RETRY_AFTER_S), False, exhausted)
            return deny(Denial.BUDGET, to_reset, True, exhausted)

        for scope, limits in levels:
            if limits.concurrent is not None:
                self.leases[scope][ticket.lease_id] = now + _LEASE_MS
            if limits.rpm is not None:
                self.requests[scope][ticket.lease_id] = now
            if limits.tpm is not None:
                self.tokens[scope][ticket.lease_id] = (now, need)
        for period in caps:
            self.counters[_counter_id(ticket, period)] += need
        self.lease_state[ticket.lease_id] = "open"
        return Admission(granted=True, completion_tokens=completion,
                         reserved={p: need for p in caps},
                         **self._report(ticket, now, used, missing, need))

    async def settle(self, settlement: Settlement) -> None:
        real = settlement.prompt_tokens + settlement.completion_tokens
        self._correct(settlement.ticket, real, real - settlement.reserved_tokens)

    async def release(self, ticket: Ticket, reserved_tokens: int) -> None:
        """Returns lease, tpm entry and budget reservation; the rpm entry stays (the attempt counts)."""
        self._correct(ticket, None, -reserved_tokens)

    async def renew(self, tickets: list[Ticket], now: float) -> None:
        for ticket in tickets:
            for scope in _scopes(ticket):
                if ticket.lease_id in self.leases[scope]:
                    self.leases[scope][ticket.lease_id] = _ms(now + LEASE_TTL_S)

    def _correct(self, ticket: Ticket, real: int | None, budget_delta: int) -> None:
        state = self.lease_state.get(ticket.lease_id)
        if state == "done":
            return
        self.lease_state[ticket.lease_id] = "done"
        if state is None:
            # Lost in a flush: counters rebuilt from the ledger lack it; a settlement adds its usage.
            if real is not None:
                for period in ticket.budget.caps():
                    cid = _counter_id(ticket, period)
                    if cid in self.counters:
                        self.counters[cid] += real
            return
        at = _ms(ticket.now)
        for scope in _scopes(ticket):
            self.leases[scope].pop(ticket.lease_id, None)
            entry = self.tokens[scope].get(ticket.lease_id)
            if entry is not None and entry[0] == at:
                if real is None:
                    del self.tokens[scope][ticket.lease_id]
                else:
                    self.tokens[scope][ticket.lease_id] = (at, real)
        for period in ticket.budget.caps():
            cid = _counter_id(ticket, period)
            if cid in self.counters:  # a vanished counter is rebuilt from the ledger, not a delta
                self.counters[cid] = max(0, self.counters[cid] + budget_delta)

    def _tokens_in(self, scope: Scope) -> int:
        return sum(tokens for _, tokens in self.tokens[scope].values())

    def _rpm_wait(self, scope: Scope, limit: int, now: int) -> tuple[int, bool]:
        if limit == 0:
            return _WINDOW_MS, False
        times = sorted(self.requests[scope].values())
        return times[len(times) - limit] + _WINDOW_MS - now, True

    def _tpm_wait(self, scope: Scope, limit: int, need: int, now: int) -> tuple[int, bool]:
        if need > limit:
            return _WINDOW_MS, False
        excess, freed = self._tokens_in(scope) + need - limit, 0
        for _lease_id, (at, tokens) in sorted(self.tokens[scope].items(), key=lambda e: (e[1][0], e[0])):
            freed += tokens
            if freed >= excess:
                return at + _WINDOW_MS - now, True
        return _WINDOW_MS, True

    def _report(self, ticket: Ticket, now: int, used: dict[Period, int | None],
                missing: tuple[Period, ...], reserved: int) -> dict[str, Any]:
        """Header values after the decision; *used* is the budget before *reserved* was added."""
        levels = _levels(ticket)
        requests = _binding([
            (limits.rpm, len(self.requests[scope]), list(self.requests[scope].values()))
            for scope, limits in levels if limits.rpm is not None
        ], now)
        tokens = _binding([
            (limits.tpm, self._tokens_in(scope), [at for at, _ in self.tokens[scope].values()])
            for scope, limits in levels if limits.tpm is not None
        ], now)
        budget_period: Period | None = None
        budget_remaining: int | None = None
        if used and not missing:
            for period, cap in ticket.budget.caps().items():
                left = cap - (used[period] or 0) - reserved
                if budget_remaining is None or left < budget_remaining:
                    budget_period, budget_remaining = period, left
            budget_remaining = max(0, budget_remaining or 0)
        return {"requests": requests, "tokens": tokens, "budget_period": budget_period,
                "budget_remaining": budget_remaining}


def _binding(windows: list[tuple[int, int, list[int]]], now: int) -> WindowState | None:
    """Least remaining wins, the key level (listed first) on a tie; reset = newest entry leaves."""
    best: WindowState | None = None
    for limit, used, stamps in windows:
        remaining = max(0, limit - used)
        reset_ms = max(0, max(stamps) + _WINDOW_MS - now) if stamps else 0
        if best is None or remaining < best.remaining:
            best = WindowState(limit=limit, remaining=remaining, reset_s=reset_ms / 1000)
    return best


def _levels(ticket: Ticket) -> list[tuple[Scope, Limits]]:
    key_scope, tenant_scope = _scopes(ticket)
    return [(key_scope, ticket.key_limits), (tenant_scope, ticket.tenant_limits)]


def _scopes(ticket: Ticket) -> tuple[Scope, Scope]:
    return (ticket.tenant_id, ticket.key_id), (ticket.tenant_id, None)


def _counter_id(ticket: Ticket, period: Period) -> CounterId:
    return ticket.tenant_id, ticket.key_id, period, period.start(ticket.now)


def _resets_later(period: Period, than: Period, now: float) -> bool:
    """Of several exhausted periods the one resetting last decides when a retry can succeed."""
    mine, theirs = period.seconds_to_reset(now), than.seconds_to_reset(now)
    return theirs is not None and (mine is None or mine > theirs)
