"""Per-request state that every response, log event, audit row and metric is made from."""

from __future__ import annotations

import re
import time
from typing import Protocol

from aiohttp import web
from attrs import define, field

from gateway_core.ids import new_id
from gateway_core.models import Principal

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_for(request: web.Request) -> str:
    """The caller's X-Request-Id when well-formed (so it can correlate), else a fresh one."""
    given = request.headers.get("X-Request-Id")
    # A key pasted into the wrong header must not end up in the audit log or in our answer.
    if given and _REQUEST_ID_RE.match(given) and "nz_" not in given:
        return given
    return new_id()


@define
class Exchange:
    request_id: str
    route: str
    client_ip: str
    started: float = field(factory=time.perf_counter)
    principal: Principal | None = None
    model: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    status: int = 0
    headers: dict[str, str] = field(factory=dict)
    prompt_text: str | None = None
    response_text: str | None = None
    audited: bool = True
    # The model as the caller named it (first 200 characters), for the audit row of a request
    # refused before a model resolved; never a metric label.
    requested_model: str | None = None
    # For a 503: which dependency refused and the class of its error (logged, never shown).
    dependency: str | None = None
    # The response once the handler started writing it (a stream, or a complete answer written
    # before its settlement finished): after that, an error can only end it, never
    # replace it with a second response on the same connection.
    stream: web.StreamResponse | None = None

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


class Observer(Protocol):
    """Audit row, log event, metrics and prompt log for one finished exchange (SPEC §8)."""

    def finish(self, exchange: Exchange) -> None: ...
