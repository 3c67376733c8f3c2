"""The one GatewayError → HTTP status table (SPEC §3.3) and the error body every route shares."""

from __future__ import annotations

import json
import math

from aiohttp import web

from gateway_core.errors import (
    BudgetExhausted,
    DependencyUnavailable,
    GatewayError,
    InvalidApiKey,
    InvalidRequest,
    ModelNotAllowed,
    NotFound,
    RateLimitExceeded,
    RequestTooLarge,
    ScopeNotAllowed,
    UpstreamUnavailable,
)

_STATUS: dict[type[GatewayError], int] = {
    InvalidRequest: 400, InvalidApiKey: 401, ModelNotAllowed: 403, ScopeNotAllowed: 403,
    NotFound: 404, RequestTooLarge: 413, RateLimitExceeded: 429, BudgetExhausted: 429,
    UpstreamUnavailable: 502, DependencyUnavailable: 503,
}


def status_of(exc: GatewayError) -> int:
    return next((_STATUS[c] for c in type(exc).__mro__ if c in _STATUS), 500)


def error_payload(exc: GatewayError) -> dict[str, object]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def error_bytes(exc: GatewayError) -> bytes:
    return json.dumps(error_payload(exc), separators=(",", ":")).encode()


def error_headers(exc: GatewayError, status: int) -> dict[str, str]:
    headers = dict(exc.headers)
    retry_after_s = exc.retry_after_s
    if retry_after_s is None and status == 502:
        retry_after_s = 1.0  # SPEC §3.4: every 502 says when to come back
    if status in (429, 502, 503) and retry_after_s is not None:
        wait = max(retry_after_s, 0.0)
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
    if exc.should_retry is not None:
        headers["x-should-retry"] = "true" if exc.should_retry else "false"
    return headers


def error_response(exc: GatewayError) -> web.Response:
    status = status_of(exc)
    return web.Response(body=error_bytes(exc), status=status, content_type="application/json",
                        headers=error_headers(exc, status))
