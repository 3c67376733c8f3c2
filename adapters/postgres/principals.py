"""What a key may do, loaded in one query for authentication (SPEC §3.1). Only on a cache miss."""

from __future__ import annotations

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from adapters.postgres.pool import connection
from gateway_core.budget import Budget
from gateway_core.limits import Limits
from gateway_core.models import Principal, Scope

_QUERY = """
SELECT k.id, k.prefix, k.key_hash, k.scopes, k.rpm, k.tpm, k.concurrent,
       k.prompt_log_enabled, k.prompt_log_retention_days,
       t.id AS tenant_id, t.name AS tenant_name, t.rpm AS t_rpm, t.tpm AS t_tpm,
       t.concurrent AS t_concurrent, t.allowed_models, t.allow_all_models,
       b.daily, b.monthly, b.total
  FROM gateway.api_keys k
  JOIN gateway.tenants t ON t.id = k.tenant_id
  LEFT JOIN gateway.budgets b ON b.key_id = k.id
 WHERE k.prefix = %s AND k.status = 'active'
"""


class PostgresPrincipalSource:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def principal_by_prefix(self, prefix: str) -> tuple[str, Principal] | None:
        async with connection(self._pool) as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(_QUERY, (prefix,))
            row = await cur.fetchone()
        if row is None:
            return None
        principal = Principal(
            key_id=row["id"], key_prefix=row["prefix"], tenant_id=row["tenant_id"],
            tenant_name=row["tenant_name"], scopes=frozenset(Scope(s) for s in row["scopes"]),
            key_limits=Limits(row["rpm"], row["tpm"], row["concurrent"]),
            tenant_limits=Limits(row["t_rpm"], row["t_tpm"], row["t_concurrent"]),
            budget=Budget(row["daily"], row["monthly"], row["total"]),
            allowed_models=tuple(row["allowed_models"]), allow_all_models=row["allow_all_models"],
            prompt_log_enabled=row["prompt_log_enabled"],
            prompt_log_retention_days=row["prompt_log_retention_days"],
        )
        return row["key_hash"], principal
