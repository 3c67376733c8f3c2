from __future__ import annotations

import pytest

from gateway_core.admission import Admission, Denial, WindowState
from gateway_core.budget import Period
from gateway_core.rate_headers import go_duration, rate_limit_headers


class TestGoDuration:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0, "0s"), (0.012, "12ms"), (0.999, "999ms"), (1, "1s"), (1.5, "1.5s"), (17.28, "17.28s"),
            (59.8, "59.8s"), (60, "1m0s"), (360, "6m0s"), (61.25, "1m1.25s"), (3600, "1h0m0s"),
            (86400, "24h0m0s"), (3723.004, "1h2m3.004s"),
        ],
    )
    def test_durations_are_written_like_openai_writes_them(self, seconds: float, text: str) -> None:
        assert go_duration(seconds) == text

    def test_negative_and_sub_millisecond_durations_become_zero(self) -> None:
        assert go_duration(-3) == "0s"
        assert go_duration(0.0004) == "0s"

    def test_float_noise_does_not_leak_into_the_text(self) -> None:
        assert go_duration(119.9 - 60.1) == "59.8s"


class TestRateLimitHeaders:
    def test_a_grant_carries_both_windows_and_the_ietf_draft_headers(self) -> None:
        admission = Admission(
            granted=True,
            requests=WindowState(limit=120, remaining=119, reset_s=60),
            tokens=WindowState(limit=200_000, remaining=150_000, reset_s=0.5),
        )
        assert rate_limit_headers(admission) == {
            "X-RateLimit-Limit-Requests": "120",
            "X-RateLimit-Remaining-Requests": "119",
            "X-RateLimit-Reset-Requests": "1m0s",
            "X-RateLimit-Limit-Tokens": "200000",
            "X-RateLimit-Remaining-Tokens": "150000",
            "X-RateLimit-Reset-Tokens": "500ms",
            "RateLimit-Policy": '"rpm";q=120;w=60, "tpm";q=200000;w=60;qu="tokens"',
            "RateLimit": '"tpm";r=150000;t=1',
        }

    def test_the_binding_window_is_the_one_with_the_smallest_share_left(self) -> None:
        admission = Admission(
            granted=False, denial=Denial.RPM,
            requests=WindowState(limit=5, remaining=0, reset_s=59.8),
            tokens=WindowState(limit=1000, remaining=900, reset_s=59.8),
        )
        assert rate_limit_headers(admission)["RateLimit"] == '"rpm";r=0;t=60'

    def test_unlimited_windows_are_left_out(self) -> None:
        only_tokens = Admission(granted=True, tokens=WindowState(limit=1000, remaining=10, reset_s=60))
        headers = rate_limit_headers(only_tokens)
        assert "X-RateLimit-Limit-Requests" not in headers
        assert headers["RateLimit-Policy"] == '"tpm";q=1000;w=60;qu="tokens"'
        assert rate_limit_headers(Admission(granted=True)) == {}

    def test_remaining_is_never_negative(self) -> None:
        admission = Admission(
            granted=False, denial=Denial.TPM, tokens=WindowState(limit=100, remaining=-40, reset_s=3),
            budget_period=Period.DAILY, budget_remaining=-5,
        )
        headers = rate_limit_headers(admission)
        assert headers["X-RateLimit-Remaining-Tokens"] == "0"
        assert headers["RateLimit"] == '"tpm";r=0;t=3'
        assert headers["X-Budget-Tokens-Remaining"] == "0"

    def test_budget_headers_name_the_binding_period(self) -> None:
        admission = Admission(granted=True, budget_period=Period.MONTHLY, budget_remaining=1234)
        assert rate_limit_headers(admission) == {
            "X-Budget-Period": "monthly", "X-Budget-Tokens-Remaining": "1234",
        }

    def test_a_zero_limit_binds(self) -> None:
        admission = Admission(
            granted=False, denial=Denial.RPM,
            requests=WindowState(limit=0, remaining=0, reset_s=0),
            tokens=WindowState(limit=1000, remaining=0, reset_s=30),
        )
        assert rate_limit_headers(admission)["RateLimit"] == '"rpm";r=0;t=0'
