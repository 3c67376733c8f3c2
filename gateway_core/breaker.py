"""Circuit breaker over the upstream (SPEC §4.8): pure state, transitions by `attrs.evolve`.

closed --(threshold consecutive failures)--> open --(reset_s elapsed)--> half-open
half-open --(probe succeeds)--> closed;  half-open --(probe fails)--> open
"""

from __future__ import annotations

import enum

from attrs import evolve, field, frozen
from attrs.validators import ge


class CircuitState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@frozen
class Breaker:
    threshold: int = field(validator=ge(1))
    reset_s: float = field(validator=ge(0))
    failures: int = 0
    opened_at: float | None = None
    probe_started: float | None = None

    def state(self, now: float) -> CircuitState:
        if self.opened_at is None:
            return CircuitState.CLOSED
        if now - self.opened_at >= self.reset_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def seconds_to_half_open(self, now: float) -> float:
        return 0.0 if self.opened_at is None else max(0.0, self.opened_at + self.reset_s - now)

    def admit(self, now: float) -> tuple[bool, Breaker]:
        """(may call upstream, next state). Half-open lets exactly one probe through at a time."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True, self
        # A probe whose answer never came (its caller vanished) does not block the next one forever.
        if state is CircuitState.OPEN or (
                self.probe_started is not None and now - self.probe_started < max(self.reset_s, 1.0)):
            return False, self
        return True, evolve(self, probe_started=now)

    def on_success(self) -> Breaker:
        return evolve(self, failures=0, opened_at=None, probe_started=None)

    def on_failure(self, now: float) -> Breaker:
        if self.opened_at is not None:
            return evolve(self, failures=self.failures + 1, opened_at=now, probe_started=None)
        failures = self.failures + 1
        if failures >= self.threshold:
            return evolve(self, failures=failures, opened_at=now)
        return evolve(self, failures=failures)
