"""size → authenticate → parse → authorize, then the core's forward-and-settle (SPEC §4.1); framing here.

Authentication runs before the body is parsed: an address blocked for failed attempts, and any
caller without a working key, costs no parse (the block check runs inside authentication for keys
not already verified, so a good cached key pays no extra Redis round trip).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from aiohttp import web

from adapters.http.exchange import Exchange
from adapters.http.relay import ClientGone, end_with_error, relay_ndjson, relay_sse
from adapters.http.typedefs import EXCHANGE, SERVICES, Services, json_response
from gateway_core.errors import (
    DependencyUnavailable,
    InternalError,
    InvalidRequest,
    ModelNotAllowed,
    ModelNotFound,
    RequestTooLarge,
    ScopeNotAllowed,
)
from gateway_core.forwarding import Answer, Relayed
from gateway_core.metering import Grant
from gateway_core.models import Principal
from gateway_core.ports import UpstreamAnswer
from gateway_core.request import ROUTES, CallerRequest, Framing, Route, parse_request

# Bodies above this are parsed in a worker thread so a large one does not stall other callers
# (docs/performance.md has the measurement); below it the hop costs more than the parse.
PARSE_OFF_LOOP_BYTES = 64 * 1024


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge()
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLarge() from None


async def parse(route: Route, raw: bytes) -> CallerRequest:
    if len(raw) > PARSE_OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_request, route, raw)
    return parse_request(route, raw)


async def _principal(request: web.Request) -> tuple[Services, Principal]:
    svc = request.app[SERVICES]
    ex: Exchange = request[EXCHANGE]
    ex.principal = await svc.auth.authenticate(request.headers.get("Authorization"), ex.client_ip)
    return svc, ex.principal


async def _listing_principal(request: web.Request) -> tuple[Services, Principal]:
    """Listings and version use no admission, so Redis is confirmed separately (SPEC §8.5); their
    rate and budget headers are read without consuming anything (SPEC §3.4)."""
    svc, principal = await _principal(request)
    await svc.confirm_redis()
    request[EXCHANGE].headers.update(await svc.metering.current_headers(principal))
    return svc, principal


async def _current_headers(svc: Services, ex: Exchange, principal: Principal) -> None:
    """§3.4 headers for a refusal after authentication. The refusal is the answer: if Redis cannot
    be read just now, it goes out without them rather than turning into a 503."""
    try:
        ex.headers.update(await svc.metering.current_headers(principal))
    except DependencyUnavailable:
        pass


class _StreamOut(web.StreamResponse):
    """A relayed stream's response. Its headers go out with its first bytes instead of in a write of
    their own: the upstream's first chunk arrives with its own headers, so the caller waits no
    longer, and a short stream is a single write (headers, frames and the end of the body).
    The switch is aiohttp's own (web.Response sets it too); without it only a write is lost."""

    _send_headers_immediately = False


class HttpDelivery:
    """The core's Delivery over one aiohttp request: headers, stream framing, what the audit needs."""

    def __init__(self, request: web.Request, ex: Exchange, caller: CallerRequest) -> None:
        self._request = request
        self._ex = ex
        self._caller = caller
        self.response: web.StreamResponse | None = None

    def admitted(self, grant: Grant) -> None:
        self._ex.headers.update(grant.headers)

    def charged(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._ex.tokens_in, self._ex.tokens_out = prompt_tokens, completion_tokens

    async def deliver(self, answer: Answer) -> None:
        """The answer is written here, not after the handler returns, so the settlement's Redis
        round trip overlaps the caller reading it instead of delaying it."""
        ex = self._ex
        if answer.text is not None:
            ex.response_text = answer.text
        out = web.Response(body=answer.body, content_type="application/json",
                           headers={**ex.headers, "X-Request-Id": ex.request_id})
        self.response = ex.stream = out
        try:
            await out.prepare(self._request)
            await out.write_eof()
        except ConnectionError:
            ex.status = 499  # charged all the same: the model did the work
            return
        # Delivered: a caller that hangs up while the settlement finishes still got its answer.
        ex.status = 200

    async def relay(self, answer: UpstreamAnswer, relayed: Relayed) -> None:
        ex = self._ex
        sse = self._caller.route.framing is Framing.OPENAI
        out = _StreamOut(status=200, headers={
            **ex.headers, "X-Request-Id": ex.request_id, "Cache-Control": "no-cache",
            "Content-Type": "text/event-stream" if sse else "application/x-ndjson"})
        self.response = ex.stream = out
        if ex.prompt_text is not None:
            relayed.text = []
        try:
            await out.prepare(self._request)
            if sse:
                await relay_sse(answer, out, relayed, caller_wants_usage=self._caller.wants_usage)
            else:
                await relay_ndjson(answer, out, relayed)
            await out.write_eof()
        except (ClientGone, ConnectionError):
            relayed.client_gone = True
        except asyncio.CancelledError:
            relayed.client_gone = True
            raise
        except Exception:
            # A fault of ours mid-stream: the caller gets the route's error frame rather than a silent
            # end; the middleware logs and audits it as a 500, the use case settles what was relayed.
            if out.prepared:
                await end_with_error(out, InternalError(), sse=sse)
            raise
        finally:
            if relayed.text is not None:
                ex.response_text = "".join(relayed.text)
            # Everything the audit needs is set before any await: a cancelled caller interrupts it.
            ex.status = 502 if relayed.failed else 499 if relayed.client_gone else 200


async def proxy(request: web.Request) -> web.StreamResponse:
    route = ROUTES[request.path]
    svc = request.app[SERVICES]
    ex: Exchange = request[EXCHANGE]
    raw = await _read_body(request, svc.max_request_bytes)
    svc, principal = await _principal(request)
    try:
        caller = await parse(route, raw)
        ex.requested_model = caller.model[:200]
        ex.model = svc.policy.authorize(principal, route.scope, caller.model)
    except (InvalidRequest, ModelNotAllowed, ScopeNotAllowed):
        await _current_headers(svc, ex, principal)
        raise
    if principal.prompt_log_enabled:
        ex.prompt_text = caller.prompt_text()
    delivery = HttpDelivery(request, ex, caller)
    assert svc.forwarding is not None
    await svc.forwarding.forward(principal, caller, ex.model, delivery, want_text=ex.prompt_text is not None)
    assert delivery.response is not None
    return delivery.response


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
    data = await svc.upstream.version()
    return json_response({"version": str(data.get("version", ""))})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, states = await request.app[SERVICES].readiness()
    return json_response({"status": "ready" if ready else "unavailable", **states}, 200 if ready else 503)


def setup_routes(app: web.Application) -> None:
    for path in ROUTES:
        app.router.add_post(path, proxy)
    app.router.add_get("/v1/models", list_models_openai, allow_head=False)
    app.router.add_get("/v1/models/{model_id:.+}", retrieve_model_openai, allow_head=False)
    app.router.add_get("/api/tags", list_tags, allow_head=False)
    app.router.add_get("/api/version", version, allow_head=False)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
