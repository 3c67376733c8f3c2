"""Several Ollama backends end to end (SPEC §4.10): two fake Ollamas, model A only on the first, B
only on the second, C on both; a gateway on real PostgreSQL and Redis in front of them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest_asyncio

from adapters.prometheus import GatewayMetrics
from entrypoints.app import METRICS
from tests.e2e.conftest_faults import wait_for_ledger
from tests.e2e.harness import Gateway, gateway_settings, running_gateway
from tests.fake_ollama import MEMORY_ERROR, FakeOllama

A, B, C = "llama3.1:8b", "qwen3:8b", "mistral:7b"
THRESHOLD = 3
RESET_S = 30.0
DISCOVERY_TTL_S = 3.0


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def usage(self) -> tuple[int, int]:
        return int(self.body["prompt_eval_count"]), int(self.body["eval_count"])


@attrs.define
class Pair:
    gw: Gateway
    first: FakeOllama
    second: FakeOllama

    def served(self, fake: FakeOllama, model: str) -> int:
        """Chat requests for *model* that reached *fake*."""
        return sum(1 for r in fake.requests
                   if r["path"] == "/api/chat" and (r["json"] or {}).get("model") == model)


async def chat(http: aiohttp.ClientSession, gw: Gateway, secret: str, model: str, text: str = "hello"
               ) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": False}
    async with http.post(gw.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {secret}"}
                         ) as resp:
        return Reply(resp.status, dict(resp.headers), await resp.json(content_type=None))


async def stream(http: aiohttp.ClientSession, gw: Gateway, secret: str, model: str) -> Reply:
    """A streamed /api/chat read to the end; its body is the final (done) line."""
    body = {"model": model, "messages": [{"role": "user", "content": "tell me more"}], "stream": True}
    async with http.post(gw.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {secret}"}
                         ) as resp:
        lines = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
        return Reply(resp.status, dict(resp.headers), lines[-1])


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def pair(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    async with FakeOllama(models=[A, C]) as first, FakeOllama(models=[B, C]) as second:
        settings = gateway_settings(database_url, redis_url, f"{first.url},{second.url}", tmp_path,
                                    circuit_failure_threshold=THRESHOLD, circuit_reset_s=RESET_S,
                                    model_discovery_cache_ttl_s=DISCOVERY_TTL_S)
        async with running_gateway(settings, first) as gw:
            yield Pair(gw, first, second)


class TestRouting:
    async def test_each_model_goes_only_to_a_backend_that_has_it_and_is_charged_once(self, pair: Pair
                                                                                       ) -> None:
        secret, prefix, _ = await pair.gw.key(models=(A, B, C))
        async with aiohttp.ClientSession() as http:
            replies = [await chat(http, pair.gw, secret, model, f"question {i}")
                       for i in range(4) for model in (A, B, C)]
        assert [r.status for r in replies] == [200] * 12, [r.body for r in replies if r.status != 200]
        assert (pair.served(pair.first, A), pair.served(pair.second, A)) == (4, 0)
        assert (pair.served(pair.first, B), pair.served(pair.second, B)) == (0, 4)
        # Idle backends tie, so C alternates between them.
        assert (pair.served(pair.first, C), pair.served(pair.second, C)) == (2, 2)
        used_in, used_out = map(sum, zip(*(r.usage for r in replies), strict=True))
        assert await wait_for_ledger(pair.gw.settings.database_url, prefix, (12, used_in, used_out)) == \
            (12, used_in, used_out)

    async def test_new_requests_go_to_the_backend_with_fewer_requests_in_flight(self, pair: Pair) -> None:
        secret, _, _ = await pair.gw.key(models=(A, B, C))
        async with aiohttp.ClientSession() as http:
            pair.first.token_delay_s = 0.25  # 12 tokens: each stream holds the first backend ~3 s
            held = [asyncio.create_task(stream(http, pair.gw, secret, A)) for _ in range(2)]
            await until(lambda: pair.served(pair.first, A) == 2)
            quick = [await chat(http, pair.gw, secret, C) for _ in range(4)]
            assert [r.status for r in quick] == [200] * 4
            assert (pair.served(pair.first, C), pair.served(pair.second, C)) == (0, 4)
            assert [(await t).status for t in held] == [200, 200]

            # Two slow streams of C at once: the second one goes where the first one is not.
            pair.second.token_delay_s = 0.25
            one = asyncio.create_task(stream(http, pair.gw, secret, C))
            await until(lambda: pair.served(pair.first, C) + pair.served(pair.second, C) == 5)
            other = asyncio.create_task(stream(http, pair.gw, secret, C))
            await until(lambda: pair.served(pair.first, C) + pair.served(pair.second, C) == 6)
            assert (pair.served(pair.first, C), pair.served(pair.second, C)) == (1, 5)
            finals = [await one, await other]
        assert [r.status for r in finals] == [200, 200]
        assert all(r.body["done"] and r.body["eval_count"] == 12 for r in finals), finals


class TestAFailedBackend:
    async def test_the_other_backend_answers_without_an_error_and_readyz_names_the_failed_one(
        self, pair: Pair
    ) -> None:
        secret, prefix, _ = await pair.gw.key(models=(A, B, C))
        metrics: GatewayMetrics = pair.gw.app[METRICS]
        async with aiohttp.ClientSession() as http:
            warm = [await chat(http, pair.gw, secret, C) for _ in range(2)]  # a pooled connection to each
            pair.first.fail_mode = "refuse"
            await asyncio.sleep(0.2)
            replies = [await chat(http, pair.gw, secret, C, f"after {i}") for i in range(8)]
            assert [r.status for r in replies] == [200] * 8, [r.body for r in replies if r.status != 200]
            assert pair.served(pair.second, C) == 1 + 8  # each sent there once, none twice
            # Refused THRESHOLD times, then the open circuit keeps requests away from it.
            failed = metrics.upstream_requests.get({"backend": "0", "outcome": "backend_failed"})
            assert failed == THRESHOLD
            assert metrics.upstream_requests.get({"backend": "1", "outcome": "ok"}) >= 8

            only_first = await chat(http, pair.gw, secret, A)
            assert only_first.status == 502 and only_first.body["error"]["code"] == "upstream_unavailable"
            assert RESET_S - 5 <= int(only_first.headers["Retry-After"]) <= RESET_S
            other_model = await chat(http, pair.gw, secret, B)
            assert other_model.status == 200

            async with http.get(pair.gw.url + "/readyz") as resp:
                ready = await resp.json()
                assert resp.status == 200, ready
            assert (ready["ollama"], ready["ollama_0"], ready["ollama_1"]) == ("ok", "down", "ok"), ready
            assert pair.first.url not in json.dumps(ready) and pair.second.url not in json.dumps(ready)
            async with http.get(pair.gw.url + "/api/version",
                                headers={"Authorization": f"Bearer {secret}"}) as resp:
                assert resp.status == 200  # from the backend that answers

            # Once the first backend's discovery runs out (its own TTL), A is no longer a model at all.
            deadline = time.monotonic() + DISCOVERY_TTL_S + 5
            while (late := await chat(http, pair.gw, secret, A)).status == 502:
                assert time.monotonic() < deadline, "A still discovered after its only backend's TTL"
                await asyncio.sleep(0.2)
            assert (late.status, late.body["error"]["code"]) == (403, "model_not_allowed")
            still = await chat(http, pair.gw, secret, C)
            assert still.status == 200  # C is still discovered: the second backend has it
        # Every answered request is charged once; refused attempts and 502s are not charged.
        answered = [*warm, *replies, other_model, still]
        used_in, used_out = map(sum, zip(*(r.usage for r in answered), strict=True))
        expected = (len(answered), used_in, used_out)
        assert await wait_for_ledger(pair.gw.settings.database_url, prefix, expected) == expected


@pytest_asyncio.fixture
async def single(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with FakeOllama(models=[A, B]) as fake:
        settings = gateway_settings(database_url, redis_url, fake.url, tmp_path,
                                    circuit_failure_threshold=THRESHOLD, circuit_reset_s=RESET_S)
        async with running_gateway(settings, fake) as gw:
            yield gw


class TestOneFailingModel:
    async def test_a_model_that_cannot_load_opens_its_own_circuit_and_others_keep_answering(
        self, single: Gateway
    ) -> None:
        fake = single.fake
        failing, _, _ = await single.key(models=(A,))
        healthy, _, _ = await single.key(models=(B,))
        fake.fail_models = {A}
        async with aiohttp.ClientSession() as http:
            for _ in range(THRESHOLD):
                reply = await chat(http, single, failing, A)
                assert (reply.status, reply.body["error"]["code"]) == (502, "upstream_unavailable")
                assert MEMORY_ERROR not in json.dumps(reply.body)  # Ollama's text stays inside
                assert (await chat(http, single, healthy, B)).status == 200
            tried = sum(1 for r in fake.requests if (r["json"] or {}).get("model") == A)
            assert tried == THRESHOLD

            started = time.monotonic()
            fast = await chat(http, single, failing, A)
            assert fast.status == 502 and time.monotonic() - started < 1.0
            assert RESET_S - 5 <= int(fast.headers["Retry-After"]) <= RESET_S
            assert sum(1 for r in fake.requests if (r["json"] or {}).get("model") == A) == tried

            for _ in range(THRESHOLD + 2):  # the backend's own circuit never opened
                assert (await chat(http, single, healthy, B)).status == 200
            async with http.get(single.url + "/readyz") as resp:
                assert resp.status == 200
