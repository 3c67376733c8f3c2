"""Ports the use cases need, met structurally by adapters and by the fakes in tests/fakes.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import date
from typing import Literal, Protocol

from attrs import frozen

from gateway_core.admission import Admission, Settlement, Ticket
from gateway_core.budget import Budget, Period
from gateway_core.limits import Limits
from gateway_core.models import AdminEvent, Catalog, KeyRecord, Principal, Scope, Tenant, Usage
from gateway_core.routing import Outcome


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (UTC)."""
        ...


class SecretHasher(Protocol):
    """argon2id hashing of full keys; implementations run the hash off the event loop."""

    async def hash(self, secret: str) -> str:
        """A self-describing hash string (`$argon2id$…`)."""
        ...

    async def verify(self, secret: str, hashed: str) -> bool:
        """True when *secret* matches; a hash made with other parameters still verifies."""
        ...


class TenantStore(Protocol):
    """Operator-facing storage of tenants, keys, budgets and model policy.

    Every mutating method records *event* in the same transaction as the change, so a
    rejected change leaves neither. Unknown targets raise AdminError and change nothing.
    """

    async def create_tenant(self, tenant: Tenant, event: AdminEvent) -> Tenant:
        """Insert *tenant* (its id is assigned here); a taken name raises AdminError."""
        ...

    async def tenant_by_name(self, name: str) -> Tenant | None: ...

    async def create_key(self, key: KeyRecord, event: AdminEvent) -> KeyRecord:
        """Insert *key* (id assigned here); a taken prefix raises AdminError."""
        ...

    async def key_by_prefix(self, prefix: str) -> KeyRecord | None: ...

    async def keys_of(self, tenant_id: int) -> list[KeyRecord]:
        """All keys of a tenant, oldest first."""
        ...

    async def revoke_key(self, prefix: str, source: str, event: AdminEvent) -> None:
        """Write the revocation outbox row; the store marks the key revoked and notifies."""
        ...

    async def set_tenant_limits(self, tenant_id: int, limits: Limits, event: AdminEvent) -> None: ...

    async def set_key_limits(self, key_id: int, limits: Limits, event: AdminEvent) -> None: ...

    async def budget_of(self, key_id: int) -> Budget: ...

    async def set_budget(self, key_id: int, budget: Budget, event: AdminEvent) -> None: ...

    async def set_models(
        self, tenant_id: int, allowed: tuple[str, ...], allow_all: bool, event: AdminEvent
    ) -> None: ...

    async def set_prompt_log(
        self, key_id: int, enabled: bool, retention_days: int | None, event: AdminEvent
    ) -> None: ...

    async def usage(self, tenant_id: int, period: Period, start: date, key_id: int | None) -> Usage:
        """Ledger totals for one period instance, for the tenant or one of its keys."""
        ...


class PrincipalSource(Protocol):
    """Loads what a key may do, for authentication (SPEC §3.1)."""

    async def principal_by_prefix(self, prefix: str) -> tuple[str, Principal] | None:
        """The active key's hash and principal, or None when no active key has that prefix."""
        ...


class DiscoveredModels(Protocol):
    """The shared discovery cache (SPEC §4.6)."""

    async def discovered(self) -> list[str] | None:
        """Discovered model names, or None when the cache is empty or expired."""
        ...


NEGATIVE: Literal["negative"] = "negative"


class KeyCache(Protocol):
    """Verified keys by digest of the full key (SPEC §3.1), shared by replicas, evicted on change.

    Eviction cannot lose a race with a fill (SPEC §4.5): a fill carries the mark taken before its
    key was read from the store, and is refused if the key or its tenant was evicted since."""

    async def mark(self) -> object:
        """An opaque position in the eviction history; take it BEFORE loading a key from the store."""
        ...

    async def get(self, digest: str) -> Principal | Literal["negative"] | None:
        """The cached principal, NEGATIVE for a recently failed key, or None when unknown."""
        ...

    async def put(self, digest: str, principal: Principal, mark: object) -> bool:
        """Cache *principal* unless its key or tenant was evicted after *mark*; True if cached."""
        ...

    async def put_negative(self, digest: str) -> None:
        """Remember briefly that this key failed, so repeating it costs no hash."""
        ...

    async def evict_prefix(self, prefix: str) -> None:
        """Forget every entry of this key, and refuse fills marked before now."""
        ...

    async def evict_tenant(self, tenant_id: int) -> None:
        """Forget every entry of this tenant's keys, and refuse fills marked before now."""
        ...


class AuthFailures(Protocol):
    """Failed authentication attempts per client IP (SPEC §3.1), shared by replicas."""

    async def blocked_for(self, client_ip: str, now: float) -> float | None:
        """Seconds to wait when the IP is over its limit, else None."""
        ...

    async def record(self, client_ip: str, now: float) -> None: ...


class ChangeFeed(Protocol):
    """The revocation/config-change listener; while it is down no cached key can be trusted."""

    def trusted(self) -> bool: ...


class ModelCatalog(Protocol):
    """The in-process copy of the discovery cache (SPEC §4.6)."""

    def current(self, now: float) -> Catalog | None:
        """The live discovered set, or None when empty or expired (then nothing resolves)."""
        ...


class AdmissionStore(Protocol):
    """Decides concurrency, rpm, tpm and budget for one request atomically (SPEC §4.1, §4.4)."""

    async def admit(self, ticket: Ticket, seeds: dict[Period, int] | None = None) -> Admission:
        """Reserve all of *ticket* or nothing; a denial is a result, not an exception. A budget
        counter that does not exist and has no seed yields `missing_periods` and consumes nothing."""
        ...

    async def settle(self, settlement: Settlement) -> None:
        """Release the lease and correct windows and budget counters to the real usage."""
        ...

    async def release(self, ticket: Ticket, reserved_tokens: int) -> None:
        """Give back the lease and the reservation of a request that produced nothing."""
        ...

    async def renew(self, tickets: list[Ticket], now: float) -> None:
        """Extend the leases of requests still in flight."""
        ...


class AdmissionView(Protocol):
    """The admission state read without consuming anything (SPEC §3.4: headers of listings and
    of refusals after authentication)."""

    async def peek(self, ticket: Ticket) -> Admission:
        """Windows and budget as the next admission would see them; budget counters that do not
        exist are listed in `missing_periods` (no budget period is reported then)."""
        ...


@frozen
class LedgerEntry:
    """One settled request, to be added to the ledger for every period (SPEC §6.3).

    `settlement_id` (the ticket's lease id) makes it count once however often it is written;
    `admitted_at` picks the period instances, the same ones Redis charged at admission.
    """

    settlement_id: str
    key_id: int
    admitted_at: float
    tokens_in: int
    tokens_out: int


class UsageLedger(Protocol):
    """The budget ledger in PostgreSQL: batched, retried, never dropped (SPEC §6.3)."""

    def record(self, entry: LedgerEntry) -> None:
        """Queue *entry*; never blocks the request and never drops it. An entry whose
        settlement id was applied before changes nothing."""
        ...

    async def used(self, key_id: int, starts: dict[Period, date]) -> dict[Period, int]:
        """Tokens charged per period instance, including entries not yet flushed."""
        ...


class UpstreamAnswer(Protocol):
    """One upstream response being read. Reading failures raise UpstreamUnavailable."""

    @property
    def status(self) -> int: ...

    async def read(self) -> bytes:
        """The whole body."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        ...

    async def error_message(self) -> str | None:
        """The `error` string of a JSON error body, if there is one (never shown unchecked)."""
        ...


class UpstreamLane(Protocol):
    """One backend picked for one request; it counts as in flight until its `post` block ends."""

    @property
    def index(self) -> int:
        """The backend's position in the configured list (never its URL)."""
        ...

    def post(self, path: str, body: bytes) -> AbstractAsyncContextManager[UpstreamAnswer]:
        """Send *body*; leaving the block early closes the connection, which stops generation.
        A connection that failed before anything was sent raises UpstreamUnreachable; other
        connection failures raise UpstreamUnavailable. Call at most once per lane."""
        ...

    async def record(self, outcome: Outcome) -> None:
        """Feed the backend's and the model's breakers (SPEC §4.10)."""
        ...

    def seconds_to_half_open(self) -> float:
        """Until this lane may be called again (0 while its breakers are closed)."""
        ...


class Upstream(Protocol):
    """The model backends (SPEC §4.9, §4.10): only allowlisted paths, the gateway's own request."""

    def lane(self, model: str, avoid: frozenset[int] = frozenset()) -> UpstreamLane:
        """The least busy backend that has *model* and whose circuits admit a call, skipping the
        indexes in *avoid*. Raises UpstreamUnavailable (Retry-After: the soonest half-open) when
        there is none."""
        ...


__all__ = ["Clock", "DiscoveredModels", "PrincipalSource", "Scope", "SecretHasher", "TenantStore"]
