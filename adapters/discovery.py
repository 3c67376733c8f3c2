"""Model discovery (SPEC §4.6, §4.10): poll every backend's `/api/tags` (one replica at a time,
read-only), share the result through Redis, and keep the in-process copy every request reads.

Each backend's set lives until its own TTL: a backend that stops answering keeps its models
discovered until then, and a model stays discovered while at least one backend has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Collection, Sequence
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
    def __init__(self, backends: Sequence[OllamaBackend], cache: RedisDiscoveryCache, *, refresh_s: float,
                 ttl_s: float) -> None:
        self._backends = tuple(backends)
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
        # Per backend index: {"names": [...], "expires_at": wall clock} or None, as last synced.
        self._records: list[dict[str, Any] | None] = [None] * len(self._backends)
        self._holders: dict[str, frozenset[int]] | None = None
        self.last_success: float | None = None

    def holders(self, model: str) -> Collection[int] | None:
        """Indexes of the backends that have *model*; None when the shared copy does not say."""
        return None if self._holders is None else self._holders.get(model, ())

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
        now = time.time()
        results = await asyncio.gather(*(b.tags() for b in self._backends), return_exceptions=True)
        fresh: dict[str, dict[str, Any]] = {}
        records: list[dict[str, Any] | None] = []
        failure: BaseException | None = None
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failure = failure or result
                if len(self._backends) > 1:
                    _log.warning("model discovery: backend %d: %s", index, type(result).__name__)
                kept = self._records[index]
                records.append(kept if kept is not None and kept["expires_at"] > now else None)
                continue
            models = result.get("models") or []
            entries = [e for e in (tag_entry(m) for m in models if isinstance(m, dict)) if e]
            for entry in entries:
                fresh.setdefault(entry["name"], entry)
            records.append({"names": sorted({e["name"] for e in entries}), "expires_at": now + self._ttl_s})
        if failure is not None and all(isinstance(result, BaseException) for result in results):
            raise failure  # no backend answered: the shared copy runs out on its own TTL, as before
        # Entries of models only a silent (not yet expired) backend still has come from the last copy.
        kept_entries = {e["name"]: e for e in (self._catalog.entries if self._catalog else ())}
        for record in records:
            for name in record["names"] if record else ():
                if name not in fresh:
                    fresh[name] = kept_entries.get(name, {"name": name, "model": name})
        ttl_s = max(r["expires_at"] for r in records if r) - now
        # One backend: the copy keeps its single-backend shape (its TTL is that backend's).
        await self._cache.store(list(fresh.values()), ttl_s, records if len(records) > 1 else None)
        self.last_success = time.time()

    async def sync(self) -> bool:
        """Copy the shared set in; False when it is missing. The in-process copy then stays until
        its own expiry: it was true when read, and a flush is not news about Ollama."""
        found = await self._cache.read()
        if found is None:
            return False
        names, entries, ttl_ms, backends = found
        self._expires_at = time.time() + ttl_ms / 1000
        if backends is not None:
            names, entries = self._per_backend(backends, entries)
        else:
            self._holders = None
        if self._catalog is None or self._catalog.names != tuple(names):
            self._versions += 1
            self._catalog = Catalog(version=self._versions, names=tuple(names), entries=tuple(entries))
        return True

    def _per_backend(self, backends: list[Any], entries: list[dict[str, Any]]
                     ) -> tuple[list[str], list[dict[str, Any]]]:
        """The union of the backends whose sets have not expired, and who has what."""
        now = time.time()
        live = [r if isinstance(r, dict) and float(r.get("expires_at", 0)) > now else None for r in backends]
        self._records = (live + [None] * len(self._backends))[:len(self._backends)]
        holders: dict[str, set[int]] = {}
        for index, record in enumerate(self._records):
            for name in record["names"] if record else ():
                holders.setdefault(str(name), set()).add(index)
        self._holders = {name: frozenset(at) for name, at in holders.items()}
        return sorted(holders), [e for e in entries if e.get("name") in holders]
