from __future__ import annotations

from gateway_core.breaker import Breaker, CircuitState
from gateway_core.routing import Lane, Outcome, choose, soonest_half_open

CLOSED = Breaker(threshold=2, reset_s=30)


def lane(index: int, in_flight: int = 0, backend: Breaker = CLOSED, model: Breaker = CLOSED) -> Lane:
    return Lane(index, in_flight, backend, model)


def opened(at: float) -> Breaker:
    return CLOSED.on_failure(at).on_failure(at)


class TestChoose:
    def test_the_least_busy_backend_wins(self) -> None:
        picked = choose([lane(0, 3), lane(1, 1), lane(2, 2)], now=0, turn=0)
        assert picked is not None and picked.index == 1 and picked.in_flight == 2

    def test_ties_go_round_robin(self) -> None:
        lanes = [lane(0, 1), lane(1, 0), lane(2, 0)]
        picks = [choose(lanes, now=0, turn=t) for t in range(4)]
        assert [p.index for p in picks if p] == [1, 2, 1, 2]

    def test_an_open_backend_is_skipped_even_when_idle(self) -> None:
        picked = choose([lane(0, 0, backend=opened(0)), lane(1, 5)], now=1, turn=0)
        assert picked is not None and picked.index == 1

    def test_an_open_model_breaker_skips_only_that_backend_for_that_model(self) -> None:
        lanes = [lane(0, 0, model=opened(0)), lane(1, 9)]
        picked = choose(lanes, now=1, turn=0)
        assert picked is not None and picked.index == 1

    def test_all_open_means_none_and_retry_after_is_the_soonest_half_open(self) -> None:
        lanes = [lane(0, backend=opened(0)), lane(1, model=opened(10)), lane(2, backend=opened(5))]
        assert choose(lanes, now=12, turn=0) is None
        assert soonest_half_open(lanes, now=12) == 18  # backend 0 half-opens at 30

    def test_a_lane_waits_for_the_later_of_its_two_breakers(self) -> None:
        both = lane(0, backend=opened(0), model=opened(20))
        assert both.seconds_to_half_open(25) == 25

    def test_no_candidate_means_none(self) -> None:
        assert choose([], now=0, turn=0) is None
        assert soonest_half_open([], now=0) == 0.0

    def test_half_open_lets_one_probe_through_then_routes_around_it(self) -> None:
        lanes = [lane(0, backend=opened(0)), lane(1, 4)]
        probe = choose(lanes, now=31, turn=0)
        assert probe is not None and probe.index == 0
        assert probe.backend.probe_started == 31  # the probe slot is taken
        after = [probe, lanes[1]]
        second = choose(after, now=31.5, turn=1)
        assert second is not None and second.index == 1


class TestOutcomes:
    def test_a_5xx_opens_the_model_breaker_and_keeps_the_backend_closed(self) -> None:
        one = lane(0).after(Outcome.MODEL_FAILED, 1).after(Outcome.MODEL_FAILED, 2)
        assert one.model.state(2) is CircuitState.OPEN
        assert one.backend.state(2) is CircuitState.CLOSED
        other_model = lane(0, backend=one.backend)
        assert other_model.admits(3)

    def test_connection_failures_open_the_backend_and_leave_the_model_alone(self) -> None:
        one = lane(0).after(Outcome.BACKEND_FAILED, 1).after(Outcome.BACKEND_FAILED, 2)
        assert one.backend.state(2) is CircuitState.OPEN and one.model.state(2) is CircuitState.CLOSED
        assert not one.admits(3)

    def test_a_5xx_from_a_probing_backend_proves_it_alive(self) -> None:
        probing = lane(0, backend=opened(0)).taken(31)
        after = probing.after(Outcome.MODEL_FAILED, 31.2)
        assert after.backend.state(32) is CircuitState.CLOSED
        assert after.model.failures == 1

    def test_success_closes_both(self) -> None:
        one = lane(0, backend=opened(0), model=opened(0)).taken(31).after(Outcome.OK, 31.1)
        assert one.backend.state(32) is one.model.state(32) is CircuitState.CLOSED
