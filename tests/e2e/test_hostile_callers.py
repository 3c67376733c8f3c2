"""Hostile callers (SPEC §3.5): one strict parse before admission, nothing smuggled past it.

Every assertion reads what the fake Ollama received, or what the key's limits and budget show
afterwards: a refused body is never forwarded and never holds a slot or a reservation.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import ollama
import pytest
import structlog

from adapters.http import relay
from adapters.http.typedefs import SERVICES
from gateway_core.breaker import CircuitState
from gateway_core.errors import DependencyUnavailable
from gateway_core.limits import Limits
from gateway_core.request import fold
from tests.e2e.harness import Gateway, audit_row, early_in_a_minute, gateway_settings, running_gateway
from tests.e2e.test_upstream_hygiene import assert_error, bearer, upstream
from tests.fake_ollama import FakeOllama, completion_text

MODEL = "llama3.1:8b"
OTHER = "qwen3:8b"  # discovered, but not allowed for the keys below
MESSAGES = [{"role": "user", "content": "hi"}]
KELVIN = "\u212a"  # folds to k
LONG_S = "\u017f"  # folds to s


def _base(route: str) -> dict[str, Any]:
    if route == "/api/generate":
        return {"model": MODEL, "prompt": "hi", "stream": False}
    return {"model": MODEL, "messages": MESSAGES, "stream": False}


def _smuggles(route: str) -> list[tuple[dict[str, Any], str]]:
    """(body, the key the 400 must name) for every smuggling shape of the issue."""
    base = _base(route)
    shapes: list[tuple[dict[str, Any], str]] = [
        ({**base, "Model": OTHER}, "Model"),
        ({**base, "MODEL": OTHER}, "MODEL"),
        ({**base, "Stream": True}, "Stream"),
        ({**base, f"{LONG_S}tream": True}, f"{LONG_S}tream"),
        ({**base, f"{KELVIN}eep_alive": 0}, f"{KELVIN}eep_alive"),
        ({**base, "KEEP_ALIVE": "24h"}, "KEEP_ALIVE"),
        ({**base, "Options": {"num_ctx": 65536}}, "Options"),
        ({**base, "Max_Tokens": 100000}, "Max_Tokens"),
        ({**base, "max_Completion_tokens": 100000}, "max_Completion_tokens"),
        ({**base, "Messages": MESSAGES}, "Messages"),
        ({**base, "x_extra": 1, "X_EXTRA": 2}, "X_EXTRA"),  # a twin of any field, controlled or not
    ]
    if route.startswith("/api/"):
        shapes += [
            ({**base, "options": {"NUM_CTX": 65536}}, "NUM_CTX"),
            ({**base, "options": {"num_predict": 5, "Num_Predict": -1}}, "Num_Predict"),
            ({**base, "options": {f"num_{KELVIN}eep": 5, "num_keep": 4}}, "num_keep"),
            ({**base, "options": {"temperature": 0.1, "TEMPERATURE": 0.9}}, "TEMPERATURE"),
        ]
    return shapes


def _assert_no_folded_twins(obj: dict[str, Any], where: str) -> None:
    folded = [fold(k) for k in obj]
    assert len(set(folded)) == len(folded), (where, list(obj))


async def _post(http: aiohttp.ClientSession, url: str, secret: str, body: Any | bytes
                ) -> tuple[int, Mapping[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    async with http.post(url, data=data, headers={**bearer(secret), "Content-Type": "application/json"}
                         ) as resp:
        payload = await resp.json(content_type=None)
        return resp.status, resp.headers.copy(), payload


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat", "/api/generate"])
async def test_every_smuggling_shape_is_refused_naming_the_key(gateway: Gateway, route: str) -> None:
    secret, _, _ = await gateway.key(models=(MODEL,), key_limits=Limits(concurrent=1))
    gateway.fake.requests.clear()
    async with aiohttp.ClientSession() as http:
        for body, key in _smuggles(route):
            status, headers, payload = await _post(http, gateway.url + route, secret, body)
            assert status == 400, (route, key, status, payload)
            assert_error(payload, "invalid_request")
            assert payload["error"]["param"] == key and key in payload["error"]["message"], payload
            assert headers.get("X-Request-Id")
        assert upstream(gateway) == [], "a refused body reached the upstream"
        # Nothing admitted: with concurrent=1 the next valid request is served.
        status, _, _ = await _post(http, gateway.url + route, secret, _base(route))
        assert status == 200


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate",
                                   "/api/embed", "/v1/embeddings"])
async def test_forwarded_bodies_never_hold_folded_twins_or_look_alikes(gateway: Gateway, route: str) -> None:
    secret, _, _ = await gateway.key(models=(MODEL, "nomic-embed-text:latest"), budget={"daily": 100_000})
    embed = "embed" in route
    body: dict[str, Any] = {"model": "nomic-embed-text:latest" if embed else MODEL, "keep_alive": "24h",
                            "_debug_render_only": True}
    if embed:
        body["input"] = "hello"
    elif route in ("/v1/completions", "/api/generate"):
        body.update(prompt="hi", stream=False)
    else:
        body.update(messages=MESSAGES, stream=False)
    if route.startswith("/api/"):
        body["options"] = {"num_ctx": 65536, "num_predict": -1, "temperature": 0.2, "num_thread": 64}
    else:
        body.update(max_tokens=50, max_completion_tokens=40)
    gateway.fake.requests.clear()
    async with aiohttp.ClientSession() as http:
        status, _, payload = await _post(http, gateway.url + route, secret, body)
    assert status == 200, payload
    [sent] = upstream(gateway)
    got = sent["json"]
    _assert_no_folded_twins(got, "top level")
    assert "keep_alive" not in got and "_debug_render_only" not in got
    if isinstance(got.get("options"), dict):
        _assert_no_folded_twins(got["options"], "options")
        assert not {"num_ctx", "num_thread"} & set(got["options"])
    if not embed:
        if route.startswith("/v1/"):
            assert got["max_tokens"] == 40 and "max_completion_tokens" not in got  # the smaller binds
        else:
            assert 1 <= got["options"]["num_predict"] <= 100_000


async def test_invalid_bodies_hold_nothing_and_the_budget_moves_by_usage_only(gateway: Gateway) -> None:
    """concurrent=1 and a budget: any mix of invalid bodies, then a valid request → 200, and the
    remaining budget moves by exactly the usage of the request served in between."""
    secret, _, _ = await gateway.key(models=(MODEL,), key_limits=Limits(concurrent=1),
                                     budget={"daily": 50_000})
    url = gateway.url + "/api/chat"
    valid = {"model": MODEL, "messages": MESSAGES, "stream": False, "options": {"num_predict": 100}}
    invalid: list[Any] = [
        {**valid, "options": "x"},
        {**valid, "options": {"num_predict": 0}},
        {**valid, "options": {"num_predict": -3}},
        {**valid, "options": {"num_predict": 1.5}},
        {**valid, "Model": OTHER},
        {**valid, "stream": "yes"},
        b'{"model": "llama3.1:8b", "messages": [',
        b'{"model": "llama3.1:8b", "x": 1e999}',
        b'{"model": "llama3.1:8b", "x": NaN}',
        b'{"model": "llama3.1:8b", "x": "\xff\xfe"}',
        b'{"model": "llama3.1:8b", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"model": "llama3.1:8b", "x": ' + b"[" * 65 + b"]" * 65 + b"}",
    ]
    async with aiohttp.ClientSession() as http:
        status, first, answer = await _post(http, url, secret, valid)
        assert status == 200
        usage = answer["prompt_eval_count"] + answer["eval_count"]
        gateway.fake.requests.clear()
        for body in invalid:
            status, headers, payload = await _post(http, url, secret, body)
            assert status == 400, (body if not isinstance(body, bytes) else body[:60], payload)
            assert_error(payload, "invalid_request")
            # §3.4: a 400 after authentication still carries the request id.
            assert headers.get("X-Request-Id")
        assert upstream(gateway) == []
        status, second, _ = await _post(http, url, secret, valid)
        assert status == 200
    before = int(first["X-Budget-Tokens-Remaining"])
    after = int(second["X-Budget-Tokens-Remaining"])
    assert before - after == usage, (before, after, usage)


async def test_no_cap_below_one_ever_reaches_the_upstream(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=(MODEL,), budget={"daily": 300})
    async with aiohttp.ClientSession() as http:
        for route, body in [
            ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 0}),
            ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 10,
                                      "max_tokens": -1}),
            ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": True}),
            ("/api/chat", {"model": MODEL, "messages": MESSAGES, "options": {"num_predict": 0}}),
        ]:
            status, _, payload = await _post(http, gateway.url + route, secret, body)
            assert status == 400, (body, payload)
            assert_error(payload, "invalid_request")
        assert upstream(gateway) == []
        # Uncapped on a budgeted key: the cap sent is within 1..remaining.
        for route, body in [
            ("/api/chat", {"model": MODEL, "messages": MESSAGES, "stream": False,
                           "options": {"num_predict": -1}}),
            ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False,
                               "options": {"num_predict": -2}}),
            ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 100_000}),
        ]:
            status, headers, payload = await _post(http, gateway.url + route, secret, body)
            assert status == 200, payload
    for sent in upstream(gateway):
        got = sent["json"]
        cap = got["max_tokens"] if sent["path"].startswith("/v1/") else got["options"]["num_predict"]
        assert 1 <= cap <= 300, (sent["path"], cap)


async def test_malformed_bodies_and_internal_faults_are_shaped_audited_and_logged(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=(MODEL,))
    url = gateway.url + "/v1/chat/completions"
    cases: list[tuple[bytes, int, str]] = [
        (b'{"model":"llama3.1:8b","messages":' + b"[" * 20_000 + b"]" * 20_000 + b"}", 400,
         "invalid_request"),
        (b'{"model":"llama3.1:8b","messages":[],"temperature":1e999}', 400, "invalid_request"),
        (b'{"model":"llama3.1:8b","messages":[{"role":"user","cont', 400, "invalid_request"),
    ]
    svc = gateway.app[SERVICES]
    real_policy = svc.policy

    class BrokenPolicy:
        def authorize(self, *args: Any) -> str:
            raise RuntimeError("injected fault")

    async with aiohttp.ClientSession() as http:
        fault = (json.dumps({"model": MODEL, "messages": MESSAGES}).encode(), 500, "internal_error")
        for raw, status, code in [*cases, fault]:
            rid = f"hostile-{uuid.uuid4().hex}"
            if status == 500:
                svc.policy = BrokenPolicy()  # type: ignore[assignment]
            try:
                with structlog.testing.capture_logs() as logs:
                    async with http.post(url, data=raw, headers={**bearer(secret), "X-Request-Id": rid,
                                                                 "Content-Type": "application/json"}) as resp:
                        assert resp.status == status, (raw[:50], resp.status, await resp.text())
                        assert resp.headers["X-Request-Id"] == rid
                        assert resp.content_type == "application/json"
                        assert_error(await resp.json(), code)
            finally:
                svc.policy = real_policy
            row = await audit_row(gateway, rid)
            assert row["status"] == status
            events = [e for e in logs if e.get("request_id") == rid]
            assert events, logs
            if status == 500:
                logged = [e for e in events if e["event"] == "internal_error"]
                assert logged and "injected fault" in str(logged[0].get("exc_info")), events
                assert secret not in json.dumps(logs, default=str)
            # The next request is served.
            async with http.post(url, json={"model": MODEL, "messages": MESSAGES},
                                 headers=bearer(secret)) as resp:
                assert resp.status == 200


async def test_a_refused_model_is_audited_with_the_name_asked_for(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=(MODEL,))
    asked = "secret-model-" + "x" * 300
    rid = f"hostile-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url + "/api/chat", json={"model": asked, "messages": MESSAGES},
                             headers={**bearer(secret), "X-Request-Id": rid}) as resp:
            assert resp.status == 403
    row = await audit_row(gateway, rid)
    assert row["model"] == asked[:200] and row["status"] == 403


async def test_the_official_client_against_an_upstream_that_writes_spaced_json(
        database_url: str, redis_url: str, tmp_path: Any) -> None:
    async with FakeOllama(models=[MODEL], spaced_json=True) as fake:
        settings = gateway_settings(database_url, redis_url, fake.url, tmp_path)
        async with running_gateway(settings, fake) as gw:
            secret, _, _ = await gw.key(models=(MODEL,))
            client = ollama.AsyncClient(host=gw.url, headers={"Authorization": f"Bearer {secret}"})
            chat = await client.chat(model=MODEL, messages=MESSAGES, stream=False)
            assert chat.message.content == completion_text(12) and chat.eval_count == 12
            parts = [p async for p in await client.chat(model=MODEL, messages=MESSAGES, stream=True)]
            assert parts[-1].done is True and parts[-1].eval_count == 12
            assert "".join(p.message.content or "" for p in parts) == completion_text(12)
            gen = await client.generate(model=MODEL, prompt="Once upon a time", stream=False)
            assert gen.response == completion_text(12)
            pieces = [p async for p in await client.generate(model=MODEL, prompt="Once", stream=True)]
            assert pieces[-1].done is True and pieces[-1].eval_count == 12
            assert "".join(p.response for p in pieces) == completion_text(12)
            # And the OpenAI framing's usage chunk is found as well.
            async with aiohttp.ClientSession() as http, http.post(
                    gw.url + "/v1/chat/completions", headers=bearer(secret),
                    json={"model": MODEL, "messages": MESSAGES, "stream": True,
                          "stream_options": {"include_usage": True}}) as resp:
                text = await resp.text()
            assert text.rstrip().endswith("data: [DONE]") and '"completion_tokens": 12' in text
            assert '"error"' not in text
            await asyncio.sleep(0)


async def test_listings_and_refusals_after_authentication_carry_rate_and_budget_headers(
        gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=(MODEL,), key_limits=Limits(rpm=50, tpm=100_000),
                                     budget={"daily": 5000, "total": 90_000})
    async with aiohttp.ClientSession() as http:
        status, served, answer = await _post(http, gateway.url + "/api/chat", secret, _base("/api/chat"))
        assert status == 200
        usage = answer["prompt_eval_count"] + answer["eval_count"]
        seen: list[Mapping[str, str]] = []
        for method, path, body in [("GET", "/v1/models", None), ("GET", "/api/tags", None),
                                   ("GET", "/api/version", None), ("GET", f"/v1/models/{MODEL}", None),
                                   ("GET", "/v1/models/nope", None),
                                   ("POST", "/api/chat", {**_base("/api/chat"), "model": OTHER}),
                                   ("POST", "/api/chat", {**_base("/api/chat"), "Stream": True})]:
            async with http.request(method, gateway.url + path, json=body, headers=bearer(secret)) as resp:
                await resp.read()
                assert resp.status in (200, 400, 403, 404), (path, resp.status)
                for name in ("X-RateLimit-Limit-Requests", "X-RateLimit-Remaining-Requests",
                             "X-RateLimit-Reset-Requests", "X-RateLimit-Limit-Tokens",
                             "X-RateLimit-Remaining-Tokens", "RateLimit-Policy", "X-Budget-Period",
                             "X-Budget-Tokens-Remaining"):
                    assert name in resp.headers, (path, resp.status, name)
                seen.append(resp.headers.copy())
    # Read without consuming: only the one served request shows in the windows and the budget.
    assert {h["X-RateLimit-Remaining-Requests"] for h in seen} == {"49"}
    assert {h["X-RateLimit-Remaining-Tokens"] for h in seen} == {str(100_000 - usage)}
    assert {h["X-Budget-Tokens-Remaining"] for h in seen} == {str(5000 - usage)}
    assert {h["X-Budget-Period"] for h in seen} == {"daily"}
    assert served["X-Budget-Tokens-Remaining"] != str(5000 - usage)  # the served one showed its reservation


async def test_an_address_blocked_for_failed_auth_is_refused_before_its_body_is_parsed(
        database_url: str, redis_url: str, tmp_path: Any) -> None:
    async with FakeOllama(models=[MODEL]) as fake:
        settings = gateway_settings(database_url, redis_url, fake.url, tmp_path, auth_failures_per_minute=3)
        async with running_gateway(settings, fake) as gw, aiohttp.ClientSession() as http:
            good, _, _ = await gw.key(models=(MODEL,))
            assert (await _post(http, gw.url + "/api/chat", good, _base("/api/chat")))[0] == 200
            wrong = "nz_" + "A" * 43
            huge_and_broken = b'{"model": "' + b"x" * (4 << 20) + b'", '  # 4 MiB, and not JSON
            # A caller without a working key gets 401, not a parse of its body (no 400 tells it
            # anything about the body before it has proven who it is).
            await early_in_a_minute()
            status, _, payload = await _post(http, gw.url + "/api/chat", wrong, huge_and_broken)
            assert status == 401 and payload["error"]["code"] == "invalid_api_key"
            for _ in range(3):
                await _post(http, gw.url + "/api/chat", wrong, _base("/api/chat"))
            status, headers, payload = await _post(http, gw.url + "/api/chat", wrong, huge_and_broken)
            assert status == 429 and payload["error"]["code"] == "rate_limit_exceeded", payload
            assert "Retry-After" in headers
            # A key this gateway verified before still gets its body checked (and refused) as usual.
            status, _, payload = await _post(http, gw.url + "/api/chat", good, huge_and_broken)
            assert status == 400 and payload["error"]["code"] == "invalid_request"
            assert len(upstream(gw)) == 1  # only the first, valid request was forwarded


async def test_a_redis_failure_at_settlement_still_delivers_the_answer(gateway: Gateway) -> None:
    """Issue 10: once the model answered, the work is done and paid for; the Redis half of the
    settlement is queued and put right when Redis answers again."""
    secret, _, _ = await gateway.key(models=(MODEL,), key_limits=Limits(concurrent=1),
                                     budget={"daily": 50_000})
    metering = gateway.app[SERVICES].metering
    store = metering._store  # the fault is injected where Redis would fail
    real_settle = store.settle

    async def failing_settle(settlement: Any) -> None:
        raise DependencyUnavailable()

    body = {"model": MODEL, "messages": MESSAGES, "stream": False, "options": {"num_predict": 100}}
    async with aiohttp.ClientSession() as http:
        store.settle = failing_settle  # type: ignore[method-assign]
        try:
            status, first, answer = await _post(http, gateway.url + "/api/chat", secret, body)
            assert status == 200 and answer["eval_count"] == 12  # delivered, not a 503
            async with http.post(gateway.url + "/api/chat", headers=bearer(secret),
                                 json={**body, "stream": True}) as resp:
                assert resp.status == 429  # the slot is still held in Redis (concurrent=1) ...
        finally:
            store.settle = real_settle  # type: ignore[method-assign]
        assert len(metering.unsettled) == 1
        await metering.renew_leases()  # ... until the periodic job re-runs the settlement
        assert len(metering.unsettled) == 0
        status, second, again = await _post(http, gateway.url + "/api/chat", secret, body)
        assert status == 200
    usage = answer["prompt_eval_count"] + answer["eval_count"]
    assert int(first["X-Budget-Tokens-Remaining"]) - int(second["X-Budget-Tokens-Remaining"]) == usage


def _mistyped(route: str) -> list[tuple[dict[str, Any], str]]:
    """(body, the field the 400 must name): values of a type the backend does not take. On the
    native routes a wrongly typed option or format is a 500 from Ollama, i.e. a breaker failure."""
    base: dict[str, Any] = ({"model": "nomic-embed-text:latest", "input": "hi"} if route == "/api/embed"
                            else {"model": "nomic-embed-text:latest", "prompt": "hi"}
                            if route == "/api/embeddings" else _base(route))
    shapes: list[tuple[dict[str, Any], str]] = [
        ({**base, "options": {"seed": {}}}, "options.seed"),
        ({**base, "options": {"temperature": "hot"}}, "options.temperature"),
        ({**base, "options": {"top_k": 1.5}}, "options.top_k"),
        ({**base, "options": {"top_p": True}}, "options.top_p"),
        ({**base, "options": {"stop": "\n"}}, "options.stop"),
        ({**base, "options": {"stop": ["a", 1]}}, "options.stop"),
    ]
    if route in ("/api/chat", "/api/generate"):
        shapes += [
            ({**base, "format": "xml"}, "format"),
            ({**base, "format": 5}, "format"),
            ({**base, "format": "xml", "stream": True}, "format"),
            ({**base, "think": "very"}, "think"),
        ]
    if route == "/api/chat":
        shapes += [
            ({**base, "messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
            ({**base, "messages": ["hi"]}, "messages"),
            ({**base, "messages": [{"role": "user", "content": "hi", "images": [1]}]}, "messages[0].images"),
        ]
    if route == "/api/generate":
        shapes += [({**base, "prompt": ["hi"]}, "prompt"), ({**base, "context": ["x"]}, "context")]
    if route == "/api/embed":
        shapes += [({**base, "input": [1, 2]}, "input"), ({**base, "dimensions": "8"}, "dimensions")]
    if route == "/api/embeddings":
        shapes += [({**base, "prompt": 7}, "prompt")]
    return shapes


@pytest.mark.parametrize("route", ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings"])
async def test_wrongly_typed_fields_are_a_400_and_never_reach_the_breaker(
        database_url: str, redis_url: str, tmp_path: Any, route: str) -> None:
    """The schemathesis finding: `{"options":{"seed":{}}}` was forwarded, Ollama answered 500, and the
    caller got a 502 that counted against the circuit, so one caller could open it for everyone."""
    async with FakeOllama(models=[MODEL, "nomic-embed-text:latest"]) as fake:
        settings = gateway_settings(database_url, redis_url, fake.url, tmp_path, circuit_failure_threshold=2)
        async with running_gateway(settings, fake) as gw, aiohttp.ClientSession() as http:
            secret, _, _ = await gw.key(key_limits=Limits(concurrent=1))
            breaker = gw.app[SERVICES].upstream
            gw.fake.requests.clear()
            for body, field in _mistyped(route):
                status, headers, payload = await _post(http, gw.url + route, secret, body)
                assert status == 400, (body, status, payload)
                assert_error(payload, "invalid_request")
                assert payload["error"]["param"] == field and field in payload["error"]["message"], payload
                assert "X-RateLimit-Remaining-Requests" in headers
            assert upstream(gw) == [], "a wrongly typed body reached the upstream"
            assert breaker.state() is CircuitState.CLOSED and breaker.open_model_circuits() == [0]
            # Nothing admitted (concurrent=1), the circuit closed: the next valid request is served.
            valid = _mistyped(route)[0][0]
            valid["options"] = {"seed": 7, "temperature": 0.5, "stop": ["\n"], "top_k": 40.0}
            status, _, payload = await _post(http, gw.url + route, secret, valid)
            assert status == 200, payload
            [sent] = upstream(gw)
            assert sent["json"]["options"]["seed"] == 7 and sent["json"]["options"]["stop"] == ["\n"]


@pytest.mark.parametrize("raw", [b"null", b"1", b'"x"', b"true", b"[]", b"[{}]", b"{}"])
async def test_a_body_that_is_not_an_object_with_a_model_is_a_400_not_a_500(gateway: Gateway,
                                                                           raw: bytes) -> None:
    secret, _, _ = await gateway.key(models=(MODEL,))
    async with aiohttp.ClientSession() as http:
        for route in ("/v1/chat/completions", "/api/chat", "/api/embed"):
            status, headers, payload = await _post(http, gateway.url + route, secret, raw)
            assert status == 400, (route, raw, payload)
            assert_error(payload, "invalid_request")
            assert headers.get("X-Request-Id")
    assert upstream(gateway) == []


async def test_unknown_options_are_not_forwarded_and_known_ones_are(gateway: Gateway) -> None:
    secret, _, _ = await gateway.key(models=(MODEL,))
    body = {**_base("/api/chat"), "options": {"temperature": 0.2, "min_p": 0.05, "stop": ["x"],
                                              "kv_cache_type": "q4_0", "spec_type": "draft", "num_ctx": 4}}
    async with aiohttp.ClientSession() as http:
        status, _, payload = await _post(http, gateway.url + "/api/chat", secret, body)
    assert status == 200, payload
    [sent] = upstream(gateway)
    assert sent["json"]["options"] == {"temperature": 0.2, "min_p": 0.05, "stop": ["x"]}


async def test_upstream_4xx_never_counts_against_the_breaker_and_5xx_does(
        database_url: str, redis_url: str, tmp_path: Any) -> None:
    async with FakeOllama(models=[MODEL]) as fake:
        settings = gateway_settings(database_url, redis_url, fake.url, tmp_path, circuit_failure_threshold=2)
        async with running_gateway(settings, fake) as gw, aiohttp.ClientSession() as http:
            secret, _, _ = await gw.key(models=(MODEL,))
            breaker = gw.app[SERVICES].upstream
            url = gw.url + "/v1/chat/completions"
            # Forwarded, and refused by the backend itself (400): the caller's fault, not the backend's.
            for _ in range(4):
                status, _, payload = await _post(http, url, secret, {"model": MODEL, "messages": []})
                assert status == 400, payload
                assert_error(payload, "invalid_request")
            assert len(upstream(gw)) == 4
            assert breaker.state() is CircuitState.CLOSED and breaker.open_model_circuits() == [0]
            status, _, _ = await _post(http, url, secret, {"model": MODEL, "messages": MESSAGES})
            assert status == 200
            fake.fail_mode = "500"
            for _ in range(2):
                status, _, _ = await _post(http, url, secret, {"model": MODEL, "messages": MESSAGES})
                assert status == 502
            # 5xx answers about the model open that model's own circuit; the backend answered (SPEC §4.10).
            assert breaker.open_model_circuits() == [1] and breaker.state() is CircuitState.CLOSED


@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
async def test_a_fault_after_the_stream_started_is_framed_settled_audited_and_logged(
        gateway: Gateway, monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """Headers are on the wire: no second response on the connection, but the route's error frame;
    the stream is settled (the slot is free), audited as a 500 and logged once with the traceback."""
    secret, _, _ = await gateway.key(models=(MODEL,), key_limits=Limits(concurrent=1),
                                     budget={"daily": 50_000})
    native = route.startswith("/api/")
    # A step each route's relay takes for every line (NDJSON) or every network read (SSE).
    handler = "_native_line" if native else "_plain_sse"
    real = getattr(relay, handler)
    seen = {"n": 0}

    def fails_on_the_third(*args: Any, **kwargs: Any) -> Any:
        seen["n"] += 1
        if seen["n"] == 3:
            raise RuntimeError("injected fault mid-stream")
        return real(*args, **kwargs)

    monkeypatch.setattr(relay, handler, fails_on_the_third)
    rid = f"hostile-{uuid.uuid4().hex}"
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        with structlog.testing.capture_logs() as logs:
            async with http.post(gateway.url + route, json=body,
                                 headers={**bearer(secret), "X-Request-Id": rid}) as resp:
                assert resp.status == 200 and resp.headers["X-Request-Id"] == rid
                text = (await resp.read()).decode()
            row = await audit_row(gateway, rid)  # written once the handler is done, after the log event
        last = [line for line in text.splitlines() if line.strip()][-1]
        error = json.loads(last if native else last.removeprefix("data: "))
        assert (error["code"] if native else error["error"]["code"]) == "internal_error", text
        assert "injected" not in text
        assert row["status"] == 500 and row["tokens_in"] > 0
        logged = [e for e in logs if e.get("request_id") == rid and e["event"] == "internal_error"]
        assert len(logged) == 1 and "injected fault" in str(logged[0].get("exc_info"))
        monkeypatch.undo()
        # Settled, not leaked: with concurrent=1 the next request is served.
        status, _, _ = await _post(http, gateway.url + "/api/chat", secret, _base("/api/chat"))
        assert status == 200
