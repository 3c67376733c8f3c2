"""The psycopg connection pool, and the one place psycopg errors become DependencyUnavailable."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway_core.errors import DependencyUnavailable

# psycopg_pool retries a lost connection with an uncapped exponential backoff (1, 2, 4, 8, 16 s…)
# until reconnect_timeout (default 300 s): after a 20 s PostgreSQL outage the gateway stayed on 503
# for 10 s more. Giving up soon frees the slot and the next checkout starts a fresh attempt, so no
# wait between attempts exceeds ~2 s and the gateway recovers on its own quickly (SPEC §8.5).
RECONNECT_TIMEOUT_S = 5.0


def make_pool(database_url: str, *, min_size: int = 1, max_size: int = 10,
              timeout_s: float = 5.0) -> AsyncConnectionPool:
    """A closed pool; open it with `await pool.open(wait=True)`."""
    return AsyncConnectionPool(
        database_url, min_size=min_size, max_size=max_size, timeout=timeout_s, open=False,
        # Checked on checkout (one round trip, off the hot path: key-cache misses and batch flushes)
        # so that connections left dead by a database restart never fail a caller's request.
        kwargs={"autocommit": True}, check=AsyncConnectionPool.check_connection,
        reconnect_timeout=RECONNECT_TIMEOUT_S,
    )


@asynccontextmanager
async def connection(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection]:
    """A pooled connection; connection-level failures surface as DependencyUnavailable."""
    try:
        async with pool.connection() as conn:
            yield conn
    except (PoolTimeout, psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DependencyUnavailable(dependency="postgres") from exc
