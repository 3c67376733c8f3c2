"""Rate-limit and budget response headers (SPEC §3.4, §6.5) rendered from an Admission.

Durations are written the way OpenAI writes `x-ratelimit-reset-*`: Go's `time.Duration` format.
"""

from __future__ import annotations

import math

from gateway_core.admission import Admission, WindowState
from gateway_core.limits import WINDOW_S


def go_duration(seconds: float) -> str:
    """*seconds* as Go prints a Duration (`0s`, `12ms`, `1.5s`, `6m0s`, `1h0m0s`), to the millisecond.

    Negative values are clamped to `0s`; sub-millisecond remainders are rounded away.
    """
    total_ms = max(0, round(seconds * 1000))
    if total_ms < 1000:
        return f"{total_ms}ms" if total_ms else "0s"
    hours, rest_ms = divmod(total_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    whole_s, frac_ms = divmod(rest_ms, 1000)
    secs = f"{whole_s}.{frac_ms:03d}".rstrip("0") if frac_ms else str(whole_s)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_limit_headers(admission: Admission) -> dict[str, str]:
    """The §3.4 rate headers and, when the key has a budget, the §6.5 budget headers.

    Only limits that apply (non-None windows) appear. `RateLimit` names the binding window: the
    one with the smallest fraction left, rpm on a tie. Remaining counts are never negative.
    """
    headers: dict[str, str] = {}
    windows: list[tuple[str, WindowState]] = []
    if admission.requests is not None:
        _x_ratelimit(headers, "Requests", admission.requests)
        windows.append(("rpm", admission.requests))
    if admission.tokens is not None:
        _x_ratelimit(headers, "Tokens", admission.tokens)
        windows.append(("tpm", admission.tokens))
    if windows:
        headers["RateLimit-Policy"] = ", ".join(_policy(name, w) for name, w in windows)
        name, binding = min(windows, key=lambda nw: _fraction_left(nw[1]))
        headers["RateLimit"] = f'"{name}";r={_remaining(binding)};t={math.ceil(max(0.0, binding.reset_s))}'
    if admission.budget_period is not None:
        headers["X-Budget-Period"] = admission.budget_period.value
        headers["X-Budget-Tokens-Remaining"] = str(max(0, admission.budget_remaining or 0))
    return headers


def _x_ratelimit(headers: dict[str, str], unit: str, window: WindowState) -> None:
    headers[f"X-RateLimit-Limit-{unit}"] = str(window.limit)
    headers[f"X-RateLimit-Remaining-{unit}"] = str(_remaining(window))
    headers[f"X-RateLimit-Reset-{unit}"] = go_duration(window.reset_s)


def _policy(name: str, window: WindowState) -> str:
    unit = ';qu="tokens"' if name == "tpm" else ""
    return f'"{name}";q={window.limit};w={WINDOW_S}{unit}'


def _remaining(window: WindowState) -> int:
    return max(0, window.remaining)


def _fraction_left(window: WindowState) -> float:
    # A zero limit has nothing left at all, so it binds.
    return _remaining(window) / window.limit if window.limit > 0 else 0.0
