"""Model discovery (SPEC §4.6): poll Ollama's `/api/tags` (one replica at a time, read-only), share
the result through Redis, and keep the in-process copy every request reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from adapters.ollama import OllamaBackend
from adapters.redis.discovery import RedisDiscoveryCache
from adapters.tasks import cancel_and_wait
from gateway_core.errors import DependencyUnavailable, UpstreamUnavailable
from gateway_core.models import Catalog

_log = logging.getLogger("neuronetz.discovery")
# Replicas re-read the shared copy this often, so a poll by any of them shows up everywhere fast.
SYNC_EVERY_S = 1.0


def tag_entry(raw: dict[str, Any]) -> dict[str, Any] | None:
    name = raw.get("model") or raw.get("name")
    if not isinstance(name, str) or not name:
        return None
    keep = ("modified_at", "size", "digest", "details", "capabilities")
    return {"name": name, "model": name, **{k: raw[k] for k in keep if k in raw}}


class Discovery:
    def __init__(self, backend: OllamaBackend, cache: RedisDiscoveryCache, *, refresh_s: float,
                 ttl_s: float) -> None:
        self._backend = backend
        self._cache = cache
        self._refresh_s = refresh_s
        self._ttl_s = ttl_s
        self._owner = uuid.uuid4().hex
        self._catalog: Catalog | None = None
        self._versions = 0
        self._expires_at = 0.0  # wall clock, like the `now` the policy passes in
        self._next_poll = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_success: float | None = None

    def current(self, now: float) -> Catalog | None:
        if self._catalog is None or now >= self._expires_at or not self._catalog.names:
            return None
        return self._catalog

    async def start(self) -> None:
        with contextlib.suppress(DependencyUnavailable, UpstreamUnavailable):
            await self.tick()
        self._task = asyncio.create_task(self._run(), name="model-discovery")

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait([self._task])

    async def _run(self) -> None:
        # The flag as well as the cancel: a shutdown once hung here (rarely, under load) with this task
        # "cancelling" yet still looping, its CancelledError absorbed inside a Redis or HTTP call in
        # tick(). With the flag the loop ends after that tick all the same.
        while not self._stopping:
            await asyncio.sleep(min(SYNC_EVERY_S, self._refresh_s))
            try:
                await self.tick()
            except (DependencyUnavailable, UpstreamUnavailable) as exc:
                _log.warning("model discovery: %s", type(exc).__name__)
            except Exception:
                _log.exception("model discovery failed")

    async def tick(self) -> None:
        if time.monotonic() >= self._next_poll:
            await self._poll_under_lock()
        if not await self.sync():
            # The shared copy is gone (Redis restarted or flushed): poll at once instead of at the
            # next interval, or every model is denied until then (SPEC §4.6). The lock still keeps
            # it to one replica; the others pick the result up at their next sync.
            await self._poll_under_lock()
            await self.sync()

    async def _poll_under_lock(self) -> None:
        self._next_poll = time.monotonic() + self._refresh_s
        if await self._cache.try_poll_lock(self._owner, self._refresh_s * 0.9):
            await self.poll()

    async def poll(self) -> None:
        data = await self._backend.tags()
        entries = [e for e in (tag_entry(m) for m in data.get("models") or [] if isinstance(m, dict)) if e]
        await self._cache.store(entries, self._ttl_s)
        self.last_success = time.time()

    async def sync(self) -> bool:
        """Copy the shared set in; False when it is missing. The in-process copy then stays until
        its own expiry: it was true when read, and a flush is not news about Ollama."""
        found = await self._cache.read()
        if found is None:
            return False
        names, entries, ttl_ms = found
        self._expires_at = time.time() + ttl_ms / 1000
        if self._catalog is None or self._catalog.names != tuple(names):
            self._versions += 1
            self._catalog = Catalog(version=self._versions, names=tuple(names), entries=tuple(entries))
        return True
