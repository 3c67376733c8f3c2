"""Rows and keys for the writer tests, straight in SQL (no argon2, no CLI)."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg


def new_key(database_url: str, *, prompt_log: bool = False) -> tuple[int, str]:
    """(key id, prefix) of a fresh tenant's key."""
    prefix = "nz_" + uuid.uuid4().hex[:9]
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("INSERT INTO gateway.tenants (name) VALUES (%s) RETURNING id",
                           (f"w-{uuid.uuid4().hex[:10]}",)).fetchone()
        assert row is not None
        key = conn.execute(
            "INSERT INTO gateway.api_keys (tenant_id, name, prefix, key_hash, prompt_log_enabled)"
            " VALUES (%s, 'k', %s, '$argon2id$test', %s) RETURNING id",
            (row[0], prefix, prompt_log)).fetchone()
        assert key is not None
    return int(key[0]), prefix


def delete_key(database_url: str, key_id: int) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM gateway.api_keys WHERE id = %s", (key_id,))


def scalar(database_url: str, query: str, *params: object) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0] or 0)


def spool_empty(spool: Path) -> bool:
    return not [*spool.glob("*.spool"), *spool.glob("*.replaying")]


async def within(seconds: float, probe: Callable[[], bool | Awaitable[bool]]) -> float:
    """Seconds until *probe* holds; fails after *seconds*."""
    started = time.monotonic()

    async def holds() -> bool:
        answer = probe()
        return bool(await answer) if inspect.isawaitable(answer) else bool(answer)

    while not await holds():
        assert time.monotonic() - started < seconds, f"not within {seconds}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started
