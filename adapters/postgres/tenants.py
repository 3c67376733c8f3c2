"""PostgresTenantStore: the operator-facing tables of SPEC §5. All of their SQL lives here."""

from __future__ import annotations

from datetime import date
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from adapters.postgres.pool import connection
from gateway_core.budget import Budget, Period
from gateway_core.errors import AdminError
from gateway_core.limits import Limits
from gateway_core.models import AdminEvent, KeyRecord, KeyStatus, Scope, Tenant, Usage

_TENANT_COLUMNS = "id, name, rpm, tpm, concurrent, allowed_models, allow_all_models, created_at"
_KEY_COLUMNS = ("id, tenant_id, name, prefix, key_hash, scopes, status, rpm, tpm, concurrent, "
                "prompt_log_enabled, prompt_log_retention_days, created_at, revoked_at")


def tenant_from_row(row: dict[str, Any]) -> Tenant:
    return Tenant(
        id=row["id"], name=row["name"], limits=Limits(row["rpm"], row["tpm"], row["concurrent"]),
        allowed_models=tuple(row["allowed_models"]), allow_all_models=row["allow_all_models"],
        created_at=row["created_at"],
    )


def key_from_row(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        id=row["id"], tenant_id=row["tenant_id"], name=row["name"], prefix=row["prefix"],
        key_hash=row["key_hash"], scopes=frozenset(Scope(s) for s in row["scopes"]),
        status=KeyStatus(row["status"]), limits=Limits(row["rpm"], row["tpm"], row["concurrent"]),
        prompt_log_enabled=row["prompt_log_enabled"],
        prompt_log_retention_days=row["prompt_log_retention_days"],
        created_at=row["created_at"], revoked_at=row["revoked_at"],
    )


async def _record(cur: psycopg.AsyncCursor[Any], event: AdminEvent) -> None:
    await cur.execute(
        "INSERT INTO gateway.admin_events (actor, action, target, details) VALUES (%s, %s, %s, %s)",
        (event.actor, event.action, event.target, Jsonb(event.details)),
    )


class PostgresTenantStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def _one(self, sql: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        async with connection(self._pool) as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            return await cur.fetchone()

    async def _change(self, sql: str, params: tuple[Any, ...], event: AdminEvent) -> dict[str, Any] | None:
        """Run one change and its admin event in a single transaction."""
        async with connection(self._pool) as conn, conn.transaction(), \
                conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            row = await cur.fetchone() if cur.description else None
            await _record(cur, event)
            return row

    async def create_tenant(self, tenant: Tenant, event: AdminEvent) -> Tenant:
        try:
            row = await self._change(
                f"INSERT INTO gateway.tenants (name, rpm, tpm, concurrent, allowed_models, allow_all_models)"
                f" VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_TENANT_COLUMNS}",
                (tenant.name, tenant.limits.rpm, tenant.limits.tpm, tenant.limits.concurrent,
                 list(tenant.allowed_models), tenant.allow_all_models), event)
        except psycopg.errors.UniqueViolation:
            raise AdminError(f"tenant {tenant.name!r} already exists") from None
        assert row is not None
        return tenant_from_row(row)

    async def tenant_by_name(self, name: str) -> Tenant | None:
        row = await self._one(f"SELECT {_TENANT_COLUMNS} FROM gateway.tenants WHERE name = %s", (name,))
        return tenant_from_row(row) if row else None

    async def create_key(self, key: KeyRecord, event: AdminEvent) -> KeyRecord:
        try:
            row = await self._change(
                f"INSERT INTO gateway.api_keys (tenant_id, name, prefix, key_hash, scopes, rpm, tpm,"
                f" concurrent) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_KEY_COLUMNS}",
                (key.tenant_id, key.name, key.prefix, key.key_hash, sorted(key.scopes),
                 key.limits.rpm, key.limits.tpm, key.limits.concurrent), event)
        except psycopg.errors.UniqueViolation:
            # 72 random bits in the prefix: a clash is astronomically rare, but never silent.
            raise AdminError("generated key prefix collided with an existing one; run again") from None
        assert row is not None
        return key_from_row(row)

    async def key_by_prefix(self, prefix: str) -> KeyRecord | None:
        row = await self._one(f"SELECT {_KEY_COLUMNS} FROM gateway.api_keys WHERE prefix = %s", (prefix,))
        return key_from_row(row) if row else None

    async def keys_of(self, tenant_id: int) -> list[KeyRecord]:
        async with connection(self._pool) as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT {_KEY_COLUMNS} FROM gateway.api_keys WHERE tenant_id = %s ORDER BY created_at, id",
                (tenant_id,))
            return [key_from_row(r) for r in await cur.fetchall()]

    async def revoke_key(self, prefix: str, source: str, event: AdminEvent) -> None:
        # The trigger on the outbox flips the key and notifies (migration 0001).
        await self._change("INSERT INTO gateway.revocations (key_prefix, source) VALUES (%s, %s)",
                           (prefix, source), event)

    async def set_tenant_limits(self, tenant_id: int, limits: Limits, event: AdminEvent) -> None:
        await self._change("UPDATE gateway.tenants SET rpm = %s, tpm = %s, concurrent = %s WHERE id = %s",
                           (limits.rpm, limits.tpm, limits.concurrent, tenant_id), event)

    async def set_key_limits(self, key_id: int, limits: Limits, event: AdminEvent) -> None:
        await self._change("UPDATE gateway.api_keys SET rpm = %s, tpm = %s, concurrent = %s WHERE id = %s",
                           (limits.rpm, limits.tpm, limits.concurrent, key_id), event)

    async def budget_of(self, key_id: int) -> Budget:
        row = await self._one("SELECT daily, monthly, total FROM gateway.budgets WHERE key_id = %s",
                              (key_id,))
        return Budget(row["daily"], row["monthly"], row["total"]) if row else Budget()

    async def set_budget(self, key_id: int, budget: Budget, event: AdminEvent) -> None:
        await self._change(
            "INSERT INTO gateway.budgets (key_id, daily, monthly, total) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (key_id) DO UPDATE SET daily = EXCLUDED.daily, monthly = EXCLUDED.monthly,"
            " total = EXCLUDED.total, updated_at = now()",
            (key_id, budget.daily, budget.monthly, budget.total), event)

    async def set_models(self, tenant_id: int, allowed: tuple[str, ...], allow_all: bool,
                         event: AdminEvent) -> None:
        await self._change(
            "UPDATE gateway.tenants SET allowed_models = %s, allow_all_models = %s WHERE id = %s",
            (list(allowed), allow_all, tenant_id), event)

    async def set_prompt_log(self, key_id: int, enabled: bool, retention_days: int | None,
                             event: AdminEvent) -> None:
        await self._change(
            "UPDATE gateway.api_keys SET prompt_log_enabled = %s, prompt_log_retention_days = %s"
            " WHERE id = %s", (enabled, retention_days, key_id), event)

    async def usage(self, tenant_id: int, period: Period, start: date, key_id: int | None) -> Usage:
        row = await self._one(
            "SELECT COALESCE(sum(u.requests), 0) AS requests, COALESCE(sum(u.tokens_in), 0) AS tokens_in,"
            " COALESCE(sum(u.tokens_out), 0) AS tokens_out"
            " FROM gateway.budget_usage u JOIN gateway.api_keys k ON k.id = u.key_id"
            " WHERE k.tenant_id = %s AND u.period = %s AND u.period_start = %s"
            " AND (%s::bigint IS NULL OR u.key_id = %s)",
            (tenant_id, period.value, start, key_id, key_id))
        assert row is not None
        return Usage(int(row["requests"]), int(row["tokens_in"]), int(row["tokens_out"]))
