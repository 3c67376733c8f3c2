"""In-memory fakes of every port, for fast unit tests of gateway_core (STYLE §5)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime

import attrs

from gateway_core.budget import Budget, Period
from gateway_core.errors import AdminError, UpstreamUnavailable
from gateway_core.limits import Limits
from gateway_core.models import AdminEvent, Catalog, KeyRecord, KeyStatus, Principal, Tenant, Usage
from gateway_core.ports import NEGATIVE, LedgerEntry
from gateway_core.routing import Outcome
from tests.fake_admission import InMemoryAdmission as InMemoryAdmission


class FrozenClock:
    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.t = now

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class InstantHasher:
    """Shaped like argon2id output but cheap; never use outside tests."""

    async def hash(self, secret: str) -> str:
        return "$argon2id$fake$" + hashlib.sha256(secret.encode()).hexdigest()

    async def verify(self, secret: str, hashed: str) -> bool:
        return hashed == await self.hash(secret)


class InMemoryDiscovery:
    def __init__(self, names: list[str] | None = None) -> None:
        self.names = names

    async def discovered(self) -> list[str] | None:
        return None if self.names is None else list(self.names)


class InMemoryTenantStore:
    def __init__(self) -> None:
        self.tenants: dict[int, Tenant] = {}
        self.keys: dict[int, KeyRecord] = {}
        self.budgets: dict[int, Budget] = {}
        self.usage_rows: dict[tuple[int, Period, date], Usage] = defaultdict(Usage)
        self.events: list[AdminEvent] = []
        self.revocations: list[tuple[str, str]] = []

    def _tenant(self, tenant_id: int) -> Tenant:
        return self.tenants[tenant_id]

    async def create_tenant(self, tenant: Tenant, event: AdminEvent) -> Tenant:
        if any(t.name == tenant.name for t in self.tenants.values()):
            raise AdminError(f"tenant {tenant.name!r} already exists")
        stored = attrs.evolve(tenant, id=len(self.tenants) + 1, created_at=datetime.now(UTC))
        self.tenants[stored.id] = stored
        self.events.append(event)
        return stored

    async def tenant_by_name(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants.values() if t.name == name), None)

    async def create_key(self, key: KeyRecord, event: AdminEvent) -> KeyRecord:
        stored = attrs.evolve(key, id=len(self.keys) + 1, created_at=datetime.now(UTC))
        self.keys[stored.id] = stored
        self.events.append(event)
        return stored

    async def key_by_prefix(self, prefix: str) -> KeyRecord | None:
        return next((k for k in self.keys.values() if k.prefix == prefix), None)

    async def keys_of(self, tenant_id: int) -> list[KeyRecord]:
        return [k for k in self.keys.values() if k.tenant_id == tenant_id]

    async def revoke_key(self, prefix: str, source: str, event: AdminEvent) -> None:
        key = await self.key_by_prefix(prefix)
        assert key is not None
        self.keys[key.id] = attrs.evolve(key, status=KeyStatus.REVOKED, revoked_at=datetime.now(UTC))
        self.revocations.append((prefix, source))
        self.events.append(event)

    async def set_tenant_limits(self, tenant_id: int, limits: Limits, event: AdminEvent) -> None:
        self.tenants[tenant_id] = attrs.evolve(self._tenant(tenant_id), limits=limits)
        self.events.append(event)

    async def set_key_limits(self, key_id: int, limits: Limits, event: AdminEvent) -> None:
        self.keys[key_id] = attrs.evolve(self.keys[key_id], limits=limits)
        self.events.append(event)

    async def budget_of(self, key_id: int) -> Budget:
        return self.budgets.get(key_id, Budget())

    async def set_budget(self, key_id: int, budget: Budget, event: AdminEvent) -> None:
        self.budgets[key_id] = budget
        self.events.append(event)

    async def set_models(self, tenant_id: int, allowed: tuple[str, ...], allow_all: bool,
                         event: AdminEvent) -> None:
        self.tenants[tenant_id] = attrs.evolve(self._tenant(tenant_id), allowed_models=allowed,
                                               allow_all_models=allow_all)
        self.events.append(event)

    async def set_prompt_log(self, key_id: int, enabled: bool, retention_days: int | None,
                             event: AdminEvent) -> None:
        self.keys[key_id] = attrs.evolve(self.keys[key_id], prompt_log_enabled=enabled,
                                         prompt_log_retention_days=retention_days)
        self.events.append(event)

    async def usage(self, tenant_id: int, period: Period, start: date, key_id: int | None) -> Usage:
        total = Usage()
        for (kid, p, s), u in self.usage_rows.items():
            key = self.keys[kid]
            if p is period and s == start and key.tenant_id == tenant_id and key_id in (None, kid):
                total = Usage(total.requests + u.requests, total.tokens_in + u.tokens_in,
                              total.tokens_out + u.tokens_out)
        return total



class InMemoryLedger:
    """The ledger as a list; `used` sums what was recorded, like Postgres plus the pending queue.
    Like the real one it applies a settlement id once."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []

    def record(self, entry: LedgerEntry) -> None:
        if all(e.settlement_id != entry.settlement_id for e in self.entries):
            self.entries.append(entry)

    async def used(self, key_id: int, starts: dict[Period, date]) -> dict[Period, int]:
        return {p: sum(e.tokens_in + e.tokens_out for e in self.entries
                       if e.key_id == key_id and p.start(e.admitted_at) == s) for p, s in starts.items()}


class InMemoryKeyCache:
    """The KeyCache contract in memory: a clock, a generation per key prefix and per tenant."""

    def __init__(self) -> None:
        self.entries: dict[str, Principal | str] = {}
        self.clock = 0
        self.key_generation: dict[str, int] = {}
        self.tenant_generation: dict[int, int] = {}

    async def mark(self) -> object:
        return self.clock

    async def get(self, digest: str) -> Principal | str | None:
        return self.entries.get(digest)

    async def put(self, digest: str, principal: Principal, mark: object) -> bool:
        if not isinstance(mark, int):
            return False
        if (self.key_generation.get(principal.key_prefix, 0) > mark
                or self.tenant_generation.get(principal.tenant_id, 0) > mark):
            return False
        self.entries[digest] = principal
        return True

    async def put_negative(self, digest: str) -> None:
        self.entries.setdefault(digest, NEGATIVE)

    async def evict_prefix(self, prefix: str) -> None:
        self.clock += 1
        self.key_generation[prefix] = self.clock
        self.entries = {d: p for d, p in self.entries.items()
                        if not (isinstance(p, Principal) and p.key_prefix == prefix)}

    async def evict_tenant(self, tenant_id: int) -> None:
        self.clock += 1
        self.tenant_generation[tenant_id] = self.clock
        self.entries = {d: p for d, p in self.entries.items()
                        if not (isinstance(p, Principal) and p.tenant_id == tenant_id)}


class InMemoryAuthFailures:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.seen: dict[str, list[float]] = defaultdict(list)

    async def blocked_for(self, client_ip: str, now: float) -> float | None:
        recent = [t for t in self.seen[client_ip] if t > now - 60]
        return recent[0] + 60 - now if len(recent) >= self.per_minute else None

    async def record(self, client_ip: str, now: float) -> None:
        self.seen[client_ip].append(now)


class InMemoryPrincipalSource:
    """Keys by prefix with their hash; `lookups` counts how often the slow path ran."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, Principal]] = {}
        self.lookups = 0

    async def principal_by_prefix(self, prefix: str) -> tuple[str, Principal] | None:
        self.lookups += 1
        return self.keys.get(prefix)


class SwitchableFeed:
    def __init__(self, up: bool = True) -> None:
        self.up = up

    def trusted(self) -> bool:
        return self.up


class StaticCatalog:
    def __init__(self, names: list[str] | None, expires_at: float = float("inf")) -> None:
        self.catalog = None if names is None else Catalog(version=1, names=tuple(names))
        self.expires_at = expires_at

    def current(self, now: float) -> Catalog | None:
        return self.catalog if now < self.expires_at else None


class ScriptedAnswer:
    """An UpstreamAnswer with a fixed status and body, optionally in chunks, optionally stalling."""

    def __init__(self, status: int = 200, body: bytes = b"{}", chunks: list[bytes] | None = None,
                 stall: asyncio.Event | None = None) -> None:
        self.status = status
        self._body = body
        self._chunks = chunks if chunks is not None else [body]
        self._stall = stall

    async def read(self) -> bytes:
        if self._stall is not None:
            await self._stall.wait()
        return self._body

    async def chunks(self) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self._chunks):
            if i and self._stall is not None:
                await self._stall.wait()
            yield chunk

    async def error_message(self) -> str | None:
        return None


class ScriptedUpstream:
    """The Upstream port with one backend, which is also its own lane: answers with `answer`, or
    raises `error` as a connection failure would; records the breaker outcomes it is told."""

    index = 0

    def __init__(self, answer: ScriptedAnswer | None = None, error: Exception | None = None) -> None:
        self.answer = answer or ScriptedAnswer()
        self.error = error
        self.sent: list[tuple[str, bytes]] = []
        self.open = 0
        self.outcomes: list[Outcome] = []
        self.picked: list[tuple[str, frozenset[int]]] = []

    def lane(self, model: str, avoid: frozenset[int] = frozenset()) -> ScriptedUpstream:
        self.picked.append((model, avoid))
        if self.index in avoid:
            raise UpstreamUnavailable(retry_after_s=1.0)
        return self

    @asynccontextmanager
    async def post(self, path: str, body: bytes) -> AsyncIterator[ScriptedAnswer]:
        self.sent.append((path, body))
        if self.error is not None:
            raise self.error
        self.open += 1
        try:
            yield self.answer
        finally:
            self.open -= 1

    async def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def seconds_to_half_open(self) -> float:
        return 0.0


class ScriptedBackends:
    """The Upstream port over several ScriptedUpstreams, picked in list order (avoid skips one)."""

    def __init__(self, *backends: ScriptedUpstream) -> None:
        self.backends = backends
        for index, backend in enumerate(backends):
            backend.index = index

    def lane(self, model: str, avoid: frozenset[int] = frozenset()) -> ScriptedUpstream:
        for backend in self.backends:
            if backend.index not in avoid:
                backend.picked.append((model, avoid))
                return backend
        raise UpstreamUnavailable(retry_after_s=1.0)
