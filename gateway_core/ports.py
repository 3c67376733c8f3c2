"""Ports the use cases need, met structurally by adapters and by the fakes in tests/fakes.py."""

from __future__ import annotations

from datetime import date
from typing import Protocol

from gateway_core.budget import Budget, Period
from gateway_core.limits import Limits
from gateway_core.models import AdminEvent, KeyRecord, Principal, Scope, Tenant, Usage


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


__all__ = ["Clock", "DiscoveredModels", "PrincipalSource", "Scope", "SecretHasher", "TenantStore"]
