"""The Upstream port over one or more Ollama servers (SPEC §4.8, §4.10): routing, breakers, in-flight.

In-process on purpose: each replica judges the backends by what it sees itself (breaker state and
in-flight counts are per replica), and asyncio runs one transition at a time, so concurrent
requests share one consistent state. The rules themselves are gateway_core.routing's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import Any

from adapters.ollama import OllamaAnswer, OllamaBackend
from adapters.upstream_http import UpstreamExchange
from gateway_core.breaker import Breaker, CircuitState
from gateway_core.errors import UpstreamUnavailable
from gateway_core.ports import Clock
from gateway_core.routing import Lane, Outcome, choose, least_busy, soonest_half_open

# Which backends have a model (indexes), or None when that is not known (then: all of them).
Holders = Callable[[str], Collection[int] | None]
# Told about every upstream call that ended: (backend index, outcome).
OutcomeHook = Callable[[int, Outcome], None]
_PAUSED = "The model backend is failing; requests are paused until it recovers."


def _everywhere(model: str) -> None:
    return None


def _ignore(index: int, outcome: Outcome) -> None:
    return None


class BackendRouter:
    def __init__(self, backends: Sequence[OllamaBackend], threshold: int, reset_s: float, clock: Clock,
                 *, holders: Holders = _everywhere, on_outcome: OutcomeHook = _ignore) -> None:
        if not backends:
            raise ValueError("at least one backend")
        self.backends = tuple(backends)
        self._closed = Breaker(threshold=threshold, reset_s=reset_s)
        self._breakers = [self._closed] * len(backends)
        # Only models that failed get an entry; model names come from discovery, so this stays small.
        self._model_breakers: dict[tuple[int, str], Breaker] = {}
        self._in_flight = [0] * len(backends)
        self._turn = 0
        self._clock = clock
        self._holders = holders
        self._on_outcome = on_outcome

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Requests in flight from this replica, by backend index."""
        return tuple(self._in_flight)

    def states(self) -> list[CircuitState]:
        """Each backend's own circuit (model circuits not included), by index."""
        now = self._clock.now()
        return [b.state(now) for b in self._breakers]

    def open_model_circuits(self) -> list[int]:
        """Per backend index, how many of its models' circuits are not closed."""
        now = self._clock.now()
        counts = [0] * len(self.backends)
        for (index, _), breaker in self._model_breakers.items():
            counts[index] += breaker.state(now) is not CircuitState.CLOSED
        return counts

    def state(self) -> CircuitState:
        """The best backend circuit: closed while any backend is closed."""
        return min(self.states())

    def _lane(self, index: int, model: str) -> Lane:
        return Lane(index, self._in_flight[index], self._breakers[index],
                    self._model_breakers.get((index, model), self._closed))

    def lane(self, model: str, avoid: frozenset[int] = frozenset()) -> OllamaLane:
        """The Upstream port (gateway_core.ports.Upstream)."""
        holders = self._holders(model)
        indexes = [i for i in (range(len(self.backends)) if holders is None else sorted(holders))
                   if i not in avoid and i < len(self.backends)]
        if indexes and self._all_closed(indexes, model):
            # The common case, kept cheap: every circuit is closed and has seen no failure, so the
            # rules reduce to "least busy, ties in turn" and no breaker changes (same result as below).
            index = indexes[least_busy([self._in_flight[i] for i in indexes], self._turn)]
            self._turn += 1
            self._in_flight[index] += 1
            return OllamaLane(self, index, model)
        lanes = [self._lane(i, model) for i in indexes]
        now = self._clock.now()
        picked = choose(lanes, now, self._turn)
        if picked is None:
            raise UpstreamUnavailable(_PAUSED, retry_after_s=max(soonest_half_open(lanes, now), 1.0))
        self._turn += 1
        self._store(picked, model)
        return OllamaLane(self, picked.index, model)

    def _all_closed(self, indexes: list[int], model: str) -> bool:
        breakers = self._breakers
        closed = self._closed
        if any(breakers[i] is not closed for i in indexes):
            return False
        return not self._model_breakers or all((i, model) not in self._model_breakers for i in indexes)

    def _store(self, lane: Lane, model: str) -> None:
        self._in_flight[lane.index] = lane.in_flight
        self._set_backend(lane.index, lane.backend)
        key = (lane.index, model)
        if lane.model == self._closed:
            self._model_breakers.pop(key, None)
        else:
            self._model_breakers[key] = lane.model

    def _set_backend(self, index: int, breaker: Breaker) -> None:
        # The pristine breaker is kept as the one shared object, which the fast paths test by identity.
        self._breakers[index] = self._closed if breaker == self._closed else breaker

    def finished(self, index: int) -> None:
        self._in_flight[index] -= 1

    def record(self, index: int, model: str, outcome: Outcome) -> None:
        # A success on circuits that have seen no failure changes nothing: skip the bookkeeping.
        if not (outcome is Outcome.OK and self._breakers[index] is self._closed
                and (index, model) not in self._model_breakers):
            self._store(self._lane(index, model).after(outcome, self._clock.now()), model)
        self._on_outcome(index, outcome)

    def seconds_to_half_open(self, index: int, model: str) -> float:
        return self._lane(index, model).seconds_to_half_open(self._clock.now())

    async def version(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """`/api/version` from the first backend that answers, least busy first (SPEC §4.10)."""
        now = self._clock.now()
        order = sorted(range(len(self.backends)), key=lambda i: (self._in_flight[i], i))
        failure: UpstreamUnavailable | None = None
        for index in order:
            allowed, breaker = self._breakers[index].admit(now)
            self._set_backend(index, breaker)
            if not allowed:
                continue
            try:
                data = await self.backends[index].version(timeout_s)
            except UpstreamUnavailable as exc:
                self._set_backend(index, self._breakers[index].on_failure(self._clock.now()))
                self._on_outcome(index, Outcome.BACKEND_FAILED)
                failure = exc
                continue
            self._set_backend(index, self._breakers[index].on_success())
            self._on_outcome(index, Outcome.OK)
            return data
        wait = min(b.seconds_to_half_open(self._clock.now()) for b in self._breakers)
        if failure is not None:
            failure.retry_after_s = max(failure.retry_after_s or 1.0, wait)
            raise failure
        raise UpstreamUnavailable(_PAUSED, retry_after_s=max(wait, 1.0))


class OllamaLane:
    """One backend picked for one request (gateway_core.ports.UpstreamLane)."""

    def __init__(self, router: BackendRouter, index: int, model: str) -> None:
        self._router = router
        self.index = index
        self._model = model

    def post(self, path: str, body: bytes) -> _LanePost:
        try:
            exchange = self._router.backends[self.index].open("POST", path, body)
        except BaseException:
            self._router.finished(self.index)
            raise
        return _LanePost(self._router, self.index, exchange)

    async def record(self, outcome: Outcome) -> None:
        self._router.record(self.index, self._model, outcome)

    def seconds_to_half_open(self) -> float:
        return self._router.seconds_to_half_open(self.index, self._model)


class _LanePost:
    """The upstream exchange of one lane; its slot in the least-busy count is given back however it
    ends. A class rather than a generator-based context manager: it is on every request's path."""

    def __init__(self, router: BackendRouter, index: int, exchange: UpstreamExchange) -> None:
        self._router = router
        self._index = index
        self._exchange = exchange

    async def __aenter__(self) -> OllamaAnswer:
        try:
            return OllamaAnswer(await self._exchange.__aenter__())
        except BaseException:
            self._router.finished(self._index)
            raise

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._exchange.__aexit__(kind, exc, tb)
        finally:
            self._router.finished(self._index)
