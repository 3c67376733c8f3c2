"""The gateway on a real Redis Cluster (SPEC §4.11): the revocation, budget, rate-limit, auth-failure
and discovery e2e tests re-run unchanged (imported, not copied) with REDIS_CLUSTER=true and REDIS_URL at
a seed node; and a master fails over under a running gateway without a double grant."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import psycopg
import pytest

from gateway_core.limits import Limits
from tests.e2e.harness import Gateway
from tests.e2e.test_auth_and_revocation import (
    test_cli_revocation_is_refused_within_one_second,
    test_console_insert_is_refused_within_one_second_on_every_replica,
    test_failed_authentication_is_limited_per_address_before_any_hash,
)
from tests.e2e.test_discovery_and_policy import (
    test_an_empty_discovery_denies_every_model,
    test_models_come_and_go_with_discovery_within_one_refresh,
    test_set_models_from_the_cli_takes_effect_within_one_second,
)
from tests.e2e.test_limits_and_budgets import TestBudgets, TestRateLimits
from tests.services import PrivateRedisCluster

__all__ = [
    "TestBudgets", "TestRateLimits", "test_an_empty_discovery_denies_every_model",
    "test_cli_revocation_is_refused_within_one_second",
    "test_console_insert_is_refused_within_one_second_on_every_replica",
    "test_failed_authentication_is_limited_per_address_before_any_hash",
    "test_models_come_and_go_with_discovery_within_one_refresh",
    "test_set_models_from_the_cli_takes_effect_within_one_second",
]

CROSS_SLOT_SIGNS = ("CROSSSLOT", "CrossSlot", "don't hash to the same slot", "different slots")


@pytest.fixture(autouse=True)
def on_the_cluster(monkeypatch: pytest.MonkeyPatch, redis_cluster: PrivateRedisCluster,
                   caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Gateways, CLI runs and test clients all take REDIS_CLUSTER=true from the environment, as an
    operator's would; afterwards no node saw a cross-slot command and no log mentions one."""
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    yield
    assert "CROSSSLOT" not in redis_cluster.errorstats()
    assert not [sign for sign in CROSS_SLOT_SIGNS if sign in caplog.text]


@pytest.fixture
def redis_url(redis_cluster: PrivateRedisCluster) -> str:
    return redis_cluster.url


async def _tenant_id(gateway: Gateway, name: str) -> int:
    async with await psycopg.AsyncConnection.connect(gateway.settings.database_url) as conn:
        cur = await conn.execute("SELECT id FROM gateway.tenants WHERE name = %s", (name,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _chat(http: aiohttp.ClientSession, gateway: Gateway, secret: str) -> int:
    async with http.post(gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                         json={"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
                         ) as resp:
        await resp.read()
        return resp.status


async def test_a_gateway_rides_out_the_failover_of_its_tenants_master(
        gateway: Gateway, redis_cluster: PrivateRedisCluster) -> None:
    rpm = 12
    secret, _, tenant = await gateway.key(tenant_limits=Limits(rpm=rpm, tpm=1_000_000, concurrent=10))
    master = redis_cluster.master_port_of(f"{{t:{await _tenant_id(gateway, tenant)}}}")
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            statuses.append(await _chat(http, gateway, secret))
        assert statuses == [200] * 5
        await asyncio.sleep(1.0)  # replication to the replica is asynchronous; let it catch up

        redis_cluster.kill(master)
        try:
            # 503 while the replica takes over; then service again, without a restart.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                statuses.append(status := await _chat(http, gateway, secret))
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            during = statuses[5:]
            assert during[-1] == 200, during
            assert set(during) <= {200, 503}, during
            assert redis_cluster.master_port_of(f"{{t:{await _tenant_id(gateway, tenant)}}}") != master

            # The promoted replica knows every grant made before: the window is not refilled.
            for _ in range(rpm + 2):
                statuses.append(await _chat(http, gateway, secret))
        finally:
            redis_cluster.restart(master)  # it rejoins as the new master's replica
            redis_cluster.wait_healthy()
    assert statuses.count(200) == rpm, statuses
    assert statuses[-2:] == [429, 429], statuses
