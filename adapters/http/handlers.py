"""parse → authenticate → authorize → admit → forward → settle, for every caller route (SPEC §4.1)."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime
from typing import Any

from aiohttp import web

from adapters.http.app import EXCHANGE, SERVICES, Services, json_response
from adapters.http.exchange import Exchange
from adapters.http.relay import ClientGone, StreamResult, relay_ndjson, relay_sse
from adapters.http.translate import OPERATIONS, Framing, Kind, Operation, embedding_usage, usage_of
from gateway_core.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotAllowed,
    ModelNotFound,
    RequestTooLarge,
    UpstreamUnavailable,
)
from gateway_core.metering import Grant
from gateway_core.models import Principal
from gateway_core.tokens import estimate_chunks

# An upstream 400 message is passed on only when it cannot name a host, path or URL.
_SAFE_UPSTREAM_MESSAGE = re.compile(r"^[A-Za-z0-9 '\"._:,()\[\]-]{1,200}$")
# ...and names no address: no dotted numbers (IPs, host:port) and no "localhost".
_HOST_LIKE = re.compile(r"\d+\.\d+\.\d+|localhost|\.local\b|\.internal\b", re.IGNORECASE)


async def _read_json(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge()
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge() from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required.", param="model")
    return body


async def _principal(request: web.Request) -> tuple[Services, Principal]:
    svc = request.app[SERVICES]
    ex: Exchange = request[EXCHANGE]
    ex.principal = await svc.auth.authenticate(request.headers.get("Authorization"), ex.client_ip)
    return svc, ex.principal


async def _listing_principal(request: web.Request) -> tuple[Services, Principal]:
    """Listings and version use no admission, so Redis is confirmed separately (SPEC §8.5)."""
    svc, principal = await _principal(request)
    await svc.confirm_redis()
    return svc, principal


async def proxy(request: web.Request) -> web.StreamResponse:
    op = OPERATIONS[request.path]
    svc = request.app[SERVICES]
    ex: Exchange = request[EXCHANGE]
    body = await _read_json(request, svc.max_request_bytes)
    stream = op.wants_stream(body)
    svc, principal = await _principal(request)
    ex.model = svc.policy.authorize(principal, op.scope, body["model"])
    prompt_estimate = op.estimate_prompt(body)
    grant = await svc.metering.admit(principal, prompt_estimate, op.completion_allowance(body))
    ex.headers.update(grant.headers)
    if principal.prompt_log_enabled:
        ex.prompt_text = _prompt_text(body)
    upstream = op.upstream_body(body, ex.model, stream, grant.completion_cap)
    try:
        await svc.breaker.before_call()
        async with svc.backend.open("POST", op.path, json.dumps(upstream).encode()) as up:
            if up.status != 200:
                raise await _upstream_failure(svc, up.status, up)
            await svc.breaker.record(True)
            if stream:
                return await _stream(request, svc, ex, op, grant, up, body)
            raw = await up.read()
            if op.kind is Kind.EMBEDDING:
                usage = embedding_usage(op, raw) or (prompt_estimate, 0)
            else:
                try:
                    answer = json.loads(raw)
                except ValueError:
                    raise UpstreamUnavailable(retry_after_s=1.0) from None
                usage = usage_of(op, answer) or (prompt_estimate, 0)
            await _settle(svc, ex, grant, *usage)
            if ex.prompt_text is not None and op.kind is not Kind.EMBEDDING:
                ex.response_text = _answer_text(answer)
            return web.Response(body=raw, content_type="application/json", headers=ex.headers)
    except UpstreamUnavailable as exc:
        if exc.__cause__ is not None:
            await svc.breaker.record(False)
        # If this failure opened the circuit, the honest wait is until it half-opens.
        exc.retry_after_s = max(exc.retry_after_s or 1.0, svc.breaker.seconds_to_half_open())
        exc.headers.update(ex.headers)
        raise
    except asyncio.CancelledError:
        # The caller hung up while the model was working: its prompt was processed, so charge it.
        if not grant.settled:
            await asyncio.shield(_settle(svc, ex, grant, prompt_estimate, 0))
        raise
    finally:
        if not grant.settled:
            # Shielded: a caller who hangs up must not leave its slot and reservation taken.
            await asyncio.shield(svc.metering.release(grant))


def _prompt_text(body: dict[str, Any]) -> str:
    """What the caller sent, as they wrote it: plain text stays text, structures stay readable."""
    prompt = body.get("messages") or body.get("prompt") or body.get("input") or ""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def _answer_text(answer: Any) -> str:
    """The generated text of a complete answer (the same thing the stream relays collect)."""
    if not isinstance(answer, dict):
        return ""
    for choice in answer.get("choices") or []:
        if isinstance(choice, dict):
            text = (choice.get("message") or {}).get("content") or choice.get("text")
            if isinstance(text, str):
                return text
    message = answer.get("message")
    text = message.get("content") if isinstance(message, dict) else answer.get("response")
    return text if isinstance(text, str) else ""


async def _upstream_failure(svc: Services, status: int, up: Any) -> GatewayError:
    """Map an upstream status to §3.3; the upstream body itself is never passed through."""
    if status >= 500:
        await svc.breaker.record(False)
        return UpstreamUnavailable(retry_after_s=1.0)
    await svc.breaker.record(True)  # a 4xx answer means the upstream is alive (SPEC §4.8)
    if status == 404:
        return ModelNotAllowed()
    if status == 400:
        try:
            message = (await up.json(content_type=None)).get("error")
        except (ValueError, AttributeError):
            message = None
        if (isinstance(message, str) and _SAFE_UPSTREAM_MESSAGE.match(message)
                and not _HOST_LIKE.search(message)):
            return InvalidRequest(f"The model backend rejected the request: {message}")
        return InvalidRequest("The model backend rejected the request as invalid.")
    return UpstreamUnavailable(retry_after_s=1.0)


async def _stream(request: web.Request, svc: Services, ex: Exchange, op: Operation, grant: Grant,
                  up: Any, body: dict[str, Any]) -> web.StreamResponse:
    sse = op.framing is Framing.OPENAI
    out = web.StreamResponse(status=200, headers={
        **ex.headers, "X-Request-Id": ex.request_id, "Cache-Control": "no-cache",
        "Content-Type": "text/event-stream" if sse else "application/x-ndjson"})
    result = StreamResult(text=[] if ex.prompt_text is not None else None)
    try:
        await out.prepare(request)
        if sse:
            options = body.get("stream_options")
            wants_usage = isinstance(options, dict) and options.get("include_usage") is True
            await relay_sse(up, out, result, caller_wants_usage=wants_usage)
        else:
            await relay_ndjson(up, out, result)
        await out.write_eof()
    except (ClientGone, ConnectionError):
        result.client_gone = True
    except asyncio.CancelledError:
        result.client_gone = True
        raise
    finally:
        # Charged: the upstream's count when it arrived, else the prompt estimate and one token per
        # relayed chunk (SPEC §6.2), also for streams cut by the caller or by the upstream.
        prompt = result.prompt_tokens if result.prompt_tokens is not None else grant.ticket.prompt_tokens
        completion = (result.completion_tokens if result.completion_tokens is not None
                      else estimate_chunks(result.chunks))
        if result.text is not None:
            ex.response_text = "".join(result.text)
        # Everything the audit needs is set before the await: a cancelled caller interrupts it.
        ex.status = 502 if result.failed else 499 if result.client_gone else 200
        if result.failed:
            await svc.breaker.record(False)
        await _settle(svc, ex, grant, prompt, completion)
    return out


async def _settle(svc: Services, ex: Exchange, grant: Grant, prompt: int, completion: int) -> None:
    ex.tokens_in, ex.tokens_out = prompt, completion
    await asyncio.shield(svc.metering.settle(grant, prompt, completion))


def _owned_by(name: str) -> str:
    return name.split("/")[-2] if "/" in name else "library"


def _created(entry: dict[str, Any] | None) -> int:
    stamp = (entry or {}).get("modified_at")
    if isinstance(stamp, str):
        try:
            return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return 0
    return 0


def _effective_entries(svc: Services, principal: Principal) -> list[dict[str, Any]]:
    names = set(svc.policy.effective(principal).names())
    catalog = svc.policy.catalog()
    by_name = {e["name"]: e for e in catalog.entries} if catalog else {}
    return [by_name.get(n, {"name": n, "model": n}) for n in sorted(names)]


async def list_models_openai(request: web.Request) -> web.Response:
    svc, principal = await _listing_principal(request)
    data = [{"id": e["name"], "object": "model", "created": _created(e), "owned_by": _owned_by(e["name"])}
            for e in _effective_entries(svc, principal)]
    return json_response({"object": "list", "data": data})


async def retrieve_model_openai(request: web.Request) -> web.Response:
    svc, principal = await _listing_principal(request)
    wanted = request.match_info["model_id"]
    name = svc.policy.effective(principal).lookup(wanted)
    if name is None:
        raise ModelNotFound(param="model")
    entry = next((e for e in _effective_entries(svc, principal) if e["name"] == name), None)
    return json_response({"id": wanted, "object": "model", "created": _created(entry),
                          "owned_by": _owned_by(name)})


async def list_tags(request: web.Request) -> web.Response:
    svc, principal = await _listing_principal(request)
    return json_response({"models": _effective_entries(svc, principal)})


async def version(request: web.Request) -> web.Response:
    svc, _ = await _listing_principal(request)
    await svc.breaker.before_call()
    try:
        data = await svc.backend.version()
    except UpstreamUnavailable:
        await svc.breaker.record(False)
        raise
    await svc.breaker.record(True)
    return json_response({"version": str(data.get("version", ""))})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    states = await request.app[SERVICES].readiness()
    ready = all(v == "ok" for v in states.values())
    return json_response({"status": "ready" if ready else "unavailable", **states}, 200 if ready else 503)


def setup_routes(app: web.Application) -> None:
    for path in OPERATIONS:
        app.router.add_post(path, proxy)
    app.router.add_get("/v1/models", list_models_openai, allow_head=False)
    app.router.add_get("/v1/models/{model_id:.+}", retrieve_model_openai, allow_head=False)
    app.router.add_get("/api/tags", list_tags, allow_head=False)
    app.router.add_get("/api/version", version, allow_head=False)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
