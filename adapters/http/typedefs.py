"""What the app, its middleware and the handlers share; its own module so neither imports the other."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from attrs import define, field

from adapters.circuit import BackendRouter
from adapters.http.client_address import TrustedProxies
from adapters.http.exchange import Exchange, Observer
from gateway_core.forwarding import Forwarding
from gateway_core.gateway import Authenticator, ModelPolicy
from gateway_core.metering import Metering


@define
class Services:
    auth: Authenticator
    policy: ModelPolicy
    metering: Metering
    observer: Observer
    # (ready, each dependency's state): the composition root knows which states must be "ok".
    readiness: Callable[[], Awaitable[tuple[bool, dict[str, str]]]]
    upstream: BackendRouter
    max_request_bytes: int
    # Routes that need no Redis command of their own call this, so they fail closed as well.
    confirm_redis: Callable[[], Awaitable[None]]
    forwarding: Forwarding | None = None
    trusted_proxies: TrustedProxies = field(factory=TrustedProxies)

    def __attrs_post_init__(self) -> None:
        if self.forwarding is None:
            self.forwarding = Forwarding(self.metering, self.upstream)


SERVICES = web.AppKey("services", Services)
EXCHANGE = web.RequestKey("exchange", Exchange)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")
