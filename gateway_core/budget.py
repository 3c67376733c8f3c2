"""Token budgets and their periods (SPEC §6.1): UTC day, UTC calendar month, and total."""

from __future__ import annotations

import enum
import math
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

from attrs import field, frozen
from attrs.validators import ge, optional

TOTAL_PERIOD_START = date(1970, 1, 1)
# A `total` budget never resets; SPEC §3.3 tells callers to wait this long at most.
NO_RESET_RETRY_AFTER_S = 86400


class Period(enum.StrEnum):
    DAILY = "daily"
    MONTHLY = "monthly"
    TOTAL = "total"

    def start(self, now: float) -> date:
        """First UTC day of the period instance containing the epoch time *now*."""
        # Several calls per request (keys, ledger rows), and the answer only changes at midnight.
        return _start_on(self, math.floor(now / 86400))

    def seconds_to_reset(self, now: float) -> float | None:
        """Seconds until the next period instance begins; None for `total`, which never resets."""
        if self is Period.TOTAL:
            return None
        start = self.start(now)
        if self is Period.DAILY:
            nxt = start + timedelta(days=1)
        else:
            nxt = date(start.year + (start.month == 12), start.month % 12 + 1, 1)
        reset = datetime(nxt.year, nxt.month, nxt.day, tzinfo=UTC).timestamp()
        return max(0.0, reset - now)


# CLI and `show-usage` spell periods as day/month/total (SPEC §7).
USAGE_PERIOD_NAMES = {"day": Period.DAILY, "month": Period.MONTHLY, "total": Period.TOTAL}



_EPOCH_ORDINAL = TOTAL_PERIOD_START.toordinal()


@lru_cache(maxsize=512)
def _start_on(period: Period, day: int) -> date:
    today = date.fromordinal(_EPOCH_ORDINAL + day)
    if period is Period.DAILY:
        return today
    if period is Period.MONTHLY:
        return today.replace(day=1)
    return TOTAL_PERIOD_START

@frozen
class Budget:
    """Token caps per period for one key; None means unlimited for that period."""

    daily: int | None = field(default=None, validator=optional(ge(0)))
    monthly: int | None = field(default=None, validator=optional(ge(0)))
    total: int | None = field(default=None, validator=optional(ge(0)))

    def caps(self) -> dict[Period, int]:
        """Only the configured periods, in SPEC order."""
        raw = {Period.DAILY: self.daily, Period.MONTHLY: self.monthly, Period.TOTAL: self.total}
        return {p: v for p, v in raw.items() if v is not None}

    @property
    def is_set(self) -> bool:
        return bool(self.caps())
