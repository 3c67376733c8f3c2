"""Pieces for the fail-closed tests: a private PostgreSQL + Redis that a test may stop and start, the
gateway as a real `neuronetz-gateway serve` subprocess, and readers for the audit log and ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import psycopg

from entrypoints.app import open_admin
from entrypoints.migrate import upgrade_to_head
from entrypoints.settings import Settings
from gateway_core.limits import Limits
from gateway_core.models import ALL_SCOPES, Scope
from tests.services import PrivatePostgres, PrivateRedis, free_port

CLI = str(Path(sys.executable).with_name("neuronetz-gateway"))
AUDIT_FIELDS = ("request_id", "key_prefix", "model", "tokens_in", "tokens_out", "status", "latency_ms",
                "client_ip")


@attrs.define
class PrivateStack:
    """PostgreSQL and Redis of this module alone (free ports), so stopping them hurts no one else."""

    pg: PrivatePostgres
    redis: PrivateRedis
    pg_up: bool = True
    redis_up: bool = True

    @property
    def database_url(self) -> str:
        return self.pg.url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def stop_pg(self) -> None:
        self.pg.stop()
        self.pg_up = False

    def start_pg(self) -> None:
        self.pg.start()
        self.pg_up = True

    def stop_redis(self) -> None:
        self.redis.stop()
        self.redis_up = False

    def start_redis(self) -> None:
        self.redis.start()  # same port, empty: nothing is persisted
        self.redis_up = True

    def ensure_up(self) -> None:
        """A test that failed mid-outage must not leave the next one without its servers."""
        if not self.pg_up:
            self.start_pg()
        if not self.redis_up:
            self.start_redis()


@contextmanager
def private_stack() -> Iterator[PrivateStack]:
    pg = PrivatePostgres()
    redis = PrivateRedis()
    try:
        pg.init()
        pg.start()
        upgrade_to_head(pg.url)
        redis.start()
        yield PrivateStack(pg, redis)
    finally:
        redis.stop()
        pg.destroy()


async def new_key(settings: Settings, *, models: tuple[str, ...] = ("llama3.1:8b", "nomic-embed-text:latest"),
                  scopes: frozenset[Scope] = ALL_SCOPES, key_limits: Limits | None = None,
                  tenant: str | None = None) -> tuple[str, str, str]:
    """A tenant (unless given) and a key on *settings*' database: (secret, prefix, tenant name)."""
    async with open_admin(settings, "e2e-faults") as admin:
        if tenant is None:
            tenant = f"t-{uuid.uuid4().hex[:10]}"
            await admin.create_tenant(tenant, Limits(100_000, 100_000_000, 1000))
            await admin.set_models(tenant, models, False)
        new, _ = await admin.create_key(tenant, f"k-{uuid.uuid4().hex[:6]}", scopes, key_limits)
    return new.secret, new.prefix, tenant


async def audit_rows(database_url: str, request_ids: list[str]) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=3) as conn:
        cur = await conn.execute(
            f"SELECT {', '.join(AUDIT_FIELDS)} FROM gateway.audit_log WHERE request_id = ANY(%s)",
            (request_ids,))
        return [dict(zip(AUDIT_FIELDS, row, strict=True)) for row in await cur.fetchall()]


async def wait_for_audit(database_url: str, request_ids: list[str], timeout_s: float = 15.0
                         ) -> dict[str, list[dict[str, Any]]]:
    """Rows by request id, once every id has one (the writer is batched and retries with backoff)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await audit_rows(database_url, request_ids)
        by_id: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_id.setdefault(row["request_id"], []).append(row)
        missing = set(request_ids) - set(by_id)
        if not missing or time.monotonic() > deadline:
            assert not missing, f"{len(missing)} of {len(request_ids)} requests have no audit row after " \
                                f"{timeout_s}s, e.g. {sorted(missing)[:5]}"
            # A row that arrives late could still be a duplicate: one more look after a batch interval.
            await asyncio.sleep(0.5)
            rows = await audit_rows(database_url, request_ids)
            by_id = {}
            for row in rows:
                by_id.setdefault(row["request_id"], []).append(row)
            return by_id
        await asyncio.sleep(0.2)


async def ledger_total(database_url: str, prefix: str) -> tuple[int, int, int]:
    """(requests, tokens_in, tokens_out) in the key's `total` ledger row."""
    async with await psycopg.AsyncConnection.connect(database_url, connect_timeout=3) as conn:
        cur = await conn.execute(
            "SELECT COALESCE(sum(u.requests), 0), COALESCE(sum(u.tokens_in), 0),"
            " COALESCE(sum(u.tokens_out), 0)"
            " FROM gateway.budget_usage u JOIN gateway.api_keys k ON k.id = u.key_id"
            " WHERE k.prefix = %s AND u.period = 'total'", (prefix,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def wait_for_ledger(database_url: str, prefix: str, expected: tuple[int, int, int],
                          timeout_s: float = 15.0) -> tuple[int, int, int]:
    deadline = time.monotonic() + timeout_s
    while (got := await ledger_total(database_url, prefix)) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return got


async def wait_for_exit(proc: subprocess.Popen[bytes], timeout_s: float, tail: Callable[[], str]) -> int:
    """Exit code, waited for without blocking the loop (an in-process fake Ollama runs on it)."""
    deadline = time.monotonic() + timeout_s
    while (code := proc.poll()) is None:
        assert time.monotonic() < deadline, f"gateway still running after {timeout_s}s:\n{tail()}"
        await asyncio.sleep(0.05)
    return code


class GatewayProcess:
    """`neuronetz-gateway serve` as its own process, configured the way an operator would: env vars."""

    def __init__(self, stack: PrivateStack, ollama_url: str, spool_dir: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url,
                    "OLLAMA_BASE_URL": ollama_url, "GATEWAY_HOST": "127.0.0.1",
                    "GATEWAY_PORT": str(self.port), "METRICS_PORT": str(free_port()),
                    "AUDIT_SPOOL_DIR": str(spool_dir),
                    "MODEL_DISCOVERY_REFRESH_S": "1", "LOG_FORMAT": "json",
                    # info: every request's event, so a test can see which dependency a 503 names
                    "LOG_LEVEL": "info"}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 20.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([CLI, "serve"], env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"gateway exited at start-up: {self.tail()}"
                try:
                    async with http.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"gateway not ready within {timeout_s}s: {self.tail()}")

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return await wait_for_exit(self.proc, timeout_s, self.tail)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
