from __future__ import annotations

from gateway_core.breaker import Breaker, CircuitState


class TestBreaker:
    def test_opens_after_threshold_consecutive_failures_and_a_success_resets_the_count(self) -> None:
        b = Breaker(threshold=3, reset_s=30)
        b = b.on_failure(0).on_failure(0).on_success().on_failure(0).on_failure(0)
        assert b.state(0) is CircuitState.CLOSED
        b = b.on_failure(1)
        assert b.state(1) is CircuitState.OPEN and b.seconds_to_half_open(1) == 30
        assert b.admit(10) == (False, b)

    def test_half_open_lets_exactly_one_probe_through(self) -> None:
        b = Breaker(threshold=1, reset_s=30).on_failure(0)
        allowed, b = b.admit(31)
        assert allowed and b.state(31) is CircuitState.HALF_OPEN
        assert b.admit(31.5)[0] is False
        assert b.on_success().state(32) is CircuitState.CLOSED
        reopened = b.on_failure(32)
        assert reopened.state(33) is CircuitState.OPEN and reopened.seconds_to_half_open(33) == 29

    def test_a_probe_that_never_answered_does_not_block_forever(self) -> None:
        b = Breaker(threshold=1, reset_s=5).on_failure(0)
        _, b = b.admit(6)
        assert b.admit(7)[0] is False
        assert b.admit(12)[0] is True
