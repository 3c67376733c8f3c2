"""The aiohttp application: routes and the request middleware every response passes through."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from adapters.http import handlers
from adapters.http.client_address import client_address_of
from adapters.http.errors import error_response
from adapters.http.exchange import Exchange, request_id_for
from adapters.http.typedefs import EXCHANGE, SERVICES, Services, json_response
from gateway_core.errors import (
    DependencyUnavailable,
    GatewayError,
    InternalError,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
)

__all__ = ["EXCHANGE", "SERVICES", "Services", "exchange_middleware", "json_response", "make_web_app"]

_log = structlog.get_logger("neuronetz.request")
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
        if isinstance(exc, DependencyUnavailable):
            ex.dependency = f"{exc.dependency or 'unknown'}:{exc.error_class or type(exc).__name__}"
        resp = error_response(exc)
    except web.HTTPException as exc:
        resp = error_response(_from_http(exc))
    except asyncio.CancelledError:
        ex.status = ex.status or 499
        _finish(request, ex)
        raise
    except Exception as exc:
        # Anything unexpected: the §3.3 shape, one log event with the traceback (the log pipeline
        # redacts secrets), and the audit row below. Never a framework's plain-text page.
        _log.error("internal_error", request_id=ex.request_id, route=ex.route, error=type(exc).__name__,
                   exc_info=exc)
        resp = error_response(InternalError())
        ex.status = 500
    if ex.stream is not None and ex.stream.prepared and resp is not ex.stream:
        # The stream's status and headers are on the wire already: it stays the response (it was
        # ended with an error frame), and the audit keeps the status decided above.
        ex.status = ex.status or resp.status
        resp = ex.stream
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
    app = web.Application(middlewares=[exchange_middleware], client_max_size=max_request_bytes,
                          handler_args={"max_field_size": 16384})
    handlers.setup_routes(app)
    return app
