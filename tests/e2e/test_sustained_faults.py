"""Sustained load through an operator's bad day (SPEC §6.2, §6.3, §8.3, §8.5): eight callers keep
sending to a real `serve` process while its Redis stops, then its PostgreSQL, then Ollama fails.

Whatever happens, a caller sees an answer (200, 429, 502 or 503), never a broken connection; the
gateway serves again within a few seconds of each fault ending; every response has exactly one audit
row; the ledger holds exactly the tokens of the 200 responses (what the callers were told), nothing
for a refusal; and every 503 has a log event naming the dependency that refused. Servers stopped here
are private ones (free ports), never the shared."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from tests.e2e.conftest_faults import (
    GatewayProcess,
    PrivateStack,
    audit_rows,
    ledger_total,
    new_key,
    private_stack,
)
from tests.e2e.harness import gateway_settings
from tests.fake_ollama import FakeOllama

CALLERS = 8
MAX_REQUESTS_PER_CALLER = 5000  # bounds the run (and the audit check) on a fast machine
RECOVERY_S = 5.0  # a 200 again within this long after a fault ends
DEPENDENCIES = ("redis", "postgres", "change_feed")
ALLOWED_STATUSES = {200, 429, 502, 503}
_HI = [{"role": "user", "content": "hi there"}]
# (path, body, streamed): what an OpenAI client and an Ollama client send, streams included.
ROUTES: list[tuple[str, dict[str, Any], bool]] = [
    ("/v1/chat/completions", {"model": "llama3.1:8b", "messages": _HI}, False),
    ("/api/chat", {"model": "llama3.1:8b", "messages": _HI, "stream": True}, True),
    ("/api/generate", {"model": "llama3.1:8b", "prompt": "hello", "stream": False}, False),
    ("/v1/embeddings", {"model": "nomic-embed-text", "input": "some words to embed"}, False),
]


@attrs.frozen
class Outcome:
    request_id: str
    path: str
    status: int
    code: str | None
    tokens: tuple[int, int]  # (prompt, completion) the caller was told; (0, 0) unless 200
    sent: float
    done: float


@attrs.define
class Fault:
    name: str
    began: float = 0.0
    ended: float = 0.0


def during(outcome: Outcome, fault: Fault) -> bool:
    """Sent while *fault* lasted, or as it began, or within RECOVERY_S after it ended."""
    return fault.began - 1.0 <= outcome.sent <= fault.ended + RECOVERY_S


def told_usage(path: str, streamed: bool, raw: bytes) -> tuple[int, int]:
    """The usage a 200 response told its caller, as each client reads it."""
    if streamed:
        lines = [line for line in raw.splitlines() if line.strip()]
        last = json.loads(lines[-1])
        assert last.get("done") is True, (path, last)
        return int(last["prompt_eval_count"]), int(last["eval_count"])
    body = json.loads(raw)
    if "usage" in body:
        return int(body["usage"]["prompt_tokens"]), int(body["usage"].get("completion_tokens", 0))
    return int(body["prompt_eval_count"]), int(body.get("eval_count", 0))


async def call(http: aiohttp.ClientSession, base: str, secret: str, rng: random.Random) -> Outcome:
    path, body, streamed = rng.choice(ROUTES)
    rid = f"sf-{uuid.uuid4().hex}"
    sent = time.monotonic()
    async with http.post(base + path, json=body, headers={"Authorization": f"Bearer {secret}",
                                                          "X-Request-Id": rid}) as resp:
        raw = await resp.read()
        status = resp.status
    tokens, code = (0, 0), None
    if status == 200:
        tokens = told_usage(path, streamed, raw)
    else:
        try:
            code = json.loads(raw).get("error", {}).get("code")
        except (ValueError, AttributeError):
            code = None
    return Outcome(rid, path, status, code, tokens, sent, time.monotonic())


def request_events(log: Path) -> dict[str, list[dict[str, Any]]]:
    """The gateway's `request` log events (JSON lines) by request id."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "request" and event.get("request_id"):
            by_id.setdefault(str(event["request_id"]), []).append(event)
    return by_id


def named_dependencies(events: dict[str, list[dict[str, Any]]], outcome: Outcome) -> set[str]:
    """The dependencies the 503 log events of *outcome* name ("redis" of "redis:ConnectionError")."""
    return {str(e["dependency"]).split(":")[0] for e in events.get(outcome.request_id, [])
            if e.get("status") == 503 and e.get("dependency")}


async def audit_by_id(database_url: str, request_ids: list[str], timeout_s: float
                      ) -> dict[str, list[dict[str, Any]]]:
    """Audit rows by request id, once every id has one (or the timeout passed); one more look after
    that, so a late duplicate is caught too."""

    async def look() -> dict[str, list[dict[str, Any]]]:
        by_id: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(request_ids), 5000):
            for row in await audit_rows(database_url, request_ids[start:start + 5000]):
                by_id.setdefault(row["request_id"], []).append(row)
        return by_id

    deadline = time.monotonic() + timeout_s
    while len(await look()) < len(request_ids) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)
    return await look()


@pytest.fixture(scope="module")
def stack() -> Iterator[PrivateStack]:
    with private_stack() as stack:
        yield stack


async def test_eight_callers_through_a_redis_stop_a_postgres_stop_and_an_ollama_failure(
    stack: PrivateStack, fake: FakeOllama, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    log = tmp_path / "gateway.log"
    gateway = GatewayProcess(stack, fake.url, spool, log)
    # Every request logs its event (with `dependency` on a 503); the circuit half-opens after 2 s.
    gateway.env |= {"LOG_LEVEL": "info", "CIRCUIT_FAILURE_THRESHOLD": "5", "CIRCUIT_RESET_S": "2"}
    settings = gateway_settings(stack.database_url, stack.redis_url, fake.url, spool)
    secret, prefix, _ = await new_key(settings)
    outcomes: list[Outcome] = []
    broken: list[str] = []
    stop = asyncio.Event()
    faults = [Fault("redis"), Fault("postgres"), Fault("ollama")]

    async def caller(n: int) -> None:
        rng = random.Random(n)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            for _ in range(MAX_REQUESTS_PER_CALLER):
                if stop.is_set():
                    return
                try:
                    outcome = await call(http, gateway.url, secret, rng)
                    outcomes.append(outcome)
                    if outcome.status != 200:
                        await asyncio.sleep(0.02)  # as a client backs off; keeps the count bounded
                except (aiohttp.ClientError, TimeoutError) as exc:
                    broken.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05)

    async def outage(fault: Fault, down: Callable[[], None], up: Callable[[], None], hold_s: float) -> None:
        fault.began = time.monotonic()
        await asyncio.to_thread(down)
        try:
            await asyncio.sleep(hold_s)
        finally:
            await asyncio.to_thread(up)
            fault.ended = time.monotonic()

    try:
        await gateway.start()
        callers = [asyncio.create_task(caller(n)) for n in range(CALLERS)]
        try:
            await asyncio.sleep(4.0)
            await outage(faults[0], stack.stop_redis, stack.start_redis, 4.0)
            await asyncio.sleep(7.0)
            await outage(faults[1], stack.stop_pg, stack.start_pg, 5.0)
            await asyncio.sleep(7.0)
            # The fake runs on this loop: flip it here, not from a thread.
            faults[2].began = time.monotonic()
            fake.fail_mode = "500"
            await asyncio.sleep(3.0)
            fake.fail_mode = None
            faults[2].ended = time.monotonic()
            await asyncio.sleep(7.0)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*callers), 90)
        statuses = Counter(o.status for o in outcomes)
        per_fault = []
        for fault in faults:
            after = [o for o in outcomes if o.sent >= fault.ended and o.status == 200]
            first_ok = min((o.done for o in after), default=float("inf")) - fault.ended
            per_fault.append((fault, first_ok))
        print(f"\n{len(outcomes)} responses from {CALLERS} callers: {dict(sorted(statuses.items()))}; "
              + ", ".join(f"{f.name} down {f.ended - f.began:.1f}s, 200 again after {ok:.2f}s"
                          for f, ok in per_fault))
        print("non-200 codes: " + str(dict(Counter((o.status, o.code) for o in outcomes if o.status != 200))))

        assert not broken, f"{len(broken)} connection errors, e.g. {broken[:3]}"
        assert set(statuses) <= ALLOWED_STATUSES, statuses
        assert statuses[200] > 100 and statuses[503] > 0 and statuses[502] > 0, statuses
        for fault, first_ok in per_fault:
            assert first_ok < RECOVERY_S, f"no 200 within {RECOVERY_S}s after the {fault.name} fault ended"

        # Exactly one audit row per response, with the status and the tokens the caller got.
        rows = await audit_by_id(stack.database_url, [o.request_id for o in outcomes], timeout_s=30)
        missing = [o.request_id for o in outcomes if o.request_id not in rows]
        assert not missing, f"{len(missing)} responses without an audit row, e.g. {missing[:3]}"
        twice = {rid: len(got) for rid, got in rows.items() if len(got) != 1}
        assert not twice, f"{len(twice)} responses with several audit rows, e.g. {list(twice.items())[:3]}"
        wrong = [(o.path, o.status, o.tokens, rows[o.request_id][0]["status"],
                  rows[o.request_id][0]["tokens_in"], rows[o.request_id][0]["tokens_out"])
                 for o in outcomes
                 if (rows[o.request_id][0]["status"], rows[o.request_id][0]["tokens_in"],
                     rows[o.request_id][0]["tokens_out"]) != (o.status, *o.tokens)]
        assert not wrong, f"{len(wrong)} audit rows disagree with the response (path, status, told, " \
                          f"audited status, in, out), e.g. {wrong[:5]}"

        # The ledger charges exactly what the 200 responses told their callers, nothing for a refusal.
        ok = [o for o in outcomes if o.status == 200]
        told = (len(ok), sum(o.tokens[0] for o in ok), sum(o.tokens[1] for o in ok))
        deadline = time.monotonic() + 30
        while (charged := await ledger_total(stack.database_url, prefix)) != told and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert charged == told, f"ledger (requests, in, out) {charged} != told to callers {told}"

        # Every 503 has a log event that names the dependency which refused.
        events = request_events(log)
        refused = [o for o in outcomes if o.status == 503]
        unnamed = [(o.request_id, sorted(named_dependencies(events, o))) for o in refused
                   if not named_dependencies(events, o) & set(DEPENDENCIES)]
        print("503s by dependency named in the log: "
              + str(dict(Counter(d for o in refused for d in named_dependencies(events, o)))))
        assert not unnamed, f"{len(unnamed)} of {len(refused)} 503s name no dependency, e.g. {unnamed[:3]}"

        # No refusal out of the blue: each 503 names the dependency that was down when it was sent
        # (or within RECOVERY_S after), each 502 falls in the Ollama failure (the circuit's reset after).
        redis, postgres, ollama = faults
        stray: list[tuple[int, float, list[str]]] = []
        for o in outcomes:
            names = named_dependencies(events, o)
            if o.status == 503 and not ((during(o, redis) and "redis" in names) or
                                        (during(o, postgres) and names & {"postgres", "change_feed"})):
                stray.append((o.status, round(o.sent - redis.began, 2), sorted(names)))
            if o.status == 502 and not during(o, ollama):
                stray.append((o.status, round(o.sent - redis.began, 2), sorted(names)))
        assert not stray, f"{len(stray)} refusals outside their fault (status, s after the first fault " \
                          f"began, dependency), e.g. {stray[:5]}"

        gateway.sigterm()
        assert await gateway.wait(40) == 0, gateway.tail()
    finally:
        stack.ensure_up()
        fake.fail_mode = None
        gateway.kill()
