"""Authentication and revocation end to end (SPEC §3.1, §3.3, §4.5): a revoked key is refused within a
second on every replica, also across a lost listener connection; every authentication failure looks
the same; failed attempts per address are limited before any hash is checked."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import string
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import attrs
import psycopg

from adapters.key_cache import entry_name
from adapters.redis.auth_failures import RedisAuthFailures
from entrypoints.app import open_admin
from gateway_core.admin import KEEP
from gateway_core.api_keys import cache_digest
from gateway_core.models import Scope
from tests.e2e.harness import Gateway, early_in_a_minute, gateway_settings, run_cli, running_gateway
from tests.fake_ollama import FakeOllama
from tests.services import redis_client

KEY_ALPHABET = string.ascii_letters + string.digits + "-_"
CHAT = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "stream": False}
LISTENER_APP = "neuronetz-gateway-listener"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def forged(secret: str) -> str:
    """A well-formed key with *secret*'s prefix (first 12 characters) and a different secret part."""
    while True:
        candidate = secret[:12] + "".join(secrets.choice(KEY_ALPHABET) for _ in range(34))
        if candidate != secret:
            return candidate


def unknown_key() -> str:
    return "nz_" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(43))


@attrs.frozen
class Probe:
    sent: float  # wall clock, comparable with PostgreSQL's now() on the same host
    done: float
    status: int


async def probe(http: aiohttp.ClientSession, gw: Gateway, secret: str) -> Probe:
    sent = time.time()
    async with http.get(gw.v1 + "/models", headers=bearer(secret)) as resp:
        await resp.read()
        return Probe(sent, time.time(), resp.status)


async def watch(http: aiohttp.ClientSession, gw: Gateway, secret: str, *, until: Callable[[Probe], bool],
                timeout_s: float = 10.0, after: int = 3) -> list[Probe]:
    """Ask every ~20 ms until *until* holds, then a few more times; fails if it never holds."""
    probes: list[Probe] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probes.append(await probe(http, gw, secret))
        if until(probes[-1]):
            for _ in range(after):
                await asyncio.sleep(0.02)
                probes.append(await probe(http, gw, secret))
            return probes
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition never held within {timeout_s}s: {[p.status for p in probes][-20:]}")


def assert_refused_in_time(probes: list[Probe], committed: float, *, allow_503: bool = False) -> None:
    """401 less than 1 s after the commit, and from then on never anything but a refusal. With
    *allow_503*, 503 (fail-closed while the listener reconnects) may come before the 401."""
    refusals = {401, 503} if allow_503 else {401}
    first_401 = next(p for p in probes if p.status == 401)
    assert first_401.done - committed < 1.0, f"401 came {first_401.done - committed:.3f}s after the commit"
    late = [p for p in probes if p.sent > committed + 1.0 and p.status not in refusals]
    assert not late, f"answered {[p.status for p in late]} more than 1 s after the revocation"
    first_refusal = next(p for p in probes if p.status in refusals)
    assert {p.status for p in probes if p.sent >= first_refusal.done} <= refusals
    assert [p.status for p in probes if p.sent >= first_401.done] == [401] * len(
        [p for p in probes if p.sent >= first_401.done])


async def revocation_epoch(gw: Gateway, prefix: str) -> float:
    """When the revoking transaction started: no later than its commit, so measuring from it is strict."""
    async with await psycopg.AsyncConnection.connect(gw.settings.database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT extract(epoch FROM revoked_at) FROM gateway.revocations WHERE key_prefix = %s", (prefix,))
        row = await cur.fetchone()
    assert row is not None, "no revocation row"
    return float(row[0])


async def console_revoke(gw: Gateway, prefix: str) -> float:
    """The console's plain INSERT into the outbox; returns a wall-clock time before its commit."""
    async with await psycopg.AsyncConnection.connect(gw.settings.database_url, autocommit=True) as conn:
        started = time.time()
        await conn.execute("INSERT INTO gateway.revocations (key_prefix, source) VALUES (%s, 'console')",
                           (prefix,))
    return started


async def cached_in_redis(gw: Gateway, secret: str) -> bool:
    client = redis_client(gw.settings.redis_url)
    try:
        return bool(await client.exists(entry_name(cache_digest(secret))))
    finally:
        await client.aclose()


async def test_cli_revocation_is_refused_within_one_second(gateway: Gateway) -> None:
    secret, prefix, _ = await gateway.key()
    other, _, tenant = await gateway.key()
    async with aiohttp.ClientSession() as http:
        assert (await probe(http, gateway, secret)).status == 200
        assert (await probe(http, gateway, other)).status == 200
        assert await cached_in_redis(gateway, secret)  # and in process: the cache a revocation must beat

        cli = asyncio.create_task(run_cli(gateway, "revoke-key", "--prefix", prefix))
        probes = await watch(http, gateway, secret, until=lambda p: p.status == 401)
        code, out, err = await cli
        assert code == 0, err
        assert f"prefix={prefix}" in out
        assert_refused_in_time(probes, await revocation_epoch(gateway, prefix))

        # Only that key: the tenant's other key keeps working.
        assert (await probe(http, gateway, other)).status == 200
        assert tenant


async def test_console_insert_is_refused_within_one_second_on_every_replica(
        gateway: Gateway, tmp_path: Path) -> None:
    secret, prefix, _ = await gateway.key()
    replica_settings = gateway_settings(gateway.settings.database_url, gateway.settings.redis_url,
                                        gateway.fake.url, tmp_path / "replica")
    async with running_gateway(replica_settings, gateway.fake, flush_redis=False) as replica, \
            aiohttp.ClientSession() as http:
        for gw in (gateway, replica):
            assert (await probe(http, gw, secret)).status == 200

        committed = await console_revoke(gateway, prefix)
        watched = await asyncio.gather(*(watch(http, gw, secret, until=lambda p: p.status == 401)
                                         for gw in (gateway, replica)))
    for probes in watched:
        assert_refused_in_time(probes, committed)


async def _listener_pids(gw: Gateway) -> set[int]:
    async with await psycopg.AsyncConnection.connect(gw.settings.database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT pid FROM pg_stat_activity"
                                 " WHERE datname = current_database() AND application_name = %s",
                                 (LISTENER_APP,))
        return {int(row[0]) for row in await cur.fetchall()}


async def _kill_listener(gw: Gateway) -> int:
    """Terminate the gateway's LISTEN session (it names itself in pg_stat_activity); returns its pid."""
    pids = await _listener_pids(gw)
    assert len(pids) == 1, pids
    async with await psycopg.AsyncConnection.connect(gw.settings.database_url, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (next(iter(pids)),))
    return next(iter(pids))


async def _wait_for_new_listener(gw: Gateway, killed: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = await _listener_pids(gw)
        if pids and killed not in pids:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the listener did not reconnect")


async def test_revocation_still_lands_after_the_listener_connection_is_killed(gateway: Gateway) -> None:
    gap_secret, gap_prefix, tenant = await gateway.key()
    later_secret, later_prefix, _ = await gateway.key(tenant=tenant)
    async with aiohttp.ClientSession() as http:
        for secret in (gap_secret, later_secret):
            assert (await probe(http, gateway, secret)).status == 200

        # Revoked while the listener is down (its notification is lost): the replayed outbox catches it.
        await _kill_listener(gateway)
        committed = await console_revoke(gateway, gap_prefix)
        probes = await watch(http, gateway, gap_secret, until=lambda p: p.status == 401)
        assert_refused_in_time(probes, committed, allow_503=True)

        # The gateway recovered on its own, and the key that was not revoked works again.
        recovered = await watch(http, gateway, later_secret, until=lambda p: p.status == 200, after=0)
        assert all(p.status in (200, 503) for p in recovered)

        # The new LISTEN connection (named the same way) carries the next revocation just as fast.
        committed = await console_revoke(gateway, later_prefix)
        probes = await watch(http, gateway, later_secret, until=lambda p: p.status == 401)
        assert_refused_in_time(probes, committed)


async def test_the_listener_reconnects_quickly_after_every_loss(gateway: Gateway) -> None:
    """A long-running gateway loses its listener connection now and then; each loss must be as short
    as the first, or revocations in the gap would wait for a grown back-off."""
    secret, prefix, _ = await gateway.key()
    async with aiohttp.ClientSession() as http:
        for _ in range(6):
            started = time.monotonic()
            await _wait_for_new_listener(gateway, await _kill_listener(gateway))
            await watch(http, gateway, secret, until=lambda p: p.status == 200, after=0)
            assert time.monotonic() - started < 1.0
        await _kill_listener(gateway)
        committed = await console_revoke(gateway, prefix)
        probes = await watch(http, gateway, secret, until=lambda p: p.status == 401)
    assert_refused_in_time(probes, committed, allow_503=True)


async def test_a_key_sharing_a_valid_prefix_is_refused_even_while_the_valid_key_is_cached(
        gateway: Gateway) -> None:
    secret, _, _ = await gateway.key()
    impostor = forged(secret)
    async with aiohttp.ClientSession() as http:
        assert (await probe(http, gateway, secret)).status == 200
        assert await cached_in_redis(gateway, secret)
        for _ in range(2):  # the second attempt meets the negative cache
            assert (await probe(http, gateway, impostor)).status == 401
            assert (await probe(http, gateway, forged(secret))).status == 401
        async with http.post(gateway.v1 + "/chat/completions", headers=bearer(impostor), json=CHAT) as resp:
            assert resp.status == 401
        # The failed look-alikes did not poison the real key.
        assert (await probe(http, gateway, secret)).status == 200
    assert [r for r in gateway.fake.requests if r["path"] != "/api/tags"] == []


async def test_every_authentication_failure_has_the_same_401_body(gateway: Gateway) -> None:
    secret, _, tenant = await gateway.key()
    revoked, revoked_prefix, _ = await gateway.key(tenant=tenant)
    async with aiohttp.ClientSession() as http:
        assert (await probe(http, gateway, revoked)).status == 200
        async with open_admin(gateway.settings, "e2e") as admin:
            await admin.revoke_key(revoked_prefix)
        await watch(http, gateway, revoked, until=lambda p: p.status == 401, after=0)

        cases: dict[str, dict[str, str]] = {
            "missing": {},
            "bearer junk": {"Authorization": "Bearer abc"},
            "basic": {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
            "empty bearer": {"Authorization": "Bearer "},
            "key with a tail": bearer(secret + "x"),
            "unknown key": bearer(unknown_key()),
            "wrong secret": bearer(forged(secret)),
            "revoked": bearer(revoked),
        }
        bodies: dict[tuple[str, str], bytes] = {}
        for name, headers in cases.items():
            async with http.get(gateway.v1 + "/models", headers=headers) as resp:
                assert resp.status == 401, name
                assert resp.content_type == "application/json"
                bodies[name, "GET /v1/models"] = await resp.read()
            async with http.post(gateway.url + "/api/chat", headers=headers, json=CHAT) as resp:
                assert resp.status == 401, name
                bodies[name, "POST /api/chat"] = await resp.read()
    assert len(set(bodies.values())) == 1, bodies
    error = json.loads(next(iter(bodies.values())))["error"]
    assert error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}
    assert secret[:12] not in error["message"] and revoked_prefix not in error["message"]


async def test_disallowed_and_nonexistent_models_get_the_same_403(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=("llama3.1:8b",))
    async with aiohttp.ClientSession() as http:
        for url in (gateway.v1 + "/chat/completions", gateway.url + "/api/chat"):
            bodies = {}
            for model in ("qwen3:8b", "no-such-model:7b", "gpt-oss:20b-cloud"):
                async with http.post(url, headers=bearer(secret), json={**CHAT, "model": model}) as resp:
                    assert resp.status == 403, (url, model)
                    bodies[model] = await resp.read()
            assert len(set(bodies.values())) == 1, bodies
            assert b'"code":"model_not_allowed"' in bodies["qwen3:8b"]
            assert b"qwen3" not in bodies["qwen3:8b"]
            async with http.post(url, headers=bearer(secret), json=CHAT) as resp:
                assert resp.status == 200  # the allowed model itself works
    assert not [r for r in gateway.fake.requests if r["json"] and r["json"].get("model") != "llama3.1:8b"]


async def test_a_key_is_limited_to_its_scopes(gateway: Gateway) -> None:
    embed_only, _, _ = await gateway.key(scopes=frozenset({Scope.EMBEDDINGS}))
    chat_only, _, _ = await gateway.key(scopes=frozenset({Scope.CHAT}))
    embed = {"model": "nomic-embed-text:latest", "input": "hello"}
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/chat/completions", "/api/chat", "/v1/completions", "/api/generate"):
            payload = {**CHAT, "prompt": "hi"}
            async with http.post(gateway.url + path, headers=bearer(embed_only), json=payload) as resp:
                assert resp.status == 403, path
                assert (await resp.json())["error"]["code"] == "scope_not_allowed"
        for path in ("/v1/embeddings", "/api/embed"):
            async with http.post(gateway.url + path, headers=bearer(chat_only), json=embed) as resp:
                assert resp.status == 403, path
                assert (await resp.json())["error"]["code"] == "scope_not_allowed"
            async with http.post(gateway.url + path, headers=bearer(embed_only), json=embed) as resp:
                assert resp.status == 200, path
        async with http.post(gateway.v1 + "/chat/completions", headers=bearer(chat_only), json=CHAT) as resp:
            assert resp.status == 200
    chat_upstream = [r for r in gateway.fake.requests if r["path"] in ("/v1/chat/completions", "/api/chat")]
    assert len(chat_upstream) == 1


@asynccontextmanager
async def strict_gateway(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    """Five failures a minute, and deliberately slow hashes so that a checked hash cannot hide."""
    async with FakeOllama(models=["llama3.1:8b"]) as fake:
        settings = gateway_settings(database_url, redis_url, fake.url, tmp_path, auth_failures_per_minute=5,
                                    argon2_memory_kib=65536, argon2_time_cost=3)
        async with running_gateway(settings, fake) as gw:
            yield gw


async def _timed(http: aiohttp.ClientSession, gw: Gateway, headers: dict[str, str]
                 ) -> tuple[int, float, Mapping[str, str], dict[str, dict[str, str]]]:
    started = time.perf_counter()
    async with http.get(gw.v1 + "/models", headers=headers) as resp:
        body = await resp.json()
        return resp.status, time.perf_counter() - started, resp.headers, body


async def test_failed_authentication_is_limited_per_address_before_any_hash(
        database_url: str, redis_url: str, tmp_path: Path) -> None:
    async with strict_gateway(database_url, redis_url, tmp_path) as gw, aiohttp.ClientSession() as http:
        cached, _, tenant = await gw.key()
        uncached, _, _ = await gw.key(tenant=tenant)
        assert (await _timed(http, gw, bearer(cached)))[0] == 200
        await early_in_a_minute()

        # Five wrong secrets for a real prefix: each one costs a full argon2id verification.
        hashed = [await _timed(http, gw, bearer(forged(cached))) for _ in range(5)]
        assert [h[0] for h in hashed] == [401] * 5
        hash_time = min(h[1] for h in hashed)

        status, took, headers, body = await _timed(http, gw, bearer(forged(cached)))
        assert status == 429
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert int(headers["retry-after-ms"]) >= 1000
        assert took < hash_time / 2, (took, hash_time)

        # A burst from the blocked address costs no hashing at all: together faster than one hash.
        started = time.perf_counter()
        burst = await asyncio.gather(*(_timed(http, gw, bearer(forged(cached))) for _ in range(8)))
        assert [b[0] for b in burst] == [429] * 8
        assert time.perf_counter() - started < hash_time, (time.perf_counter() - started, hash_time)

        # Every failing attempt from the address is now 429, however it fails; a forwarded-for header
        # does not make it another address.
        for headers_ in ({}, {"Authorization": "Bearer abc"}, bearer(hashed_key := forged(cached)),
                         {**bearer(unknown_key()), "X-Forwarded-For": "203.0.113.9"}):
            assert (await _timed(http, gw, headers_))[0] == 429, headers_
        assert hashed_key

        # Decision (documented): a key this gateway verified before keeps working from a blocked
        # address, because serving it needs no hash; a key that would need one waits like the rest.
        assert (await _timed(http, gw, bearer(cached)))[0] == 200
        status, _, headers, _ = await _timed(http, gw, bearer(uncached))
        assert status == 429 and "Retry-After" in headers

        # The limit is per address: another client address is unaffected.
        other_address = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=other_address) as elsewhere:
            assert (await _timed(elsewhere, gw, bearer(uncached)))[0] == 200
            assert (await _timed(elsewhere, gw, bearer(forged(cached))))[0] == 401


async def test_the_retry_after_of_an_auth_block_is_honest(redis_url: str) -> None:
    """Waiting exactly Retry-After gets the address unblocked, and not much later than it could be."""
    client = redis_client(redis_url)
    failures = RedisAuthFailures(client, per_minute=5)
    try:
        minute = 60 * (int(time.time() // 60) + 10_000)  # a private stretch of (fabricated) time
        # More failures than the limit within one minute (a concurrent burst lands them all) ...
        ip = f"198.51.100.{secrets.randbelow(250)}-{secrets.token_hex(4)}"
        for _ in range(8):
            await failures.record(ip, minute + 10)
        # ... and failures spread over two minutes, where the older ones fade out.
        spread = ip + "-spread"
        for _ in range(7):
            await failures.record(spread, minute + 50)
        for _ in range(2):
            await failures.record(spread, minute + 61)
        for name, now in ((ip, minute + 20.0), (ip, minute + 59.5), (spread, minute + 65.0)):
            wait = await failures.blocked_for(name, now)
            assert wait is not None
            retry_after = math.ceil(wait)  # what the caller is told (whole seconds, rounded up)
            assert await failures.blocked_for(name, now + retry_after) is None, (name, now, wait)
            assert await failures.blocked_for(name, now + retry_after - 1.5) is not None, (name, now, wait)
    finally:
        await client.aclose()


async def test_key_changes_land_within_one_second_under_concurrent_traffic(gateway: Gateway) -> None:
    """Key-level changes take the eviction path revocations take; requests racing it must not copy the
    old entry back into the process (which kept it there for KEY_CACHE_TTL_S)."""
    secret, prefix, _ = await gateway.key()
    stop = asyncio.Event()

    async def limit_seen(http: aiohttp.ClientSession) -> int:
        async with http.post(gateway.v1 + "/chat/completions", headers=bearer(secret), json=CHAT) as resp:
            await resp.read()
            assert resp.status == 200
            return int(resp.headers["X-RateLimit-Limit-Requests"])

    async with aiohttp.ClientSession() as http, open_admin(gateway.settings, "e2e") as admin:
        async def traffic() -> None:
            while not stop.is_set():
                await limit_seen(http)

        busy = [asyncio.create_task(traffic()) for _ in range(6)]
        try:
            for flip in range(12):
                rpm = 50_000 + flip
                await asyncio.sleep(0.03)
                await admin.set_key_limits(prefix, rpm, KEEP, KEEP)
                changed = time.monotonic()
                while (seen := await limit_seen(http)) != rpm:
                    assert time.monotonic() - changed < 1.0, (flip, seen)
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
                assert await limit_seen(http) == rpm, flip  # still the new value after the race
        finally:
            stop.set()
            await asyncio.gather(*busy)
