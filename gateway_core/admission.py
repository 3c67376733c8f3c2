"""Admission (SPEC §4.1, §4.2, §4.4, §6.2): the request's claim on limits and budgets, and the answer.

A Ticket is decided atomically by an AdmissionStore; a denied ticket consumes nothing. A granted
ticket holds a concurrency lease and reservations that `settle` later corrects to real usage.
"""

from __future__ import annotations

import enum
from datetime import date

from attrs import field, frozen

from gateway_core.budget import Budget, Period
from gateway_core.limits import Limits

# A lease outlives a crashed replica by at most this long; live requests renew theirs.
LEASE_TTL_S = 60.0
LEASE_RENEW_EVERY_S = 20.0


class Denial(enum.StrEnum):
    CONCURRENCY = "concurrent"
    RPM = "rpm"
    TPM = "tpm"
    BUDGET = "budget"


@frozen
class Ticket:
    """What one request asks for. Token figures are estimates until settlement."""

    lease_id: str
    tenant_id: int
    key_id: int
    key_limits: Limits
    tenant_limits: Limits
    budget: Budget
    prompt_tokens: int
    completion_tokens: int
    now: float

    def period_starts(self) -> dict[Period, date]:
        return {p: p.start(self.now) for p in self.budget.caps()}


@frozen
class WindowState:
    """One rate window after the decision, for the X-RateLimit-* headers."""

    limit: int
    remaining: int
    reset_s: float


@frozen
class Admission:
    """The decision. On a grant, `completion_tokens` may be lower than asked (budget cap, §6.2).

    `denial` is the first failed check in the order concurrency, rpm, tpm, budget, and
    `retry_after_s` (seconds) says when that check could pass. `requests`/`tokens` describe the
    binding window (key or tenant, the one with least remaining) after this decision; None when
    neither level limits it. `budget_period`/`budget_remaining` name the period with least
    remaining after the reservation (never negative); None without a budget or when the counters
    were not read. `reserved` is the tokens reserved per configured period (prompt + granted
    completion). `missing_periods` is set, with nothing consumed, when budget counters must be
    seeded from the ledger before the store can decide.
    """

    granted: bool
    denial: Denial | None = None
    retry_after_s: float = 0.0
    denied_period: Period | None = None
    completion_tokens: int = 0
    requests: WindowState | None = None
    tokens: WindowState | None = None
    budget_period: Period | None = None
    budget_remaining: int | None = None
    reserved: dict[Period, int] = field(factory=dict)
    missing_periods: tuple[Period, ...] = ()
    # False when waiting cannot help (a zero limit, an estimate above tpm, an exhausted `total`
    # budget): the HTTP layer then sends `x-should-retry: false` (SPEC §3.4).
    should_retry: bool = True


@frozen
class Settlement:
    """Real usage for a granted ticket; the store corrects windows and budgets by the difference."""

    ticket: Ticket
    reserved_tokens: int
    prompt_tokens: int
    completion_tokens: int
    now: float
