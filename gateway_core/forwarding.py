"""The forward-and-settle use case (SPEC §4.1 from admission on, §4.8, §4.10, §6.2).

Admit → a backend for the model (breakers, least busy) → upstream call → settle on an answer,
charge the prompt when the caller hangs up while the model works, release on every other path.
Each grant is settled or released exactly once, whatever ends the request (error, cancellation,
client gone), and the admission itself is shielded: a caller cancelled while it is in flight still
gets its reservation returned. The transport's framing (SSE, NDJSON, HTTP) stays in the adapter,
behind `Delivery`.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Protocol

from attrs import define, frozen

from gateway_core.answers import answer_text, embedding_usage, safe_upstream_message, usage_of
from gateway_core.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotAllowed,
    UpstreamUnavailable,
    UpstreamUnreachable,
)
from gateway_core.metering import Grant, Metering
from gateway_core.models import Principal
from gateway_core.ports import Upstream, UpstreamAnswer, UpstreamLane
from gateway_core.request import CallerRequest, Kind
from gateway_core.routing import Outcome
from gateway_core.tokens import estimate_chunks


@define
class Relayed:
    """What a stream relay got through so far; filled in as it goes, read whatever ends it."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    completed: bool = False
    failed: bool = False  # the upstream broke off or sent an error
    client_gone: bool = False
    text: list[str] | None = None


@frozen
class Answer:
    """A complete (non-stream) answer, charged already; `body` goes to the caller untouched."""

    body: bytes
    text: str | None


class Delivery(Protocol):
    """The transport side of one request: it frames, the use case decides."""

    def admitted(self, grant: Grant) -> None:
        """The grant's headers belong on whatever response follows."""
        ...

    def charged(self, prompt_tokens: int, completion_tokens: int) -> None:
        """What the request is charged; called before the settlement is awaited."""
        ...

    async def relay(self, answer: UpstreamAnswer, relayed: Relayed) -> None:
        """Relay a stream to the caller, recording progress in *relayed*."""
        ...

    async def deliver(self, answer: Answer) -> None:
        """Send a complete answer to the caller (its settlement is already on its way)."""
        ...


class Forwarding:
    def __init__(self, metering: Metering, upstream: Upstream) -> None:
        self._metering = metering
        self._upstream = upstream
        self._orphans: set[asyncio.Task[None]] = set()

    async def admit(self, principal: Principal, request: CallerRequest) -> Grant:
        """Admission, shielded from cancellation: if the caller is gone by the time the decision
        returns, the grant is released at once instead of holding its slot until the lease expires."""
        task = asyncio.ensure_future(self._metering.admit(principal, request.prompt_estimate, request.cap))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_orphan)
            raise

    def _release_orphan(self, task: asyncio.Future[Grant]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        release = asyncio.ensure_future(self._metering.release(task.result()))
        self._orphans.add(release)
        release.add_done_callback(self._orphans.discard)

    async def forward(self, principal: Principal, request: CallerRequest, model: str,
                      delivery: Delivery, *, want_text: bool = False) -> None:
        """Relay or deliver the answer through *delivery*; raises the §3.3 error otherwise."""
        grant = await self.admit(principal, request)
        delivery.admitted(grant)
        sent = False
        lane: UpstreamLane | None = None
        try:
            body = request.upstream_body(model, grant.completion_cap)
            sent = True
            async with AsyncExitStack() as stack:
                lane, answer = await self._connect(stack, model, request.route.path, body)
                if answer.status != 200:
                    raise await self._failure(lane, answer)
                await lane.record(Outcome.OK)
                if request.stream:
                    await self._stream(lane, grant, answer, delivery)
                else:
                    await self._complete(grant, request, answer, delivery, want_text)
        except UpstreamUnavailable as exc:
            if lane is not None:
                if exc.__cause__ is not None:
                    await lane.record(Outcome.BACKEND_FAILED)
                # If this failure opened the circuit, the honest wait is until it half-opens.
                exc.retry_after_s = max(exc.retry_after_s or 1.0, lane.seconds_to_half_open())
            raise
        except asyncio.CancelledError:
            # The caller hung up while the model was working: its prompt was processed, so charge it.
            if sent and not grant.settled:
                self._settle(grant, delivery, grant.ticket.prompt_tokens, 0)
            raise
        finally:
            if not grant.settled:
                # Shielded: a caller who hangs up must not leave its slot and reservation taken.
                await asyncio.shield(self._metering.release(grant))

    async def _connect(self, stack: AsyncExitStack, model: str, path: str, body: bytes
                       ) -> tuple[UpstreamLane, UpstreamAnswer]:
        """An answer from a backend with *model*. A connection that failed before anything was
        sent is tried once more on another backend (SPEC §4.10); nothing else is ever resent."""
        failed: UpstreamUnavailable | None = None
        avoid: frozenset[int] = frozenset()
        while True:
            try:
                lane = self._upstream.lane(model, avoid)
            except UpstreamUnavailable:
                if failed is not None:
                    raise failed from failed.__cause__
                raise
            try:
                return lane, await stack.enter_async_context(lane.post(path, body))
            except UpstreamUnavailable as exc:
                await lane.record(Outcome.BACKEND_FAILED)
                exc.retry_after_s = max(exc.retry_after_s or 1.0, lane.seconds_to_half_open())
                if failed is not None or not isinstance(exc, UpstreamUnreachable):
                    raise
                failed, avoid = exc, frozenset({lane.index})

    async def _failure(self, lane: UpstreamLane, answer: UpstreamAnswer) -> GatewayError:
        """Map an upstream status to §3.3; the upstream body itself is never passed through."""
        status = answer.status
        if status >= 500:
            await lane.record(Outcome.MODEL_FAILED)  # this model's breaker; others keep answering
            return UpstreamUnavailable(retry_after_s=1.0)
        await lane.record(Outcome.OK)  # a 4xx answer means the upstream is alive (SPEC §4.8)
        if status == 404:
            return ModelNotAllowed()
        if status == 400:
            message = safe_upstream_message(await answer.error_message())
            if message is not None:
                return InvalidRequest(f"The model backend rejected the request: {message}")
            return InvalidRequest("The model backend rejected the request as invalid.")
        return UpstreamUnavailable(retry_after_s=1.0)

    async def _complete(self, grant: Grant, request: CallerRequest, answer: UpstreamAnswer,
                        delivery: Delivery, want_text: bool) -> None:
        raw = await answer.read()
        route = request.route
        text: str | None = None
        if route.kind is Kind.EMBEDDING:
            usage = embedding_usage(route, raw)
        else:
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise UpstreamUnavailable(retry_after_s=1.0) from None
            usage = usage_of(route, parsed)
            if want_text:
                text = answer_text(parsed)
        prompt, completion = usage or (grant.ticket.prompt_tokens, 0)
        # The caller does not wait for Redis: the charge is in the ledger now and the Redis half is
        # queued before this loop reads anything new, so the key's next admission (which can only
        # arrive after this answer) is sent to Redis after it (SPEC §6.2).
        self._settle(grant, delivery, prompt, completion)
        await delivery.deliver(Answer(raw, text))

    async def _stream(self, lane: UpstreamLane, grant: Grant, answer: UpstreamAnswer,
                      delivery: Delivery) -> None:
        relayed = Relayed()
        try:
            await delivery.relay(answer, relayed)
        finally:
            # Charged: the upstream's count when it arrived, else the prompt estimate and one token
            # per relayed chunk (SPEC §6.2), also for streams cut by the caller or by the upstream.
            prompt = (relayed.prompt_tokens if relayed.prompt_tokens is not None
                      else grant.ticket.prompt_tokens)
            completion = (relayed.completion_tokens if relayed.completion_tokens is not None
                          else estimate_chunks(relayed.chunks))
            # Settled first: a caller cancelled while the breaker records must not lose the charge.
            self._settle(grant, delivery, prompt, completion)
            if relayed.failed:
                await lane.record(Outcome.MODEL_FAILED)

    def _settle(self, grant: Grant, delivery: Delivery, prompt: int, completion: int) -> None:
        """Charged now (ledger), the Redis half on its way; nothing here can be cancelled midway."""
        delivery.charged(prompt, completion)
        self._metering.settle_soon(grant, prompt, completion)
