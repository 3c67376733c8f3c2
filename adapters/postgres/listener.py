"""The change feed (SPEC §4.5): LISTEN for revocations and config changes, evict what they name,
reconnect on its own and then replay exactly what changed while it was away.

Replay reads two logs: the revocation outbox and `gateway.config_changes` (migration 0004), each from
where the previous connection caught up, minus a look-back that covers transactions still open at
that moment (their rows carry earlier ids or times but commit later). Config-change rows whose
notification was already applied are skipped, so a reconnect costs argon2 only for keys that
really changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

import psycopg

from gateway_core.errors import DependencyUnavailable

REVOKED_CHANNEL = "key_revoked"
CONFIG_CHANNEL = "gateway_config_changed"
# Names the LISTEN session in pg_stat_activity, so an operator (or a test) can tell it from the pool's.
APPLICATION_NAME = "neuronetz-gateway-listener"
_log = logging.getLogger("neuronetz.listener")


# How far before the previous catch-up a replay looks: a change whose transaction was open then
# (written before, committed after) is still replayed. Operator transactions last milliseconds.
LOOK_BACK_S = 60.0
_APPLIED_KEPT = 10_000


class Evictor(Protocol):
    async def evict_prefix(self, prefix: str) -> None: ...

    async def evict_tenant(self, tenant_id: int) -> None: ...


class ChangeListener:
    """trusted() is true only while a LISTEN connection is up and everything missed is replayed."""

    def __init__(self, database_url: str, evictor: Evictor, *, cache_ttl_s: float,
                 probe_every_s: float = 1.0, retry_max_s: float = 1.0) -> None:
        self._url = database_url
        self._evictor = evictor
        self._probe_every_s = probe_every_s
        self._retry_max_s = retry_max_s
        self._cache_ttl_s = cache_ttl_s
        self._trusted = False
        self._ready = asyncio.Event()
        # Where the previous connection caught up (database clock), None before the first one.
        self._caught_up_at: datetime | None = None
        self._applied_changes: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.on_ready: Callable[[], Awaitable[None]] | None = None
        self.connections = 0
        self.replayed = 0

    def trusted(self) -> bool:
        return self._trusted

    async def start(self, wait_s: float = 5.0) -> None:
        """Start listening; wait a little for the first connection so start-up is not all 503s."""
        self._task = asyncio.create_task(self._run(), name="change-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), wait_s)

    async def stop(self) -> None:
        # Cancelling inside psycopg's notifies() can wedge the connection's close; ask the loop to
        # end after its current wait instead, and cancel only as a last resort.
        self._stopping = True
        if self._task is None:
            return
        await self._wake()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._probe_every_s * 3)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 1.0)
        except (psycopg.Error, OSError):
            pass

    async def _wake(self) -> None:
        """A notification of our own ends the listener's current wait at once (best effort)."""
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            async with await psycopg.AsyncConnection.connect(self._url, autocommit=True,
                                                             connect_timeout=1) as conn:
                await conn.execute(f"NOTIFY {CONFIG_CHANNEL}, 'wake'")

    async def _run(self) -> None:
        delay = 0.05
        while not self._stopping:
            connected_before = self.connections
            try:
                await self._listen()
            except asyncio.CancelledError:
                self._trusted = False
                raise
            except (psycopg.Error, OSError, DependencyUnavailable) as exc:
                _log.warning("change listener lost its connection (%s); reconnecting", type(exc).__name__)
            except Exception:
                # Anything else must not end this task while trusted() still says yes (fail-closed).
                _log.exception("change listener failed; reconnecting")
            self._trusted = False
            if self.connections != connected_before:
                # It was up: a new outage starts the backoff over, else every later reconnect of a
                # long-running process would wait retry_max_s and keep callers on 503 that long.
                delay = 0.05
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max_s)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(self._url, autocommit=True, connect_timeout=3,
                                                         application_name=APPLICATION_NAME) as conn:
            await conn.execute(f"LISTEN {REVOKED_CHANNEL}")
            await conn.execute(f"LISTEN {CONFIG_CHANNEL}")
            # Listening first, then catching up: nothing committed in between can be missed.
            await self._catch_up(conn)
            self.connections += 1
            self._trusted = True
            self._ready.set()
            while not self._stopping:
                # aclosing: leaving the loop early must release the connection's lock at once.
                async with contextlib.aclosing(conn.notifies(timeout=self._probe_every_s)) as notes:
                    async for note in notes:
                        if self._stopping:
                            break
                        await self._apply(note.channel, note.payload)
                # A quiet connection may be a dead one; only a round trip tells.
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=self._probe_every_s * 2)

    async def _catch_up(self, conn: psycopg.AsyncConnection) -> None:
        cur = await conn.execute("SELECT clock_timestamp()")
        row = await cur.fetchone()
        now = row[0] if row else None
        if self._caught_up_at is None:
            # First connection of this process: the shared cache may hold entries filled before a
            # change that no replica was listening for (all were down). None lives longer than the
            # cache TTL, so the changes of that long are all that can be stale.
            since, back_s = now, self._cache_ttl_s + LOOK_BACK_S
        else:
            since, back_s = self._caught_up_at, LOOK_BACK_S
        cur = await conn.execute(
            "SELECT DISTINCT key_prefix FROM gateway.revocations"
            " WHERE revoked_at > %s - make_interval(secs => %s)", (since, back_s))
        for (prefix,) in await cur.fetchall():
            await self._evictor.evict_prefix(prefix)
        cur = await conn.execute(
            "SELECT id, kind, ident FROM gateway.config_changes"
            " WHERE changed_at > %s - make_interval(secs => %s) ORDER BY id", (since, back_s))
        for change_id, kind, ident in await cur.fetchall():
            if change_id not in self._applied_changes:
                await self._evict(kind, ident)
                self._applied_changes.add(change_id)
        if len(self._applied_changes) > _APPLIED_KEPT:
            self._applied_changes.clear()  # only costs a few re-evictions on a later reconnect
        self.replayed += 1
        self._caught_up_at = now

    async def _apply(self, channel: str, payload: str) -> None:
        if channel == REVOKED_CHANNEL:
            await self._evictor.evict_prefix(payload)
            return
        kind, _, rest = payload.partition(":")
        ident, _, change_id = rest.partition("#")
        await self._evict(kind, ident)
        if change_id.isdigit():
            self._applied_changes.add(int(change_id))

    async def _evict(self, kind: str, ident: str) -> None:
        if kind == "key" and ident:
            await self._evictor.evict_prefix(ident)
        elif kind == "tenant" and ident.isdigit():
            await self._evictor.evict_tenant(int(ident))
