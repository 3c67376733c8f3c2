"""The per-replica circuit gate the handlers call around every upstream request (SPEC §4.8)."""

from __future__ import annotations

from gateway_core.breaker import Breaker, CircuitState
from gateway_core.errors import UpstreamUnavailable
from gateway_core.ports import Clock


class CircuitGate:
    """In-process on purpose: each replica judges the upstream by what it sees itself, and asyncio
    runs one transition at a time, so concurrent requests share one consistent state."""

    def __init__(self, threshold: int, reset_s: float, clock: Clock) -> None:
        self._breaker = Breaker(threshold=threshold, reset_s=reset_s)
        self._clock = clock

    def state(self) -> CircuitState:
        return self._breaker.state(self._clock.now())

    async def before_call(self) -> None:
        now = self._clock.now()
        allowed, self._breaker = self._breaker.admit(now)
        if not allowed:
            wait = self._breaker.seconds_to_half_open(now)
            raise UpstreamUnavailable(
                "The model backend is failing; requests are paused until it recovers.",
                retry_after_s=max(wait, 1.0))

    def seconds_to_half_open(self) -> float:
        return self._breaker.seconds_to_half_open(self._clock.now())

    async def record(self, ok: bool) -> None:
        self._breaker = self._breaker.on_success() if ok else self._breaker.on_failure(self._clock.now())
