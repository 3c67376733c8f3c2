"""Operator use cases behind the CLI (SPEC §11): validate, then change through the TenantStore."""

from __future__ import annotations

import re
from typing import Final

import attrs

from gateway_core.api_keys import NewKey, generate_key, is_well_formed_prefix
from gateway_core.budget import USAGE_PERIOD_NAMES, Budget
from gateway_core.effective_models import EffectiveModels
from gateway_core.errors import AdminError
from gateway_core.limits import Limits
from gateway_core.models import (
    ALL_SCOPES,
    AdminEvent,
    KeyRecord,
    KeyStatus,
    Scope,
    Tenant,
    Usage,
)
from gateway_core.ports import Clock, DiscoveredModels, SecretHasher, TenantStore


class _Keep:
    """Marks an option the operator did not give (as opposed to `none`, which clears)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()
Change = int | None | _Keep

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$")


def _check_key_name(name: str) -> str:
    """A key name is a human label (SPEC §11): 1-64 printable characters, spaces and non-ASCII
    letters allowed; no control or format characters (they could forge lines in list-keys)."""
    if not 1 <= len(name) <= 64 or not name.isprintable() or not name.strip():
        raise AdminError("invalid key name: use 1-64 printable characters (spaces allowed, "
                         "no control characters)")
    return name


def _check_name(what: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise AdminError(f"invalid {what} name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def parse_scopes(raw: str) -> frozenset[Scope]:
    names = [s.strip() for s in raw.split(",") if s.strip()]
    if not names:
        raise AdminError("--scopes needs at least one of: chat, embeddings")
    unknown = [n for n in names if n not in {s.value for s in ALL_SCOPES}]
    if unknown:
        raise AdminError(f"unknown scope {unknown[0]!r}: use chat, embeddings")
    return frozenset(Scope(n) for n in names)


def parse_models(raw: str) -> tuple[str, ...]:
    names = [m.strip() for m in raw.split(",") if m.strip()]
    for name in names:
        if not _MODEL_RE.match(name):
            raise AdminError(f"invalid model name {name!r}")
    return tuple(dict.fromkeys(names))


def _apply(current: int | None, change: Change) -> int | None:
    return current if isinstance(change, _Keep) else change


class Admin:
    """One instance per CLI invocation; *actor* goes into every admin_events row."""

    def __init__(
        self,
        store: TenantStore,
        hasher: SecretHasher,
        discovery: DiscoveredModels,
        clock: Clock,
        actor: str,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._discovery = discovery
        self._clock = clock
        self._actor = actor

    def _event(self, action: str, target: str, **details: object) -> AdminEvent:
        return AdminEvent(actor=self._actor, action=action, target=target, details=dict(details))

    async def tenant(self, name: str) -> Tenant:
        tenant = await self._store.tenant_by_name(name)
        if tenant is None:
            raise AdminError(f"unknown tenant {name!r}")
        return tenant

    async def key(self, prefix: str) -> KeyRecord:
        if not is_well_formed_prefix(prefix):
            raise AdminError(f"malformed key prefix {prefix!r}: expected nz_ and 9 characters")
        key = await self._store.key_by_prefix(prefix)
        if key is None:
            raise AdminError(f"unknown key prefix {prefix!r}")
        return key

    async def create_tenant(
        self, name: str, limits: Limits, allow_all_models: bool = False
    ) -> Tenant:
        _check_name("tenant", name)
        if None in (limits.rpm, limits.tpm, limits.concurrent):
            raise AdminError("a tenant needs --rpm, --tpm and --concurrent")
        tenant = Tenant(id=0, name=name, limits=limits, allow_all_models=allow_all_models)
        event = self._event(
            "create-tenant", name, rpm=limits.rpm, tpm=limits.tpm,
            concurrent=limits.concurrent, allow_all_models=allow_all_models,
        )
        return await self._store.create_tenant(tenant, event)

    async def create_key(
        self,
        tenant_name: str,
        name: str,
        scopes: frozenset[Scope] = ALL_SCOPES,
        limits: Limits | None = None,
    ) -> tuple[NewKey, KeyRecord]:
        """A new key; its secret is returned here once and exists nowhere else afterwards."""
        _check_key_name(name)
        tenant = await self.tenant(tenant_name)
        new = generate_key()
        record = KeyRecord(
            id=0, tenant_id=tenant.id, name=name, prefix=new.prefix,
            key_hash=await self._hasher.hash(new.secret), scopes=scopes,
            status=KeyStatus.ACTIVE, limits=limits or Limits(),
        )
        event = self._event("create-key", new.prefix, tenant=tenant.name, name=name,
                            scopes=sorted(scopes))
        return new, await self._store.create_key(record, event)

    async def list_keys(self, tenant_name: str) -> list[KeyRecord]:
        tenant = await self.tenant(tenant_name)
        return await self._store.keys_of(tenant.id)

    async def revoke_key(self, prefix: str) -> KeyRecord:
        key = await self.key(prefix)
        if key.status is KeyStatus.REVOKED:
            raise AdminError(f"key {prefix} is already revoked")
        await self._store.revoke_key(prefix, "cli", self._event("revoke-key", prefix))
        return key

    async def set_tenant_limits(self, tenant_name: str, rpm: Change, tpm: Change,
                                concurrent: Change) -> Limits:
        tenant = await self.tenant(tenant_name)
        if None in (rpm, tpm, concurrent):
            raise AdminError("tenant limits cannot be cleared with 'none'; give a number")
        _require_change(rpm, tpm, concurrent)
        new = Limits(_apply(tenant.limits.rpm, rpm), _apply(tenant.limits.tpm, tpm),
                     _apply(tenant.limits.concurrent, concurrent))
        await self._store.set_tenant_limits(
            tenant.id, new, self._event("set-limits", f"tenant:{tenant.name}", **attrs.asdict(new)))
        return new

    async def set_key_limits(self, prefix: str, rpm: Change, tpm: Change, concurrent: Change) -> Limits:
        key = await self.key(prefix)
        _require_change(rpm, tpm, concurrent)
        new = Limits(_apply(key.limits.rpm, rpm), _apply(key.limits.tpm, tpm),
                     _apply(key.limits.concurrent, concurrent))
        await self._store.set_key_limits(
            key.id, new, self._event("set-limits", f"key:{prefix}", **attrs.asdict(new)))
        return new

    async def set_budget(self, prefix: str, daily: Change, monthly: Change, total: Change) -> Budget:
        key = await self.key(prefix)
        _require_change(daily, monthly, total)
        old = await self._store.budget_of(key.id)
        new = Budget(_apply(old.daily, daily), _apply(old.monthly, monthly), _apply(old.total, total))
        await self._store.set_budget(key.id, new, self._event("set-budget", prefix, **attrs.asdict(new)))
        return new

    async def set_models(
        self, tenant_name: str, models: tuple[str, ...] | None, allow_all: bool | None
    ) -> Tenant:
        tenant = await self.tenant(tenant_name)
        if models is None and allow_all is None:
            raise AdminError("set-models needs --models, --allow-all or --no-allow-all")
        allowed = tenant.allowed_models if models is None else models
        all_flag = tenant.allow_all_models if allow_all is None else allow_all
        event = self._event("set-models", tenant.name, models=list(allowed), allow_all_models=all_flag)
        await self._store.set_models(tenant.id, allowed, all_flag, event)
        return attrs.evolve(tenant, allowed_models=allowed, allow_all_models=all_flag)

    async def list_models(self, tenant_name: str | None) -> tuple[list[str] | None, list[str] | None]:
        """(discovered, effective); discovered is None while the discovery cache is empty."""
        tenant = await self.tenant(tenant_name) if tenant_name is not None else None
        discovered = await self._discovery.discovered()
        if discovered is not None:
            discovered = sorted(discovered)
        if tenant is None:
            return discovered, None
        effective = EffectiveModels.resolve(tenant.allowed_models, tenant.allow_all_models,
                                            discovered or [])
        return discovered, effective.names()

    async def set_prompt_log(self, prefix: str, enabled: bool, retention_days: int | None) -> KeyRecord:
        key = await self.key(prefix)
        if retention_days is not None and retention_days < 1:
            raise AdminError("--retention-days must be a whole number of days, at least 1")
        days = key.prompt_log_retention_days if retention_days is None else retention_days
        event = self._event("set-prompt-log", prefix, enabled=enabled, retention_days=days)
        await self._store.set_prompt_log(key.id, enabled, days, event)
        return attrs.evolve(key, prompt_log_enabled=enabled, prompt_log_retention_days=days)

    async def show_usage(self, tenant_name: str, period_name: str, prefix: str | None) -> Usage:
        tenant = await self.tenant(tenant_name)
        period = USAGE_PERIOD_NAMES.get(period_name)
        if period is None:
            raise AdminError(f"unknown period {period_name!r}: use day, month or total")
        key_id = None
        if prefix is not None:
            key = await self.key(prefix)
            if key.tenant_id != tenant.id:
                raise AdminError(f"unknown key prefix {prefix!r} for tenant {tenant.name!r}")
            key_id = key.id
        start = period.start(self._clock.now())
        return await self._store.usage(tenant.id, period, start, key_id)


def _require_change(*changes: Change) -> None:
    if all(isinstance(c, _Keep) for c in changes):
        raise AdminError("nothing to change: give at least one value")
