"""Model discovery and model policy end to end (SPEC §4.6, §4.7, §8.4): what Ollama has shows up and
disappears within a refresh, operators' allowlist changes land within a second, cloud models stay out
of allow-all, Ollama's naming rules apply, and an empty discovery denies everything."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import psycopg

from entrypoints.app import open_admin
from tests.e2e.harness import Gateway, run_cli

# MODEL_DISCOVERY_REFRESH_S is 1 s in the harness: a change shows within one refresh plus slack.
DISCOVERY_DEADLINE_S = 2.5
NON_CLOUD = ["llama3.1:8b", "nomic-embed-text:latest", "qwen3:8b"]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}


class Caller:
    """One API key's view of the gateway."""

    def __init__(self, http: aiohttp.ClientSession, gw: Gateway, secret: str) -> None:
        self.http, self.gw, self.headers = http, gw, bearer(secret)

    async def chat(self, model: str) -> tuple[int, bytes]:
        async with self.http.post(self.gw.v1 + "/chat/completions", headers=self.headers,
                                  json=chat(model)) as resp:
            return resp.status, await resp.read()

    async def native_chat(self, model: str) -> tuple[int, bytes]:
        async with self.http.post(self.gw.url + "/api/chat", headers=self.headers, json=chat(model)) as resp:
            return resp.status, await resp.read()

    async def listed(self) -> list[str]:
        """The model ids of /v1/models, checked against /api/tags: both list the same effective set
        (asked once more if a discovery refresh landed between the two requests)."""
        for _ in range(2):
            async with self.http.get(self.gw.v1 + "/models", headers=self.headers) as resp:
                assert resp.status == 200
                ids = sorted(m["id"] for m in (await resp.json())["data"])
            async with self.http.get(self.gw.url + "/api/tags", headers=self.headers) as resp:
                assert resp.status == 200
                tags = sorted(m["name"] for m in (await resp.json())["models"])
            if ids == tags:
                break
        assert ids == tags, (ids, tags)
        return ids

    async def retrieve(self, model: str) -> tuple[int, bytes]:
        async with self.http.get(self.gw.v1 + "/models/" + model, headers=self.headers) as resp:
            return resp.status, await resp.read()


async def within(timeout_s: float, check: Callable[[], Awaitable[bool]], every_s: float = 0.05) -> float:
    """Seconds until *check* holds; fails when it does not hold within *timeout_s*."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        await asyncio.sleep(every_s)


async def last_change_epoch(gw: Gateway, action: str, target: str) -> float:
    """When the operator's change began: no later than its commit, so measuring from it is strict."""
    async with await psycopg.AsyncConnection.connect(gw.settings.database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT extract(epoch FROM max(at)) FROM gateway.admin_events"
                                 " WHERE action = %s AND target = %s", (action, target))
        row = await cur.fetchone()
    assert row is not None and row[0] is not None
    return float(row[0])


async def test_models_come_and_go_with_discovery_within_one_refresh(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(allow_all=True)
    async with aiohttp.ClientSession() as http:
        caller = Caller(http, gateway, secret)
        assert await caller.listed() == NON_CLOUD
        refused_unknown = await caller.chat("mistral:7b")
        assert refused_unknown[0] == 403

        gateway.fake.models.append("mistral:7b")
        took = await within(DISCOVERY_DEADLINE_S, lambda: _has(caller, "mistral:7b"))
        assert took <= DISCOVERY_DEADLINE_S
        assert (await caller.chat("mistral:7b"))[0] == 200
        assert (await caller.native_chat("mistral:7b"))[0] == 200
        assert (await caller.retrieve("mistral:7b"))[0] == 200

        gateway.fake.models.remove("qwen3:8b")
        await within(DISCOVERY_DEADLINE_S, lambda: _gone(caller, "qwen3:8b"))
        assert await caller.listed() == ["llama3.1:8b", "mistral:7b", "nomic-embed-text:latest"]
        # A model that went away answers exactly like one that never existed.
        assert await caller.chat("qwen3:8b") == refused_unknown
        assert (await caller.retrieve("qwen3:8b"))[0] == 404
    calls = [r["json"]["model"] for r in gateway.fake.requests if r["path"] == "/v1/chat/completions"]
    assert "qwen3:8b" not in calls


async def _has(caller: Caller, model: str) -> bool:
    return model in await caller.listed() and (await caller.chat(model))[0] == 200


async def _gone(caller: Caller, model: str) -> bool:
    # Ollama itself already answers 404 (which the gateway also turns into 403), so only the
    # listing tells that discovery has dropped the model.
    return model not in await caller.listed() and (await caller.chat(model))[0] == 403


async def test_set_models_from_the_cli_takes_effect_within_one_second(gateway: Gateway) -> None:
    secret, _, tenant = await gateway.key(models=("llama3.1:8b",))
    async with aiohttp.ClientSession() as http:
        caller = Caller(http, gateway, secret)
        assert (await caller.chat("llama3.1:8b"))[0] == 200  # the key and its allowlist are now cached
        assert (await caller.chat("qwen3:8b"))[0] == 403

        for args, model, wanted in (
            (("--models", "llama3.1:8b,qwen3:8b"), "qwen3:8b", 200),
            (("--models", "llama3.1:8b"), "qwen3:8b", 403),
        ):
            cli = asyncio.create_task(run_cli(gateway, "set-models", "--tenant", tenant, *args))
            seen: list[tuple[float, int]] = []

            async def flipped(model: str = model, wanted: int = wanted, seen: list[tuple[float, int]] = seen
                              ) -> bool:
                status = (await caller.chat(model))[0]
                seen.append((time.time(), status))
                return status == wanted

            try:
                await within(20.0, flipped, every_s=0.02)
            finally:
                code, _, err = await cli
                assert code == 0, err
            committed = await last_change_epoch(gateway, "set-models", tenant)
            assert seen[-1][0] - committed < 1.0, (args, seen[-1][0] - committed)
        assert await caller.listed() == ["llama3.1:8b"]


async def test_model_changes_land_within_one_second_under_concurrent_traffic(gateway: Gateway) -> None:
    """Requests racing the cache eviction must not copy the old allowlist back into the process."""
    secret, _, tenant = await gateway.key(models=("llama3.1:8b",))
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http, open_admin(gateway.settings, "e2e") as admin:
        caller = Caller(http, gateway, secret)

        async def traffic() -> None:
            while not stop.is_set():
                await caller.retrieve("qwen3:8b")

        busy = [asyncio.create_task(traffic()) for _ in range(6)]
        try:
            for flip in range(12):
                allow_all = flip % 2 == 0
                await asyncio.sleep(0.03)
                await admin.set_models(tenant, None, allow_all)
                wanted = 200 if allow_all else 404
                await within(1.0, lambda wanted=wanted: _retrieves(caller, "qwen3:8b", wanted), every_s=0.01)
                # ... and it stays that way once the traffic that raced the change has passed.
                await asyncio.sleep(0.05)
                assert (await caller.retrieve("qwen3:8b"))[0] == wanted, flip
        finally:
            stop.set()
            await asyncio.gather(*busy)


async def _retrieves(caller: Caller, model: str, wanted: int) -> bool:
    return (await caller.retrieve(model))[0] == wanted


async def test_cloud_models_resolve_only_when_named(gateway: Gateway) -> None:
    gateway.fake.models.append("glm-4.6:cloud")
    allow_all, _, _ = await gateway.key(allow_all=True)
    named, _, _ = await gateway.key(models=("llama3.1:8b", "gpt-oss:20b-cloud", "glm-4.6:cloud"))
    mixed, _, _ = await gateway.key(models=("glm-4.6:cloud",), allow_all=True)
    async with aiohttp.ClientSession() as http:
        everyone, explicit, both = (Caller(http, gateway, s) for s in (allow_all, named, mixed))
        await within(DISCOVERY_DEADLINE_S, lambda: _has(explicit, "glm-4.6:cloud"))

        assert await everyone.listed() == NON_CLOUD
        for model in ("gpt-oss:20b-cloud", "glm-4.6:cloud"):
            assert (await everyone.chat(model))[0] == 403
            assert (await everyone.native_chat(model))[0] == 403
            assert (await everyone.retrieve(model))[0] == 404

        assert await explicit.listed() == ["glm-4.6:cloud", "gpt-oss:20b-cloud", "llama3.1:8b"]
        for model in ("gpt-oss:20b-cloud", "glm-4.6:cloud"):
            assert (await explicit.chat(model))[0] == 200
        assert await both.listed() == sorted([*NON_CLOUD, "glm-4.6:cloud"])
        assert (await both.chat("gpt-oss:20b-cloud"))[0] == 403
    cloud_calls = [r for r in gateway.fake.requests if (r["json"] or {}).get("model", "").endswith("cloud")]
    assert len(cloud_calls) == 3  # only the explicitly allowed ones ever reached Ollama


async def test_bare_names_mean_latest(gateway: Gateway) -> None:
    allowlisted, _, _ = await gateway.key(models=("llama3.1",))
    everything, _, _ = await gateway.key(allow_all=True)
    async with aiohttp.ClientSession() as http:
        named, everyone = Caller(http, gateway, allowlisted), Caller(http, gateway, everything)
        # Only llama3.1:8b exists: `llama3.1` means llama3.1:latest, which is not there.
        assert (await named.chat("llama3.1"))[0] == 403
        assert (await named.chat("llama3.1:8b"))[0] == 403
        assert (await everyone.chat("llama3.1"))[0] == 403
        assert await named.listed() == []

        gateway.fake.models.append("llama3.1:latest")
        await within(DISCOVERY_DEADLINE_S, lambda: _has(named, "llama3.1:latest"))
        for caller in (named, everyone):
            for model in ("llama3.1", "llama3.1:latest", "LLaMA3.1"):
                assert (await caller.chat(model))[0] == 200, model
            assert (await caller.native_chat("llama3.1"))[0] == 200
            assert (await caller.retrieve("llama3.1"))[0] == 200
        assert (await named.chat("llama3.1:8b"))[0] == 403  # the allowlist named :latest, not :8b
        assert (await everyone.chat("qwen3"))[0] == 403  # qwen3:latest does not exist
    sent = {r["json"]["model"] for r in gateway.fake.requests if r["path"] in ("/v1/chat/completions",
                                                                               "/api/chat")}
    assert sent == {"llama3.1:latest"}  # the gateway asks Ollama for the name Ollama listed


async def test_an_empty_discovery_denies_every_model(gateway: Gateway) -> None:
    allow_all, _, _ = await gateway.key(allow_all=True)
    named, _, _ = await gateway.key(models=("llama3.1:8b", "nomic-embed-text:latest", "gpt-oss:20b-cloud"))
    async with aiohttp.ClientSession() as http:
        callers = [Caller(http, gateway, s) for s in (allow_all, named)]
        for caller in callers:
            assert (await caller.chat("llama3.1:8b"))[0] == 200

        gateway.fake.models.clear()
        await within(DISCOVERY_DEADLINE_S, lambda: _gone(callers[0], "llama3.1:8b"))
        asked = len(gateway.fake.requests)
        denied = await callers[0].chat("no-such-model")
        for caller in callers:
            assert await caller.listed() == []
            for model in ("llama3.1:8b", "qwen3:8b", "gpt-oss:20b-cloud"):
                assert await caller.chat(model) == denied
                assert (await caller.native_chat(model))[0] == 403
            async with http.post(gateway.v1 + "/embeddings", headers=caller.headers,
                                 json={"model": "nomic-embed-text:latest", "input": "x"}) as resp:
                assert resp.status == 403
        # Denied by the gateway itself: nothing but discovery polls reached Ollama meanwhile.
        assert {r["path"] for r in gateway.fake.requests[asked:]} <= {"/api/tags"}

        gateway.fake.models[:] = ["llama3.1:8b"]  # and it recovers on its own
        await within(DISCOVERY_DEADLINE_S, lambda: _has(callers[0], "llama3.1:8b"))


async def test_model_lookup_does_not_tell_unknown_from_forbidden(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=("llama3.1:8b",))
    async with aiohttp.ClientSession() as http:
        caller = Caller(http, gateway, secret)
        status, body = await caller.retrieve("llama3.1:8b")
        assert status == 200 and b'"id":"llama3.1:8b"' in body
        forbidden, unknown = await caller.retrieve("qwen3:8b"), await caller.retrieve("no-such:1b")
        assert forbidden == unknown
        assert forbidden[0] == 404 and b'"error"' in forbidden[1] and b"qwen3" not in forbidden[1]


async def test_health_and_readiness(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(gateway.url + "/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200, body
        deps = {k: v for k, v in body.items() if k != "status"}
        assert {"postgres", "redis", "ollama"} <= set(deps)
        assert set(deps.values()) == {"ok"}

        gateway.fake.fail_mode = "refuse"  # Ollama is gone
        try:
            async with http.get(gateway.url + "/readyz") as resp:
                body = await resp.json()
                assert resp.status == 503
                assert body["ollama"] != "ok" and body["postgres"] == "ok" and body["redis"] == "ok"
            async with http.get(gateway.url + "/healthz") as resp:
                assert resp.status == 200  # the process itself is fine
        finally:
            gateway.fake.fail_mode = None
        async with http.get(gateway.url + "/readyz") as resp:
            assert resp.status == 200
