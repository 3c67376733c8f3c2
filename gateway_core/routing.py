"""Which backend serves a request (SPEC §4.10): pure rules over breakers and in-flight counts.

A backend is a candidate when it has the model; it may be called when both its own breaker
(connection errors, timeouts) and the breaker of the model on it (5xx answers) admit the call.
Of those, the one with the fewest requests in flight wins; ties go round-robin by `turn`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from attrs import evolve, frozen

from gateway_core.breaker import Breaker


class Outcome(enum.Enum):
    """How one upstream call ended, for the breakers (SPEC §4.8, §4.10)."""

    OK = "ok"  # any answer the backend gave about the model without failing (2xx, 4xx)
    BACKEND_FAILED = "backend_failed"  # connection error or timeout: the backend's fault
    MODEL_FAILED = "model_failed"  # a 5xx answer (or a broken stream) about this model


@frozen
class Lane:
    """One backend as seen for one model: its index, requests in flight, and both breakers."""

    index: int
    in_flight: int
    backend: Breaker
    model: Breaker

    def admits(self, now: float) -> bool:
        return self.backend.admit(now)[0] and self.model.admit(now)[0]

    def seconds_to_half_open(self, now: float) -> float:
        """Until both breakers would let a call through again (0 when they do now)."""
        return max(self.backend.seconds_to_half_open(now), self.model.seconds_to_half_open(now))

    def taken(self, now: float) -> Lane:
        """This lane after a call was admitted: a half-open breaker has sent its one probe."""
        return evolve(self, in_flight=self.in_flight + 1, backend=self.backend.admit(now)[1],
                      model=self.model.admit(now)[1])

    def after(self, outcome: Outcome, now: float) -> Lane:
        """Breakers after a call ended. A 5xx answer shows the backend is alive, so it counts as a
        success for the backend and a failure only for the model; a connection failure says nothing
        about the model, so its breaker is left as it was."""
        if outcome is Outcome.OK:
            return evolve(self, backend=self.backend.on_success(), model=self.model.on_success())
        if outcome is Outcome.MODEL_FAILED:
            return evolve(self, backend=self.backend.on_success(), model=self.model.on_failure(now))
        return evolve(self, backend=self.backend.on_failure(now))


def least_busy(in_flight: Sequence[int], turn: int) -> int:
    """The position of the smallest count; ties are taken in turn (round-robin by *turn*)."""
    least = min(in_flight)
    ties = [i for i, n in enumerate(in_flight) if n == least]
    return ties[turn % len(ties)]


def choose(lanes: Sequence[Lane], now: float, turn: int) -> Lane | None:
    """The lane to call, already `taken`; None when every candidate's circuit is open."""
    open_lanes = [lane for lane in lanes if lane.admits(now)]
    if not open_lanes:
        return None
    return open_lanes[least_busy([lane.in_flight for lane in open_lanes], turn)].taken(now)


def soonest_half_open(lanes: Sequence[Lane], now: float) -> float:
    """Seconds until the first of *lanes* may be called again (the 502's Retry-After)."""
    return min((lane.seconds_to_half_open(now) for lane in lanes), default=0.0)
