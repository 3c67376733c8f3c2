"""RedisAdmission: concurrency, rpm, tpm and budgets decided in one Lua round trip (SPEC §4.1, §4.4).

Key layout; every key of one tenant carries the hash tag `{t:<tenant_id>}` (Redis Cluster safe):
  gw:{t:T}:cc:k:<key_id> / gw:{t:T}:cc:t     ZSET lease_id → lease expiry (ms)
  gw:{t:T}:rq:k:<key_id> / gw:{t:T}:rq:t     ZSET lease_id → admission time (ms), sliding rpm log
  gw:{t:T}:tk:k:<key_id> / gw:{t:T}:tk:t     ZSET "<lease_id>|<tokens>" → admission time (ms), tpm log
  gw:{t:T}:tks:k:<key_id> / gw:{t:T}:tks:t   running sum of the tpm log
  gw:{t:T}:ls:<lease_id>                     admission time (ms) of a granted, unsettled lease
  gw:{t:T}:bud:<key_id>:<period>:<YYYYMMDD>  tokens used in that period instance, reservations included
Windows and leases are only kept for limits that are set. Their times come from Redis (`TIME` in the
script), so replicas with skewed clocks agree; the budget period instance is the replica's choice at
admission (ticket.now), and settlement corrects that same instance. Settle and release are
idempotent per lease id: the lease marker goes with the first, so a retry changes nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from functools import cache, lru_cache
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster

from adapters.redis.cluster import KeyedScript
from adapters.redis.errors import redis_guard
from adapters.redis.script_batch import Encoded, Part, ScriptBatch, encode
from gateway_core.admission import LEASE_TTL_S, Admission, Denial, Settlement, Ticket, WindowState
from gateway_core.budget import NO_RESET_RETRY_AFTER_S, Budget, Period
from gateway_core.limits import WINDOW_S, Limits

# A settlement for a request that began before a period rolled over still finds its counter.
COUNTER_GRACE_S = 3600
_UNLIMITED = -1
_REDIS_TIME = -1
_PERIODS = {p.value: p for p in Period}


@cache
def _lua_source() -> str:
    return resources.files("adapters.redis").joinpath("admission.lua").read_text(encoding="utf-8")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


_LEASE_TTL_MS = _ms(LEASE_TTL_S)
_WINDOW_MS = _ms(WINDOW_S)
# Structures live 2 windows (lease ttls) past their last refresh; refreshing every half keeps every
# entry alive for at least 1.5 after it was added.
REFRESH_EVERY_S = min(WINDOW_S, LEASE_TTL_S) / 2


def _tag(tenant_id: int) -> str:
    return f"gw:{{t:{tenant_id}}}"


def budget_key(ticket: Ticket, period: Period) -> str:
    start = period.start(ticket.now)
    return f"{_tag(ticket.tenant_id)}:bud:{ticket.key_id}:{period.value}:{start:%Y%m%d}"


def shared_keys(ticket: Ticket) -> tuple[str, ...]:
    """The ticket's window and budget keys without its lease: concurrency (key, tenant), requests
    (key, tenant), tokens (key log, key sum, tenant log, tenant sum), then one budget counter per cap.
    Period instances change at most daily, so the list is the same for a key all day long."""
    periods = tuple(ticket.budget.caps())
    return _keys_for(ticket.tenant_id, ticket.key_id, periods, int(ticket.now // 86400))


def _keys(ticket: Ticket) -> list[str]:
    shared = shared_keys(ticket)
    return [*shared[:8], _marker(ticket), *shared[8:]]


def _marker(ticket: Ticket) -> str:
    return f"{_tag(ticket.tenant_id)}:ls:{ticket.lease_id}"


def _encoded_keys(ticket: Ticket) -> list[Part]:
    """_keys, with what is the same for the key all day already in wire format."""
    head, budgets = _encoded_shared(shared_keys(ticket))
    return [head, _marker(ticket), budgets]


@lru_cache(maxsize=4096)
def _encoded_shared(shared: tuple[str, ...]) -> tuple[Encoded, Encoded]:
    return encode(shared[:8]), encode(shared[8:])


@lru_cache(maxsize=4096)
def _encoded_limits(k: Limits, t: Limits) -> Encoded:
    return encode(_limit_args(k, t))


def _limit_args(k: Limits, t: Limits) -> list[int]:
    return [_LEASE_TTL_MS, _WINDOW_MS,
            _limit(k.concurrent), _limit(t.concurrent), _limit(k.rpm), _limit(t.rpm),
            _limit(k.tpm), _limit(t.tpm)]


@lru_cache(maxsize=4096)
def _keys_for(tenant_id: int, key_id: int, periods: tuple[Period, ...], day: int) -> tuple[str, ...]:
    tag = _tag(tenant_id)
    day_start = day * 86400.0
    return (
        f"{tag}:cc:k:{key_id}", f"{tag}:cc:t",
        f"{tag}:rq:k:{key_id}", f"{tag}:rq:t",
        f"{tag}:tk:k:{key_id}", f"{tag}:tks:k:{key_id}",
        f"{tag}:tk:t", f"{tag}:tks:t",
        *(f"{tag}:bud:{key_id}:{p.value}:{p.start(day_start):%Y%m%d}" for p in periods),
    )


def _limit(value: int | None) -> int:
    return _UNLIMITED if value is None else value


@lru_cache(maxsize=4096)
def _caps_on(budget: Budget, day: int) -> tuple[tuple[Period, str, int, float | None], ...]:
    """Per configured period: the period, its name, its cap and the epoch second it resets (None:
    never). The same for one budget all day long, so worked out once a day, not per request."""
    noon = day * 86400.0 + 43200.0
    out = []
    for period, cap in budget.caps().items():
        to_reset = period.seconds_to_reset(noon)
        out.append((period, period.value, cap, None if to_reset is None else noon + to_reset))
    return tuple(out)


def _admit_args(ticket: Ticket, seeds: dict[Period, int], now_ms: int, encoded: bool,
                refresh: bool = True) -> list[Part]:
    k, t = ticket.key_limits, ticket.tenant_limits
    args: list[Part] = ["admit", now_ms, ticket.lease_id, ticket.prompt_tokens, ticket.completion_tokens,
                        1 if refresh else 0]
    if encoded:
        args.append(_encoded_limits(k, t))
    else:
        args += _limit_args(k, t)
    now = ticket.now
    for period, name, cap, reset_at in _caps_on(ticket.budget, int(now // 86400)):
        if reset_at is None:
            args += [name, cap, _UNLIMITED, seeds.get(period, _UNLIMITED), _UNLIMITED]
        else:
            to_reset = max(0.0, reset_at - now)
            args += [name, cap, _ms(to_reset), seeds.get(period, _UNLIMITED),
                     math.ceil(to_reset) + COUNTER_GRACE_S]
    return args


def _window(raw: list[int | float] | None) -> WindowState | None:
    if raw is None:
        return None
    limit, remaining, reset_ms = raw
    return WindowState(limit=int(limit), remaining=int(remaining), reset_s=reset_ms / 1000)


def _admission(ticket: Ticket, out: dict[str, Any]) -> Admission:
    if out.get("missing"):
        return Admission(granted=False, missing_periods=tuple(_PERIODS[p] for p in out["missing"]))
    budget_period = out.get("budget_period")
    common: dict[str, Any] = {
        "requests": _window(out.get("rq")),
        "tokens": _window(out.get("tk")),
        "budget_period": None if budget_period is None else _PERIODS[budget_period],
        "budget_remaining": out.get("budget_remaining"),
    }
    if out["granted"]:
        reserved = int(out["reserved"])
        return Admission(
            granted=True, completion_tokens=int(out["completion"]),
            reserved={c[0]: reserved for c in _caps_on(ticket.budget, int(ticket.now // 86400))}, **common,
        )
    denial = Denial(out["denial"])
    if denial is Denial.BUDGET:
        period = Period(out["period"])
        to_reset = period.seconds_to_reset(ticket.now)
        retry_after_s = float(NO_RESET_RETRY_AFTER_S) if to_reset is None else to_reset
        return Admission(granted=False, denial=denial, denied_period=period, retry_after_s=retry_after_s,
                         should_retry=to_reset is not None, **common)
    return Admission(granted=False, denial=denial, retry_after_s=out["retry_ms"] / 1000,
                     should_retry=bool(out["should_retry"]), **common)


class RedisAdmission:
    """The AdmissionStore on Redis; safe to share between replicas (all state lives in Redis).

    `settle` and `release` may be retried: only the first of them for a lease changes anything.
    *redis_time* False makes leases and windows use the tickets' clock instead of Redis `TIME`;
    only the contract tests, which drive time, want that.
    """

    def __init__(self, redis: Redis, *, redis_time: bool = True) -> None:
        self._redis = redis
        self._redis_time = redis_time
        # EVALSHA; on one node, admissions, settlements, releases and renewals of concurrent requests
        # share one pipelined round trip (a NOSCRIPT answer loads the script and resends those
        # calls). redis-py refuses scripts in a cluster pipeline: there each call is its own EVALSHA,
        # with EVAL on the key's node when a promoted replica lacks the script.
        self._batch: ScriptBatch | KeyedScript = (
            KeyedScript(redis, _lua_source()) if isinstance(redis, RedisCluster)
            else ScriptBatch(redis, _lua_source()))
        # A cluster client routes by the key names, so it gets them as names.
        self._encoded = isinstance(self._batch, ScriptBatch)
        # Per (tenant, key): when this process last had an admission granted that pushed the
        # expiries of the key's and tenant's windows and leases out (monotonic seconds).
        self._refreshed: dict[tuple[int, int], float] = {}

    def _keys(self, ticket: Ticket) -> list[Any]:
        return _encoded_keys(ticket) if self._encoded else _keys(ticket)

    def _now(self, now: float) -> int:
        return _REDIS_TIME if self._redis_time else _ms(now)

    async def admit(self, ticket: Ticket, seeds: dict[Period, int] | None = None) -> Admission:
        """One atomic round trip; a denial or a `missing_periods` answer consumes nothing."""
        # Expiries are pushed out at least every REFRESH_EVERY_S per key (and by the script whenever
        # a structure is new): an entry added in between still has 1.5 windows (lease ttls) to live,
        # and the ~6 PEXPIREs an admission spared were a tenth of the script's work.
        scope = (ticket.tenant_id, ticket.key_id)
        sent_at = time.monotonic()
        last = self._refreshed.get(scope)
        refresh = last is None or sent_at - last >= REFRESH_EVERY_S
        async with redis_guard():
            args = _admit_args(ticket, seeds or {}, self._now(ticket.now), self._encoded, refresh)
            raw = await self._batch.call(self._keys(ticket), args)
        admission = _admission(ticket, orjson.loads(raw))
        if refresh and admission.granted:
            self._refreshed[scope] = sent_at
        return admission

    async def settle(self, settlement: Settlement) -> None:
        """Drop the lease, replace the tpm estimate by the real count and correct the budgets."""
        ticket = settlement.ticket
        real = settlement.prompt_tokens + settlement.completion_tokens
        async with redis_guard():
            await self._call(self._keys(ticket), ["settle", self._now(ticket.now), ticket.lease_id,
                                                  real, settlement.reserved_tokens], may_wait=True)

    def _call(self, keys: list[Any], args: list[Any], *, may_wait: bool = False) -> Any:
        if isinstance(self._batch, ScriptBatch):
            return self._batch.call(keys, args, may_wait=may_wait)
        return self._batch.call(keys, args)

    async def flush(self) -> None:
        """Until everything this process has queued for Redis has its reply: a read that follows
        must see this process's own settlements."""
        if isinstance(self._batch, ScriptBatch):
            await self._batch.drain()

    async def release(self, ticket: Ticket, reserved_tokens: int) -> None:
        """Give back the lease, the tpm entry and the budget reservation of a request that produced
        no tokens. Its rpm entry stays: an attempt counts against requests per minute."""
        async with redis_guard():
            await self._batch.call(self._keys(ticket),
                                   ["release", self._now(ticket.now), ticket.lease_id, 0, reserved_tokens])

    async def renew(self, tickets: list[Ticket], now: float) -> None:
        """Push the leases of in-flight *tickets* to now + LEASE_TTL_S (Redis time), in one pipelined
        round trip. A lease already settled, released or expired is not brought back."""
        if not tickets:
            return
        async with redis_guard():
            calls = [self._batch.call(self._keys(t), ["renew", self._now(now), t.lease_id, _ms(LEASE_TTL_S)])
                     for t in tickets]
            await asyncio.gather(*calls)
