"""Read-only view of the admission state, for the §3.4 headers of responses that admit nothing
(listings, and 400/403s after authentication). Reads only, in one pipelined round trip, off the
hot path; it follows the key layout of adapters/redis/admission.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from adapters.redis.admission import shared_keys
from adapters.redis.errors import redis_guard
from gateway_core.admission import Admission, Ticket, WindowState
from gateway_core.budget import Period
from gateway_core.limits import WINDOW_S


def _tokens_of(member: bytes | str) -> int:
    text = member.decode() if isinstance(member, bytes) else member
    _, _, tokens = text.rpartition("|")
    return int(tokens) if tokens.isdigit() else 0


class RedisAdmissionView:
    """*settled*: awaited before each read, so that this process's own settlements still on their
    way to Redis (RedisAdmission.flush) are in what the caller is shown."""

    def __init__(self, redis: Redis, settled: Callable[[], Awaitable[None]] | None = None) -> None:
        self._redis = redis
        self._settled = settled

    async def peek(self, ticket: Ticket) -> Admission:
        if self._settled is not None:
            async with redis_guard():
                await self._settled()
        keys = shared_keys(ticket)
        now_ms = round(ticket.now * 1000)
        window_ms = WINDOW_S * 1000
        cutoff = f"({now_ms - window_ms}"
        caps = ticket.budget.caps()
        async with redis_guard():
            pipe = self._redis.pipeline(transaction=False)
            for rq in (keys[2], keys[3]):
                pipe.zrangebyscore(rq, cutoff, "+inf", withscores=True)
            for tk in (keys[4], keys[6]):
                pipe.zrangebyscore(tk, cutoff, "+inf", withscores=True)
            for counter in keys[8:8 + len(caps)]:
                pipe.get(counter)
            raw = await pipe.execute()
        requests = _binding([
            _window(limit, len(entries), entries, now_ms, window_ms)
            for limit, entries in ((ticket.key_limits.rpm, raw[0]), (ticket.tenant_limits.rpm, raw[1]))])
        tokens = _binding([
            _window(limit, sum(_tokens_of(m) for m, _ in entries), entries, now_ms, window_ms)
            for limit, entries in ((ticket.key_limits.tpm, raw[2]), (ticket.tenant_limits.tpm, raw[3]))])
        missing: list[Period] = []
        remaining: dict[Period, int] = {}
        for (period, cap), used in zip(caps.items(), raw[4:], strict=True):
            if used is None:
                missing.append(period)
            else:
                remaining[period] = max(0, cap - int(used))
        binding = min(remaining, key=lambda p: remaining[p]) if remaining and not missing else None
        return Admission(granted=True, requests=requests, tokens=tokens, budget_period=binding,
                         budget_remaining=remaining[binding] if binding else None,
                         missing_periods=tuple(missing))


def _window(limit: int | None, used: int, entries: list[tuple[bytes, float]], now_ms: int,
            window_ms: int) -> WindowState | None:
    if limit is None:
        return None
    oldest = min((score for _, score in entries), default=None)
    reset_ms = 0.0 if oldest is None else max(0.0, oldest + window_ms - now_ms)
    return WindowState(limit=limit, remaining=max(0, limit - used), reset_s=reset_ms / 1000)


def _binding(windows: list[WindowState | None]) -> WindowState | None:
    present = [w for w in windows if w is not None]
    return min(present, key=lambda w: w.remaining) if present else None
