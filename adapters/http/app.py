"""The aiohttp application: routes, the request middleware, and the services handlers use."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from attrs import define, field

from adapters.circuit import CircuitGate
from adapters.http.client_address import TrustedProxies, client_address_of
from adapters.http.errors import error_response
from adapters.http.exchange import Exchange, Observer, request_id_for
from adapters.ollama import OllamaBackend
from gateway_core.errors import GatewayError, InvalidRequest, NotFound, RequestTooLarge
from gateway_core.gateway import Authenticator, ModelPolicy
from gateway_core.metering import Metering


@define
class Services:
    auth: Authenticator
    policy: ModelPolicy
    metering: Metering
    backend: OllamaBackend
    observer: Observer
    readiness: Callable[[], Awaitable[dict[str, str]]]
    breaker: CircuitGate
    max_request_bytes: int
    # Routes that need no Redis command of their own call this, so they fail closed as well.
    confirm_redis: Callable[[], Awaitable[None]]
    trusted_proxies: TrustedProxies = field(factory=TrustedProxies)


SERVICES = web.AppKey("services", Services)
EXCHANGE = web.RequestKey("exchange", Exchange)
_UNAUDITED = frozenset({"/healthz", "/readyz"})


@web.middleware
async def exchange_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every response gets X-Request-Id and the §3.3 error shape; every caller request is observed."""
    ex = Exchange(request_id=request_id_for(request), route=request.path,
                  client_ip=client_address_of(request, request.app[SERVICES].trusted_proxies))
    ex.audited = request.match_info.route.resource is not None and request.path not in _UNAUDITED
    request[EXCHANGE] = ex
    try:
        resp = await handler(request)
    except GatewayError as exc:
        resp = error_response(exc)
    except web.HTTPException as exc:
        resp = error_response(_from_http(exc))
    except asyncio.CancelledError:
        ex.status = ex.status or 499
        _finish(request, ex)
        raise
    if not resp.prepared:
        resp.headers["X-Request-Id"] = ex.request_id
        for name, value in ex.headers.items():
            resp.headers.setdefault(name, value)
    ex.status = ex.status or resp.status
    _finish(request, ex)
    return resp


def _finish(request: web.Request, ex: Exchange) -> None:
    if ex.audited:
        request.app[SERVICES].observer.finish(ex)


def _from_http(exc: web.HTTPException) -> GatewayError:
    if exc.status == 413:
        return RequestTooLarge()
    if exc.status in (404, 405):
        return NotFound()
    return InvalidRequest(exc.reason)


def make_web_app(max_request_bytes: int) -> web.Application:
    from adapters.http import handlers

    app = web.Application(middlewares=[exchange_middleware], client_max_size=max_request_bytes,
                          handler_args={"max_field_size": 16384})
    handlers.setup_routes(app)
    return app


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")
