"""The composition root: turns Settings into adapters and use cases, for the server and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

from aiohttp import web
from psycopg_pool import PoolTimeout
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from adapters.argon2_hasher import Argon2Hasher
from adapters.circuit import BackendRouter
from adapters.discovery import Discovery
from adapters.http.app import SERVICES, Services, make_web_app
from adapters.key_cache import TieredKeyCache
from adapters.observer import RequestObserver, seconds_since
from adapters.ollama import OllamaBackend
from adapters.postgres.audit import AuditWriter, PromptLogWriter, sweep_prompt_log
from adapters.postgres.ledger import PostgresLedger
from adapters.postgres.listener import ChangeListener
from adapters.postgres.pool import make_pool
from adapters.postgres.principals import PostgresPrincipalSource
from adapters.postgres.tenants import PostgresTenantStore
from adapters.prometheus import GatewayMetrics
from adapters.redis.admission import RedisAdmission
from adapters.redis.admission_view import RedisAdmissionView
from adapters.redis.auth_failures import RedisAuthFailures
from adapters.redis.cluster import ping_all
from adapters.redis.discovery import RedisDiscoveryCache
from adapters.redis.health import RedisHealth
from adapters.system_clock import SystemClock
from adapters.tasks import cancel_and_wait
from entrypoints.settings import Settings
from gateway_core.admin import Admin
from gateway_core.admission import LEASE_RENEW_EVERY_S
from gateway_core.errors import DependencyUnavailable
from gateway_core.gateway import Authenticator, AuthPorts, ModelPolicy
from gateway_core.metering import Metering

_log = logging.getLogger("neuronetz.app")
METRICS = web.AppKey("metrics", GatewayMetrics)
REFRESH_GAUGES = web.AppKey("refresh_gauges", Callable[[], None])
_READY_TIMEOUT_S = 1.0
SETTLEMENT_DRAIN_S = 10.0


def make_hasher(settings: Settings) -> Argon2Hasher:
    return Argon2Hasher(settings.argon2_memory_kib, settings.argon2_time_cost, settings.argon2_parallelism)


def make_redis(settings: Settings) -> Redis:
    """The one place a Redis client is built.

    Short timeouts: a dead Redis must turn into a quick 503, not a hung request (SPEC §8.5). A pooled
    connection left dead by a Redis restart fails with ConnectionError: that command is retried once
    on a fresh connection before anything is refused. No health-check PING before use: it would add a
    round trip to the hot path after every idle second, and the retry already covers it. Timeouts
    are not retried (the command may have run; a retry could double a charge; redis-py's default
    would retry them ten times with backoff, far past any caller's patience).
    """
    if settings.redis_cluster:
        # REDIS_URL is a seed node; the client learns the slot map from it and follows MOVED/ASK.
        # Not a Redis subclass, but it offers every command the adapters use (SPEC §4.11).
        cluster: Redis = RedisCluster.from_url(  # type: ignore[assignment]
            settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0)
        return cluster
    return Redis.from_url(settings.redis_url, socket_connect_timeout=1.0, socket_timeout=2.0,
                          retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))


@asynccontextmanager
async def open_admin(settings: Settings, actor: str) -> AsyncIterator[Admin]:
    """The operator use cases over real Postgres and Redis, for one CLI command."""
    pool = make_pool(settings.database_url, min_size=1, max_size=2)
    redis = make_redis(settings)
    hasher = make_hasher(settings)
    try:
        try:
            await pool.open(wait=True, timeout=5)
        except PoolTimeout as exc:
            raise DependencyUnavailable("cannot reach PostgreSQL at DATABASE_URL",
                                        dependency="postgres") from exc
        yield Admin(PostgresTenantStore(pool), hasher, RedisDiscoveryCache(redis), SystemClock(), actor)
    finally:
        hasher.close()
        await redis.aclose()
        # psycopg_pool's close can wait on a connection attempt in flight; never hang a shutdown on it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.close(timeout=2), 5)


def build_app(settings: Settings) -> web.Application:
    app = make_web_app(settings.max_request_bytes)
    app[METRICS] = GatewayMetrics()
    app.cleanup_ctx.append(partial(_wire, settings=settings))
    return app


async def _every(interval_s: float, job: Callable[[], Awaitable[object]], name: str) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception as exc:  # a background job must outlive any single failure
            _log.warning("%s failed: %s", name, type(exc).__name__)


async def _wire(app: web.Application, *, settings: Settings) -> AsyncIterator[None]:
    clock = SystemClock()
    metrics = app[METRICS]
    pool = make_pool(settings.database_url, min_size=2, max_size=10, timeout_s=2.0)
    await pool.open(wait=False)
    redis = make_redis(settings)
    backends = [OllamaBackend(url, timeout_s=settings.upstream_timeout_s)
                for url in settings.ollama_base_urls]
    for backend in backends:
        await backend.start()
    hasher = make_hasher(settings)
    cache = TieredKeyCache(redis, settings.key_cache_ttl_s)
    listener = ChangeListener(settings.database_url, cache, cache_ttl_s=settings.key_cache_ttl_s)
    redis_health = RedisHealth(redis)
    discovery = Discovery(backends, RedisDiscoveryCache(redis), refresh_s=settings.model_discovery_refresh_s,
                          ttl_s=settings.model_discovery_cache_ttl_s)
    ledger = PostgresLedger(pool, settings.audit_spool_dir)
    audit = AuditWriter(pool, settings.audit_spool_dir)
    prompts = PromptLogWriter(pool, settings.audit_spool_dir)
    for writer in (ledger, audit, prompts):
        await writer.start()
    admission = RedisAdmission(redis)
    metering = Metering(admission, ledger, clock, settings.budget_default_completion_reserve,
                        view=RedisAdmissionView(redis, settled=admission.flush))
    auth = Authenticator(AuthPorts(cache=cache, source=PostgresPrincipalSource(pool), hasher=hasher,
                                   failures=RedisAuthFailures(redis, settings.auth_failures_per_minute),
                                   feed=listener, clock=clock))
    router = BackendRouter(backends, settings.circuit_failure_threshold, settings.circuit_reset_s, clock,
                           holders=discovery.holders, on_outcome=metrics.observe_upstream)

    async def readiness() -> tuple[bool, dict[str, str]]:
        async def pg() -> None:
            async with pool.connection(timeout=_READY_TIMEOUT_S) as conn:
                await conn.execute("SELECT 1")

        # Each backend by its index, never its URL; Ollama counts as up while one of them answers.
        checks = {"postgres": pg(), "redis": ping_all(redis),
                  **{f"ollama_{i}": b.version(_READY_TIMEOUT_S) for i, b in enumerate(backends)}}
        results = await asyncio.gather(*(asyncio.wait_for(c, _READY_TIMEOUT_S * 1.5)
                                         for c in checks.values()), return_exceptions=True)
        states = {name: "down" if isinstance(result, BaseException) else "ok"
                  for name, result in zip(checks, results, strict=True)}
        answering = any(states[f"ollama_{i}"] == "ok" for i in range(len(backends)))
        states["ollama"] = "ok" if answering else "down"
        states["change_feed"] = "ok" if listener.trusted() else "down"
        ready = all(states[name] == "ok" for name in ("postgres", "redis", "ollama", "change_feed"))
        return ready, states

    app[SERVICES] = Services(
        auth=auth, policy=ModelPolicy(discovery, clock), metering=metering,
        observer=RequestObserver(audit, prompts, metrics, settings.prompt_log_default_retention_days),
        readiness=readiness, upstream=router, max_request_bytes=settings.max_request_bytes,
        confirm_redis=redis_health.confirm, trusted_proxies=settings.trusted_proxies)

    def refresh_gauges() -> None:
        for index, (state, models_open) in enumerate(zip(router.states(), router.open_model_circuits(),
                                                         strict=True)):
            metrics.circuit_open.set({"backend": str(index)}, float(state))
            metrics.model_circuits_open.set({"backend": str(index)}, float(models_open))
        metrics.discovery_age.set({}, seconds_since(discovery.last_success))
        catalog = discovery.current(clock.now())
        metrics.discovered_models.set({}, float(len(catalog.names) if catalog else 0))
        for writer in (ledger, audit, prompts):
            metrics.observe_writer(writer.table, writer.pending, writer.rejected, writer.spool_bytes)

    app[REFRESH_GAUGES] = refresh_gauges
    await redis_health.start()
    await auth.warm_up()
    await listener.start()
    await discovery.start()
    tasks = [
        asyncio.create_task(_every(LEASE_RENEW_EVERY_S, metering.renew_leases, "lease renewal")),
        asyncio.create_task(_every(settings.prompt_log_sweep_interval_s, partial(sweep_prompt_log, pool),
                                   "prompt-log sweep")),
    ]
    try:
        yield
    finally:
        # The last answers' settlements first, while Redis is still there (bounded: each call
        # fails within Redis' socket timeout when Redis is gone, and is then kept as unsettled).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(metering.drain(), SETTLEMENT_DRAIN_S)
        await cancel_and_wait(tasks)
        await discovery.stop()
        await listener.stop()
        await redis_health.stop()
        for writer in (ledger, audit, prompts):
            await writer.stop()
        for backend in backends:
            await backend.close()
        hasher.close()
        await redis.aclose()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.close(timeout=2), 5)
