from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from gateway_core.budget import Budget, Period
from gateway_core.limits import Limits


def _ts(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


class TestLimitInheritance:
    def test_key_values_override_and_none_inherits_from_tenant(self) -> None:
        tenant = Limits(rpm=120, tpm=200_000, concurrent=8)
        assert Limits(rpm=5).over(tenant) == Limits(rpm=5, tpm=200_000, concurrent=8)
        assert Limits().over(tenant) == tenant

    def test_zero_on_a_key_is_a_real_limit_not_inheritance(self) -> None:
        assert Limits(concurrent=0).over(Limits(1, 2, 3)).concurrent == 0

    def test_negative_limits_are_refused(self) -> None:
        with pytest.raises(ValueError):
            Limits(rpm=-1)


class TestBudgetPeriods:
    def test_daily_period_is_the_utc_day(self) -> None:
        assert Period.DAILY.start(_ts(2026, 3, 31, 23, 59, 59)) == date(2026, 3, 31)
        assert Period.DAILY.seconds_to_reset(_ts(2026, 3, 31, 23, 59, 0)) == pytest.approx(60)

    def test_monthly_period_is_the_utc_calendar_month_including_december(self) -> None:
        assert Period.MONTHLY.start(_ts(2026, 2, 14, 12)) == date(2026, 2, 1)
        assert Period.MONTHLY.seconds_to_reset(_ts(2026, 12, 31, 23, 0)) == pytest.approx(3600)
        assert Period.MONTHLY.seconds_to_reset(_ts(2028, 2, 28)) == pytest.approx(2 * 86400)

    def test_total_never_resets(self) -> None:
        assert Period.TOTAL.seconds_to_reset(_ts(2026, 1, 1)) is None
        assert Period.TOTAL.start(_ts(2026, 1, 1)) == Period.TOTAL.start(_ts(2030, 6, 1))

    def test_budget_lists_only_configured_periods(self) -> None:
        assert Budget(daily=10, total=5).caps() == {Period.DAILY: 10, Period.TOTAL: 5}
        assert not Budget().is_set
