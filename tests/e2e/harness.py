"""A whole gateway in the test's event loop, on real PostgreSQL and Redis, in front of FakeOllama."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
from aiohttp import web

from entrypoints.app import build_app, make_redis, open_admin
from entrypoints.settings import Settings, load_settings
from gateway_core.admin import KEEP
from gateway_core.limits import Limits
from gateway_core.models import ALL_SCOPES, Scope
from tests.fake_ollama import FakeOllama
from tests.services import free_port

CLI = str(Path(sys.executable).with_name("neuronetz-gateway"))


@attrs.define
class Gateway:
    url: str
    settings: Settings
    app: web.Application
    fake: FakeOllama

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    async def key(
        self, *, models: tuple[str, ...] = ("llama3.1:8b", "nomic-embed-text:latest"),
        allow_all: bool = False,
        scopes: frozenset[Scope] = ALL_SCOPES, tenant_limits: Limits | None = None,
        key_limits: Limits | None = None, budget: dict[str, int] | None = None, tenant: str | None = None,
        prompt_log: bool = False,
    ) -> tuple[str, str, str]:
        """A new tenant (unless *tenant* is given) and key; returns (secret, prefix, tenant name)."""
        import uuid

        async with open_admin(self.settings, "e2e") as admin:
            if tenant is None:
                tenant = f"t-{uuid.uuid4().hex[:10]}"
                await admin.create_tenant(tenant, tenant_limits or Limits(100_000, 100_000_000, 1000))
                await admin.set_models(tenant, models, allow_all)
            new, _ = await admin.create_key(tenant, f"k-{uuid.uuid4().hex[:6]}", scopes, key_limits)
            if budget:
                await admin.set_budget(new.prefix, budget.get("daily", KEEP), budget.get("monthly", KEEP),
                                       budget.get("total", KEEP))
            if prompt_log:
                await admin.set_prompt_log(new.prefix, True, None)
        return new.secret, new.prefix, tenant


def gateway_settings(database_url: str, redis_url: str, ollama_url: str, spool_dir: Path,
                     **overrides: Any) -> Settings:
    base = attrs.evolve(
        load_settings(), database_url=database_url, redis_url=redis_url, ollama_base_url=ollama_url,
        gateway_host="127.0.0.1", gateway_port=free_port(), metrics_port=free_port(),
        model_discovery_refresh_s=1.0, audit_spool_dir=str(spool_dir), log_format="json",
    )
    return attrs.evolve(base, **overrides)


@asynccontextmanager
async def running_gateway(settings: Settings, fake: FakeOllama, *, flush_redis: bool = True
                          ) -> AsyncIterator[Gateway]:
    if flush_redis:
        client = make_redis(settings)  # on a cluster, FLUSHDB goes to every master
        await client.flushdb()
        await client.aclose()
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, settings.gateway_host, settings.gateway_port).start()
    try:
        yield Gateway(f"http://{settings.gateway_host}:{settings.gateway_port}", settings, app, fake)
    finally:
        await runner.cleanup()


async def audit_row(gateway: Gateway, request_id: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """The audit row for *request_id*; the gateway writes them in batches, so poll for it."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with await psycopg.AsyncConnection.connect(gateway.settings.database_url, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT route, model, status, tokens_in, tokens_out FROM gateway.audit_log"
                " WHERE request_id = %s", (request_id,))
            rows = await cur.fetchall()
            if rows:
                assert len(rows) == 1, rows
                route, model, status, tokens_in, tokens_out = rows[0]
                return {"route": route, "model": model, "status": status, "tokens_in": tokens_in,
                        "tokens_out": tokens_out}
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no audit row for request {request_id} within {timeout_s}s")
            await asyncio.sleep(0.05)


async def run_cli(gateway: Gateway, *args: str) -> tuple[int, str, str]:
    """The operator's CLI as a real subprocess, without blocking the loop the gateway runs in."""
    env = {**os.environ, "DATABASE_URL": gateway.settings.database_url,
           "REDIS_URL": gateway.settings.redis_url, "NEURONETZ_ACTOR": "e2e-operator"}
    proc = await asyncio.create_subprocess_exec(CLI, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def early_in_a_minute(needed_s: float = 20.0) -> None:
    """Failed authentications are counted in two fixed one-minute buckets weighted by overlap (SPEC
    §3.1): a few failures straddling a minute boundary can count as fewer than they are. A test
    that needs its failures to block starts where the current minute has *needed_s* left."""
    left = 60.0 - time.time() % 60.0
    if left < needed_s:
        await asyncio.sleep(left + 0.05)
