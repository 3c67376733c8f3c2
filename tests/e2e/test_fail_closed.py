"""Fail-closed end to end (SPEC §4.8, §8.3, §8.4, §8.5): with Redis or PostgreSQL down every caller
route answers 503 and the same gateway recovers on its own; a failing Ollama trips the circuit, which
lets exactly one probe through after the reset; the audit log and the ledger lose nothing across a
database outage or a SIGTERM. Servers stopped here are private ones (free ports), never the shared."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import psycopg
import pytest
import pytest_asyncio
from multidict import CIMultiDict
from structlog.testing import capture_logs

from adapters.postgres.listener import APPLICATION_NAME
from adapters.redis.health import MISSES_TO_DOWN, PING_EVERY_S
from gateway_core.limits import Limits
from gateway_core.models import Scope
from tests.e2e.conftest_faults import (
    GatewayProcess,
    PrivateStack,
    new_key,
    private_stack,
    wait_for_audit,
    wait_for_ledger,
)
from tests.e2e.harness import Gateway, gateway_settings, running_gateway
from tests.fake_ollama import FakeOllama

CHAT = "/v1/chat/completions"
DEPENDENCIES = ("redis", "postgres", "change_feed")
RECOVERY_S = 5.0
HEARTBEAT_DOWN_S = PING_EVERY_S * (MISSES_TO_DOWN + 1) + 0.5
# Longer than psycopg_pool's first four reconnect back-offs together (1+2+4+8 s ± jitter): a pool left
# to back off on its own would next try at ~31 s and keep callers on 503 well past RECOVERY_S.
LONG_OUTAGE_S = 17.0
# What the gateway itself asks Ollama for (discovery, readiness); everything else is caller traffic.
NOT_INFERENCE = frozenset({"/api/tags", "/api/version"})
_HI = [{"role": "user", "content": "hi"}]
# Routes that admit a request (and so reach Redis on every call) and routes that only list or look up.
INFERENCE_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", CHAT, {"model": "llama3.1:8b", "messages": _HI}),
    ("POST", "/v1/completions", {"model": "llama3.1:8b", "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": "hi"}),
    ("POST", "/api/chat", {"model": "llama3.1:8b", "stream": False, "messages": _HI}),
    ("POST", "/api/generate", {"model": "llama3.1:8b", "stream": False, "prompt": "hi"}),
    ("POST", "/api/embed", {"model": "nomic-embed-text", "input": "hi"}),
]
LISTING_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/llama3.1:8b", None),
    ("GET", "/api/tags", None),
    ("GET", "/api/version", None),
]
CALLER_ROUTES = INFERENCE_ROUTES + LISTING_ROUTES


@attrs.frozen
class Reply:
    status: int
    headers: CIMultiDict[str]
    body: Any
    request_id: str

    @property
    def code(self) -> str | None:
        return self.body.get("error", {}).get("code") if isinstance(self.body, dict) else None


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "llama3.1:8b", "messages": [{"role": "user", "content": content}], **extra}


def new_request_id() -> str:
    return f"fc-{uuid.uuid4().hex}"


async def send(http: aiohttp.ClientSession, base: str, secret: str | None, path: str = CHAT,
               body: dict[str, Any] | None = None, method: str = "POST") -> Reply:
    rid = new_request_id()
    headers = {"X-Request-Id": rid}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    payload = (body or chat()) if method == "POST" else None
    async with http.request(method, base + path, json=payload, headers=headers) as resp:
        raw = await resp.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        return Reply(resp.status, CIMultiDict(resp.headers), parsed, rid)


async def readyz(http: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, Any]]:
    async with http.get(base + "/readyz") as resp:
        return resp.status, await resp.json()


async def until_status(http: aiohttp.ClientSession, base: str, secret: str, want: int, timeout_s: float,
                       route: tuple[str, str, dict[str, Any] | None] = ("POST", CHAT, None)) -> list[Reply]:
    """Ask every 50 ms until the answer is *want*; all replies, the last one being it."""
    replies: list[Reply] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        method, path, body = route
        replies.append(await send(http, base, secret, path, body, method))
        if replies[-1].status == want:
            return replies
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {want} within {timeout_s}s; last answers "
                         f"{[(r.status, r.code) for r in replies[-5:]]}")


def inference_requests(fake: FakeOllama) -> int:
    return sum(1 for r in fake.requests if r["path"] not in NOT_INFERENCE)


def usage_of(reply: Reply) -> tuple[int, int]:
    """(prompt, completion) tokens the caller was told, OpenAI-shaped or Ollama-native."""
    if "usage" in reply.body:
        usage = reply.body["usage"]
        return int(usage["prompt_tokens"]), int(usage.get("completion_tokens", 0))
    return int(reply.body["prompt_eval_count"]), int(reply.body.get("eval_count", 0))


def retry_after(reply: Reply) -> int:
    assert "Retry-After" in reply.headers and "retry-after-ms" in reply.headers, dict(reply.headers)
    return int(reply.headers["Retry-After"])


def revoke_now(database_url: str, prefix: str) -> int:
    """The console's INSERT, done while the caller's event loop (and so the in-process gateway) is
    blocked: the change listener cannot have reconnected yet. Returns how many listeners were up."""
    with psycopg.connect(database_url, connect_timeout=3) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (APPLICATION_NAME,)).fetchone()
        conn.execute("INSERT INTO gateway.revocations (key_prefix, source) VALUES (%s, 'console')", (prefix,))
    assert row is not None
    return int(row[0])


class Stream:
    """A streaming /api/chat whose response is open: it was admitted and is being relayed."""

    def __init__(self, http: aiohttp.ClientSession, base: str, secret: str) -> None:
        self._http, self._base, self._secret = http, base, secret
        self.request_id = new_request_id()
        self._resp: aiohttp.ClientResponse | None = None

    async def open(self) -> None:
        self._resp = await self._http.post(
            self._base + "/api/chat", json=chat(stream=True),
            headers={"Authorization": f"Bearer {self._secret}", "X-Request-Id": self.request_id})
        assert self._resp.status == 200
        assert await self._resp.content.readline()

    async def finish(self) -> tuple[int, int]:
        """(prompt, completion) tokens from the final NDJSON line."""
        assert self._resp is not None
        lines = [line for line in (await self._resp.read()).splitlines() if line.strip()]
        self._resp.release()
        last = json.loads(lines[-1])
        assert last.get("done") is True, last
        return int(last["prompt_eval_count"]), int(last["eval_count"])


@pytest.fixture(autouse=True)
def refusals_name_their_dependency() -> Iterator[list[dict[str, Any]]]:
    """Every 503 the in-process gateway gives in these tests has a log event naming the dependency
    that refused (SPEC §8.5: "redis:ConnectionError", "change_feed:…"). The subprocess gateways'
    logs are checked by the tests that start them (`refusals_without_a_dependency`)."""
    with capture_logs() as events:
        yield events
    refused = [e for e in events if e.get("event") == "request" and e.get("status") == 503]
    unnamed = [e for e in refused if not str(e.get("dependency") or "").startswith(DEPENDENCIES)]
    assert not unnamed, f"{len(unnamed)} of {len(refused)} 503s name no dependency: {unnamed[:3]}"


def refusals_without_a_dependency(log: Path, replies: list[Reply]) -> list[tuple[str, list[Any]]]:
    """The 503 *replies* whose request has no log event (JSON lines in *log*) naming a dependency."""
    named: dict[str, list[Any]] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "request" and event.get("status") == 503:
            named.setdefault(str(event.get("request_id")), []).append(event.get("dependency"))
    return [(r.request_id, named.get(r.request_id, [])) for r in replies if r.status == 503
            and not any(str(d or "").startswith(DEPENDENCIES) for d in named.get(r.request_id, []))]


@pytest.fixture(scope="module")
def module_stack() -> Iterator[PrivateStack]:
    with private_stack() as stack:
        yield stack


@pytest.fixture
def stack(module_stack: PrivateStack) -> PrivateStack:
    module_stack.ensure_up()
    return module_stack


@pytest_asyncio.fixture
async def gw(stack: PrivateStack, fake: FakeOllama, tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = gateway_settings(stack.database_url, stack.redis_url, fake.url, tmp_path / "spool")
    async with running_gateway(settings, fake) as gateway:
        yield gateway


async def redis_outage(stack: PrivateStack, gw: Gateway, routes: list[tuple[str, str, dict[str, Any] | None]]
                       ) -> None:
    """Every route answers 503 while Redis is down, for a key cached in process and for a new one;
    after Redis comes back empty the same gateway serves both again within RECOVERY_S."""
    cached, _, tenant = await new_key(gw.settings)
    unseen, _, _ = await new_key(gw.settings, tenant=tenant)
    async with aiohttp.ClientSession() as http:
        for method, path, body in routes:  # the key is now cached in process and in Redis
            reply = await send(http, gw.url, cached, path, body, method)
            assert reply.status == 200, (path, reply)
        forwarded = len(gw.fake.requests)
        await asyncio.to_thread(stack.stop_redis)
        try:
            # Listings make no Redis call of their own: the heartbeat refuses them once it has missed
            # several PINGs in a row (hysteresis, so one slow PING refuses no one).
            await asyncio.sleep(HEARTBEAT_DOWN_S)
            answers = {(secret == cached, path): await send(http, gw.url, secret, path, body, method)
                       for secret in (cached, unseen) for method, path, body in routes}
            wrong = {k: (r.status, r.code) for k, r in answers.items()
                     if (r.status, r.code) != (503, "dependency_unavailable")}
            assert not wrong, f"(key cached?, route) not refused with Redis down: {wrong}"
            upstream = [r["path"] for r in gw.fake.requests[forwarded:] if r["path"] != "/api/tags"]
            assert not upstream, f"forwarded unchecked: {upstream}"
            status, ready = await readyz(http, gw.url)
            assert status == 503 and ready["redis"] == "down" and ready["postgres"] == "ok", ready
        finally:
            await asyncio.to_thread(stack.start_redis)
        restarted = time.monotonic()
        await until_status(http, gw.url, cached, 200, RECOVERY_S, routes[0])
        print(f"\nserving again {time.monotonic() - restarted:.2f}s after Redis came back (empty)")
        for method, path, body in routes:
            for secret in (cached, unseen):
                reply = await send(http, gw.url, secret, path, body, method)
                assert reply.status == 200, (path, reply)
        assert (await readyz(http, gw.url))[0] == 200


class TestDatabasesDown:
    async def test_redis_down_is_503_on_inference_routes_and_the_same_gateway_recovers(
        self, stack: PrivateStack, gw: Gateway
    ) -> None:
        await redis_outage(stack, gw, INFERENCE_ROUTES)

    async def test_redis_down_is_503_on_listing_routes_too_even_for_a_key_cached_in_process(
        self, stack: PrivateStack, gw: Gateway
    ) -> None:
        await redis_outage(stack, gw, LISTING_ROUTES)

    async def test_postgres_down_is_503_and_after_a_long_outage_it_serves_again_except_keys_revoked_meanwhile(
        self, stack: PrivateStack, gw: Gateway
    ) -> None:
        kept, _, tenant = await new_key(gw.settings)
        doomed, doomed_prefix, _ = await new_key(gw.settings, tenant=tenant)
        async with aiohttp.ClientSession() as http:
            for secret in (kept, doomed):
                assert (await send(http, gw.url, secret)).status == 200  # cached in process and in Redis
            await asyncio.to_thread(stack.stop_pg)
            try:
                stopped = time.monotonic()
                during: list[Reply] = []
                while time.monotonic() - stopped < LONG_OUTAGE_S:
                    for method, path, body in CALLER_ROUTES:
                        for secret in (kept, doomed):
                            during.append(await send(http, gw.url, secret, path, body, method))
                    await asyncio.sleep(0.5)
                assert {(r.status, r.code) for r in during} == {(503, "dependency_unavailable")}, \
                    [(r.status, r.code) for r in during]
                status, ready = await readyz(http, gw.url)
                assert status == 503 and ready["postgres"] == "down" and ready["redis"] == "ok", ready
            finally:
                stack.start_pg()  # blocking on purpose: the gateway's loop cannot reconnect meanwhile
            restarted = time.monotonic()
            # Revoked by the console before the gateway's listener is back: only its replay can tell.
            assert revoke_now(stack.database_url, doomed_prefix) == 0
            await until_status(http, gw.url, kept, 200, RECOVERY_S)
            print(f"\nserving again {time.monotonic() - restarted:.2f}s after PostgreSQL came back")
            replies = await until_status(http, gw.url, doomed, 401, 2.0)
            assert {r.status for r in replies} <= {401, 503}, [r.status for r in replies]
            for _ in range(3):
                assert (await send(http, gw.url, doomed)).status == 401
                assert (await send(http, gw.url, kept)).status == 200
            assert (await readyz(http, gw.url))[0] == 200


class TestCircuitBreaker:
    @pytest.fixture
    def threshold(self) -> int:
        return 3

    @pytest_asyncio.fixture
    async def breaker_gw(self, stack: PrivateStack, fake: FakeOllama, tmp_path: Path,
                         threshold: int) -> AsyncIterator[Gateway]:
        settings = gateway_settings(stack.database_url, stack.redis_url, fake.url, tmp_path / "spool",
                                    circuit_failure_threshold=threshold, circuit_reset_s=2.0)
        async with running_gateway(settings, fake) as gateway:
            yield gateway

    async def test_a_failing_upstream_opens_the_circuit_and_one_probe_decides(
        self, breaker_gw: Gateway, threshold: int
    ) -> None:
        gw, fake = breaker_gw, breaker_gw.fake
        secret, _, _ = await new_key(gw.settings)
        async with aiohttp.ClientSession() as http:
            assert (await send(http, gw.url, secret)).status == 200
            fake.fail_mode = "500"
            seen = inference_requests(fake)
            for _ in range(threshold):
                reply = await send(http, gw.url, secret)
                assert (reply.status, reply.code) == (502, "upstream_unavailable"), reply
                assert retry_after(reply) >= 1
                assert "runner" not in json.dumps(reply.body)  # Ollama's own text stays inside
            opened = time.monotonic()
            assert inference_requests(fake) == seen + threshold

            # Open: fail fast, Ollama sees nothing, Retry-After counts down to the half-open moment.
            reply = await send(http, gw.url, secret)
            assert (reply.status, reply.code, retry_after(reply)) == (502, "upstream_unavailable", 2)
            await asyncio.sleep(opened + 1.2 - time.monotonic())
            for path in (CHAT, "/api/chat"):
                reply = await send(http, gw.url, secret, path, chat(stream=False))
                assert (reply.status, retry_after(reply)) == (502, 1), (path, reply)
            # The 500s were about this model: its own circuit is open, the backend's is not (SPEC §4.10).
            assert (await send(http, gw.url, secret, "/api/version", None, "GET")).status == 200
            assert inference_requests(fake) == seen + threshold, "a request reached Ollama while open"

            # Half-open, Ollama still failing: one probe among a burst, it fails, the circuit reopens.
            await asyncio.sleep(opened + 2.1 - time.monotonic())
            burst = await asyncio.gather(*(send(http, gw.url, secret) for _ in range(5)))
            assert [r.status for r in burst] == [502] * 5
            assert inference_requests(fake) == seen + threshold + 1, "not exactly one probe"
            reopened = time.monotonic()
            fake.fail_mode = None  # Ollama is healthy again, but the circuit does not know yet
            reply = await send(http, gw.url, secret)
            assert (reply.status, reply.code) == (502, "upstream_unavailable")
            assert 1 <= retry_after(reply) <= 2
            assert inference_requests(fake) == seen + threshold + 1

            # Half-open again: one probe among a burst (held 0.3 s upstream), it succeeds and closes.
            await asyncio.sleep(reopened + 2.1 - time.monotonic())
            fake.latency_s = 0.3
            burst = await asyncio.gather(*(send(http, gw.url, secret) for _ in range(5)))
            fake.latency_s = 0.0
            assert sorted(r.status for r in burst) == [200] + [502] * 4, [r.status for r in burst]
            assert inference_requests(fake) == seen + threshold + 2, "not exactly one probe"
            for _ in range(threshold + 1):
                assert (await send(http, gw.url, secret)).status == 200
            assert inference_requests(fake) == seen + threshold + 2 + threshold + 1

    async def test_a_refusing_upstream_is_502_with_retry_after_and_trips_the_circuit(
        self, breaker_gw: Gateway, threshold: int
    ) -> None:
        gw, fake = breaker_gw, breaker_gw.fake
        secret, _, _ = await new_key(gw.settings)
        async with aiohttp.ClientSession() as http:
            assert (await send(http, gw.url, secret)).status == 200
            fake.fail_mode = "refuse"
            refused = [await send(http, gw.url, secret) for _ in range(threshold)]
            assert [(r.status, r.code) for r in refused] == [(502, "upstream_unavailable")] * threshold
            opened = time.monotonic()
            fake.fail_mode = None  # listening again: only the open circuit keeps requests away
            seen = inference_requests(fake)
            reply = await send(http, gw.url, secret)
            assert (reply.status, reply.code, retry_after(reply)) == (502, "upstream_unavailable", 2)
            assert inference_requests(fake) == seen
            await asyncio.sleep(opened + 2.1 - time.monotonic())
            for _ in range(3):
                assert (await send(http, gw.url, secret)).status == 200
            assert inference_requests(fake) == seen + 3
        # Every 502 carries Retry-After (SPEC §3.4), also when the connection itself was refused.
        assert all(retry_after(r) >= 1 for r in refused), [dict(r.headers) for r in refused]


class TestAuditAndLedger:
    async def test_every_caller_request_has_exactly_one_audit_row_denials_included(
        self, stack: PrivateStack, gw: Gateway
    ) -> None:
        secret, prefix, tenant = await new_key(gw.settings, key_limits=Limits(rpm=4))
        embed_only, embed_prefix, _ = await new_key(gw.settings, tenant=tenant,
                                                    scopes=frozenset({Scope.EMBEDDINGS}))
        unknown = "nz_" + "A" * 43
        embed = {"model": "nomic-embed-text", "input": "hello there"}
        plan: list[tuple[str | None, str, dict[str, Any], int, str | None, str | None]] = [
            # (key, path, body, status, audited prefix, audited model)
            *[(secret, CHAT, chat(f"hello {i}"), 200, prefix, "llama3.1:8b") for i in range(4)],
            (secret, CHAT, chat(), 429, prefix, "llama3.1:8b"),  # rpm 4 used up
            (secret, "/api/chat", chat(stream=False), 429, prefix, "llama3.1:8b"),
            (unknown, CHAT, chat(), 401, None, None),
            (None, "/v1/embeddings", embed, 401, None, None),
            # Refused before a model resolved: the audit holds the name as asked (SPEC §5).
            (embed_only, CHAT, chat(), 403, embed_prefix, "llama3.1:8b"),  # scope
            (embed_only, "/v1/embeddings", {**embed, "model": "qwen3:8b"}, 403, embed_prefix, "qwen3:8b"),
            (embed_only, "/v1/embeddings", embed, 200, embed_prefix, "nomic-embed-text:latest"),
        ]
        async with aiohttp.ClientSession() as http:
            replies = [await send(http, gw.url, key, path, body) for key, path, body, *_ in plan]
        assert [r.status for r in replies] == [p[3] for p in plan], [(r.status, r.code) for r in replies]
        rows = await wait_for_audit(stack.database_url, [r.request_id for r in replies])
        assert sum(len(v) for v in rows.values()) == len(plan), "more rows than requests"
        for (key, path, _, status, audited_prefix, model), reply in zip(plan, replies, strict=True):
            (row,) = rows[reply.request_id]
            tokens = usage_of(reply) if status == 200 else (0, 0)
            if key is not None and audited_prefix is None:  # a refused key may be logged by its prefix
                assert row["key_prefix"] in (None, key[:12]), row
            else:
                assert row["key_prefix"] == audited_prefix, row
            assert (row["status"], row["model"], row["tokens_in"], row["tokens_out"]) == \
                (status, model, *tokens), (path, row)
            assert row["latency_ms"] > 0 and row["client_ip"] == "127.0.0.1", row

    async def test_audit_and_ledger_lose_nothing_across_a_ten_second_postgres_outage(
        self, stack: PrivateStack, gw: Gateway
    ) -> None:
        secret, prefix, _ = await new_key(gw.settings)
        replies: list[Reply] = []
        told = [0, 0, 0]  # requests, prompt tokens, completion tokens the caller was told about

        def charge(prompt: int, completion: int) -> None:
            told[0], told[1], told[2] = told[0] + 1, told[1] + prompt, told[2] + completion

        async with aiohttp.ClientSession() as http:
            for i in range(3):
                replies.append(await send(http, gw.url, secret, CHAT, chat(f"before {i}")))
            gw.fake.token_delay_s = 0.15  # 12 tokens: each stream still runs ~1.8 s into the outage
            streams = [Stream(http, gw.url, secret) for _ in range(2)]
            for stream in streams:
                await stream.open()
            await asyncio.to_thread(stack.stop_pg)
            try:
                stopped = time.monotonic()
                for stream in streams:
                    charge(*await stream.finish())  # settled while PostgreSQL is down
                gw.fake.token_delay_s = 0.0
                outage: list[Reply] = []
                while time.monotonic() - stopped < 10.0:
                    outage.append(await send(http, gw.url, secret))
                    await asyncio.sleep(0.4)
                assert {(r.status, r.code) for r in outage} == {(503, "dependency_unavailable")}
                replies += outage
            finally:
                await asyncio.to_thread(stack.start_pg)
            replies += await until_status(http, gw.url, secret, 200, RECOVERY_S)
            for i in range(3):
                replies.append(await send(http, gw.url, secret, CHAT, chat(f"after {i}")))
        for reply in replies:
            if reply.status == 200:
                charge(*usage_of(reply))
        assert sum(r.status == 200 for r in replies) >= 7
        wanted = {r.request_id: r.status for r in replies} | {s.request_id: 200 for s in streams}
        rows = await wait_for_audit(stack.database_url, list(wanted), timeout_s=20)
        assert {rid: [row["status"] for row in got] for rid, got in rows.items()} == \
            {rid: [status] for rid, status in wanted.items()}
        assert await wait_for_ledger(stack.database_url, prefix, (told[0], told[1], told[2])) == tuple(told)


class TestShutdown:
    async def test_sigterm_under_load_leaves_an_audit_row_and_a_ledger_entry_for_every_answer(
        self, stack: PrivateStack, fake: FakeOllama, tmp_path: Path
    ) -> None:
        settings = gateway_settings(stack.database_url, stack.redis_url, fake.url, tmp_path / "spool")
        secret, prefix, _ = await new_key(settings)
        fake.token_delay_s = 0.02  # ~0.25 s per request: plenty in flight when the signal lands
        gateway = GatewayProcess(stack, fake.url, tmp_path / "spool", tmp_path / "gateway.log")
        answered: list[Reply] = []
        signalled = asyncio.Event()
        after_signal: list[Reply] = []
        try:
            await gateway.start()

            async def caller(n: int) -> None:
                async with aiohttp.ClientSession() as http:
                    while True:
                        path = CHAT if n % 2 else "/api/chat"
                        try:
                            reply = await send(http, gateway.url, secret, path, chat(stream=False))
                        except aiohttp.ClientError:
                            if signalled.is_set():
                                return
                            raise
                        answered.append(reply)
                        if signalled.is_set():
                            after_signal.append(reply)

            callers = [asyncio.create_task(caller(n)) for n in range(16)]
            await asyncio.sleep(1.0)
            gateway.sigterm()
            signalled.set()
            code = await gateway.wait(40)
            await asyncio.wait_for(asyncio.gather(*callers), 10)
        finally:
            gateway.kill()
        assert code == 0, gateway.tail()
        print(f"\n{len(answered)} answers, {len(after_signal)} of them after SIGTERM")
        assert {r.status for r in answered} == {200}, {(r.status, r.code) for r in answered}
        assert len(answered) >= 16 and after_signal, (len(answered), len(after_signal))
        # The process is gone: what it did not write by now it never will (nothing was spooled).
        rows = await wait_for_audit(stack.database_url, [r.request_id for r in answered], timeout_s=0)
        assert all(len(got) == 1 for got in rows.values())
        assert not list((tmp_path / "spool").glob("*.spool"))
        told = (len(answered), sum(usage_of(r)[0] for r in answered), sum(usage_of(r)[1] for r in answered))
        assert await wait_for_ledger(stack.database_url, prefix, told, timeout_s=0) == told

    async def test_what_sigterm_could_not_write_is_spooled_and_replayed_at_the_next_start(
        self, stack: PrivateStack, fake: FakeOllama, tmp_path: Path
    ) -> None:
        spool = tmp_path / "spool"
        settings = gateway_settings(stack.database_url, stack.redis_url, fake.url, spool)
        secret, prefix, _ = await new_key(settings)
        first = GatewayProcess(stack, fake.url, spool, tmp_path / "first.log")
        second = GatewayProcess(stack, fake.url, spool, tmp_path / "second.log")
        try:
            await first.start()
            async with aiohttp.ClientSession() as http:
                before = [await send(http, first.url, secret) for _ in range(2)]
                fake.token_delay_s = 0.1
                stream = Stream(http, first.url, secret)
                await stream.open()
                await asyncio.to_thread(stack.stop_pg)
                streamed = await stream.finish()  # settled with PostgreSQL down
                fake.token_delay_s = 0.0
                outage = [await send(http, first.url, secret) for _ in range(3)]
            assert [r.status for r in before] == [200, 200]
            assert {(r.status, r.code) for r in outage} == {(503, "dependency_unavailable")}
            first.sigterm()
            signalled = time.monotonic()
            assert await first.wait(40) == 0, first.tail()
            exit_s = time.monotonic() - signalled
            print(f"\nexited {exit_s:.2f}s after SIGTERM with PostgreSQL down")
            # Well inside `docker stop`'s 10 s: its SIGKILL would lose whatever was not spooled yet.
            assert exit_s < 8.0

            assert not refusals_without_a_dependency(first.log, outage)
            spooled_ids = {json.loads(line)[1] for line in (spool / "audit.spool").read_text().splitlines()}
            assert {stream.request_id, *(r.request_id for r in outage)} <= spooled_ids
            assert (spool / "ledger.spool").exists()

            await asyncio.to_thread(stack.start_pg)
            await second.start()  # replays the spool before anything else
            wanted = {r.request_id: r.status for r in [*before, *outage]} | {stream.request_id: 200}
            rows = await wait_for_audit(stack.database_url, list(wanted))
            assert {rid: [row["status"] for row in got] for rid, got in rows.items()} == \
                {rid: [status] for rid, status in wanted.items()}
            told = (3, sum(usage_of(r)[0] for r in before) + streamed[0],
                    sum(usage_of(r)[1] for r in before) + streamed[1])
            assert await wait_for_ledger(stack.database_url, prefix, told) == told
            deadline = time.monotonic() + 5
            while (left := [*spool.glob("*.spool"), *spool.glob("*.replaying")]) and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not left, left
            second.sigterm()
            assert await second.wait(20) == 0, second.tail()
        finally:
            first.kill()
            second.kill()
