"""Behind a load balancer (SPEC §4.11): from a TRUSTED_PROXIES peer, X-Forwarded-For names the client
for the per-IP auth limit and audit_log.client_ip; from any other peer the header is ignored, so a
caller cannot dodge the limit by inventing addresses. The test client connects from 127.0.0.1."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import psycopg
import pytest

from adapters.http.client_address import TrustedProxies
from tests.e2e.harness import Gateway, early_in_a_minute, gateway_settings, running_gateway
from tests.e2e.test_auth_and_revocation import bearer, unknown_key
from tests.fake_ollama import FakeOllama

LIMIT = 3


@asynccontextmanager
async def gateway_trusting(proxies: str, database_url: str, redis_url: str, fake: FakeOllama, spool: Path
                           ) -> AsyncIterator[Gateway]:
    settings = gateway_settings(database_url, redis_url, fake.url, spool, auth_failures_per_minute=LIMIT,
                                trusted_proxies=TrustedProxies.parse(proxies))
    # Starting flushes Redis: the proxy's own address (the test client's) has no failures from
    # other tests.
    async with running_gateway(settings, fake) as gw:
        await early_in_a_minute()
        yield gw


@pytest.fixture
async def behind_proxy(database_url: str, redis_url: str, fake: FakeOllama, tmp_path: Path
                       ) -> AsyncIterator[Gateway]:
    async with gateway_trusting("127.0.0.1/32", database_url, redis_url, fake, tmp_path / "a") as gw:
        yield gw


@pytest.fixture
async def exposed(database_url: str, redis_url: str, fake: FakeOllama, tmp_path: Path
                  ) -> AsyncIterator[Gateway]:
    async with gateway_trusting("", database_url, redis_url, fake, tmp_path / "b") as gw:
        yield gw


def fresh_address() -> str:
    """A documentation address no other test uses, so per-IP counters start at zero; written the
    way the audit log (an `inet` column) writes it back: `0ca3` reads back as `ca3`."""
    raw = f"2001:db8:{secrets.token_hex(2)}:{secrets.token_hex(2)}::{secrets.randbelow(9000) + 1}"
    return str(ipaddress.ip_address(raw))


async def _models(http: aiohttp.ClientSession, gw: Gateway, secret: str, forwarded_for: str | None = None
                  ) -> tuple[int, str]:
    headers = bearer(secret)
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    async with http.get(gw.v1 + "/models", headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers["X-Request-Id"]


async def _client_ip(gw: Gateway, request_id: str, timeout_s: float = 3.0) -> str | None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with await psycopg.AsyncConnection.connect(gw.settings.database_url, autocommit=True) as conn:
        while True:
            cur = await conn.execute("SELECT client_ip FROM gateway.audit_log WHERE request_id = %s",
                                     (request_id,))
            row = await cur.fetchone()
            if row is not None:
                return None if row[0] is None else str(row[0])
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no audit row for {request_id}")
            await asyncio.sleep(0.05)


async def test_the_audit_log_records_the_forwarded_client_only_from_a_trusted_proxy(
        behind_proxy: Gateway, exposed: Gateway) -> None:
    secret, _, _ = await behind_proxy.key()
    client = fresh_address()
    async with aiohttp.ClientSession() as http:
        status, via_proxy = await _models(http, behind_proxy, secret, client)
        assert status == 200
        # What the caller put in the header itself is left of what the proxy appended: ignored.
        status, spoofed_then_proxied = await _models(http, behind_proxy, secret, f"198.51.100.66, {client}")
        assert status == 200
        status, direct_to_proxy = await _models(http, behind_proxy, secret)
        assert status == 200
        status, untrusted = await _models(http, exposed, secret, client)
        assert status == 200
    assert await _client_ip(behind_proxy, via_proxy) == client
    assert await _client_ip(behind_proxy, spoofed_then_proxied) == client
    assert await _client_ip(behind_proxy, direct_to_proxy) == "127.0.0.1"
    assert await _client_ip(exposed, untrusted) == "127.0.0.1"


async def test_the_per_ip_auth_limit_follows_the_forwarded_client_behind_a_trusted_proxy(
        behind_proxy: Gateway) -> None:
    attacker, bystander = fresh_address(), fresh_address()
    async with aiohttp.ClientSession() as http:
        assert [(await _models(http, behind_proxy, unknown_key(), attacker))[0]
                for _ in range(LIMIT)] == [401] * LIMIT
        # The attacker is blocked wherever it connects through the proxy from, whatever it prepends.
        assert (await _models(http, behind_proxy, unknown_key(), attacker))[0] == 429
        assert (await _models(http, behind_proxy, unknown_key(), f"{bystander}, {attacker}"))[0] == 429
        # Other clients behind the same proxy, and the proxy's own address, are not.
        assert (await _models(http, behind_proxy, unknown_key(), bystander))[0] == 401
        assert (await _models(http, behind_proxy, unknown_key(), "not-an-address"))[0] == 401


async def test_an_untrusted_peer_cannot_dodge_the_limit_with_invented_headers(exposed: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        statuses = [(await _models(http, exposed, unknown_key(), fresh_address()))[0] for _ in range(LIMIT)]
        assert statuses == [401] * LIMIT
        for _ in range(3):
            status, _ = await _models(http, exposed, unknown_key(), fresh_address())
            assert status == 429
        invented = {**bearer(unknown_key()), "Forwarded": f'for="[{fresh_address()}]"'}
        async with http.get(exposed.v1 + "/models", headers=invented) as resp:
            assert resp.status == 429
