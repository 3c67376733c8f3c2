"""Request use cases in SPEC §4.1 order: authenticate, authorize (scope, model policy), admit, settle."""

from __future__ import annotations

import asyncio
from typing import NoReturn

from attrs import frozen

from gateway_core.api_keys import cache_digest, is_well_formed_key, prefix_of
from gateway_core.effective_models import EffectiveModels
from gateway_core.errors import (
    DependencyUnavailable,
    InvalidApiKey,
    ModelNotAllowed,
    RateLimitExceeded,
    ScopeNotAllowed,
)
from gateway_core.models import Catalog, Principal, Scope
from gateway_core.ports import (
    NEGATIVE,
    AuthFailures,
    ChangeFeed,
    Clock,
    KeyCache,
    ModelCatalog,
    PrincipalSource,
    SecretHasher,
)


@frozen
class AuthPorts:
    cache: KeyCache
    source: PrincipalSource
    hasher: SecretHasher
    failures: AuthFailures
    feed: ChangeFeed
    clock: Clock


def bearer_key(authorization: str | None) -> str | None:
    """The key from `Authorization: Bearer <key>`, or None when absent or malformed."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not is_well_formed_key(value):
        return None
    return value


# Hashed once per process and verified against when no active key has the prefix, so an unknown
# or revoked prefix costs the same argon2 work as a wrong secret (no timing oracle, SPEC §3.1).
_DUMMY_SECRET = "nz_" + "timing-equaliser-never-a-real-key-0000000"


class Authenticator:
    """SPEC §3.1: every failure is the same InvalidApiKey; argon2 is paid once per key per cache TTL."""

    def __init__(self, ports: AuthPorts) -> None:
        self._p = ports
        self._dummy_hash: str | None = None
        self._verifying: dict[str, asyncio.Future[Principal | None]] = {}

    async def authenticate(self, authorization: str | None, client_ip: str) -> Principal:
        p = self._p
        if not p.feed.trusted():
            # Without the revocation listener a cached key may have been revoked (SPEC §8.5).
            raise DependencyUnavailable(dependency="change_feed")
        key = bearer_key(authorization)
        if key is None:
            await self._refuse(client_ip)
        digest = cache_digest(key)
        cached = await p.cache.get(digest)
        if cached == NEGATIVE:
            await self._refuse(client_ip)
        if isinstance(cached, Principal):
            # A key verified before needs no hash: a busy neighbour on a shared address does not
            # lock out callers whose keys already work (the block exists to protect the CPU).
            return cached
        await self._raise_if_blocked(client_ip)
        # One verification per key at a time: when a busy key's cache entry expires, the requests
        # that miss together share one argon2 run instead of each paying for (and allocating) one.
        # They presented the same full key (the digest is of all of it), so they share its outcome;
        # each failed caller's address is still counted on its own.
        verifying = self._verifying.get(digest)
        if verifying is None:
            verifying = self._verifying[digest] = asyncio.ensure_future(self._verify(key, digest))
            verifying.add_done_callback(lambda done: self._verified(digest, done))
        principal = await asyncio.shield(verifying)
        if principal is None:
            await p.failures.record(client_ip, p.clock.now())
            raise InvalidApiKey()
        return principal

    def _verified(self, digest: str, done: asyncio.Future[Principal | None]) -> None:
        self._verifying.pop(digest, None)
        # Its callers may all have gone (cancelled): the outcome is then read here, not reported
        # as an exception nobody retrieved.
        if not done.cancelled():
            done.exception()

    async def _verify(self, key: str, digest: str) -> Principal | None:
        p = self._p
        # The mark comes first: a revocation committed after the load below moves the key's
        # generation past it, and the fill is refused (SPEC §4.5).
        mark = await p.cache.mark()
        found = await p.source.principal_by_prefix(prefix_of(key))
        if found is None:
            await p.hasher.verify(key, await self._dummy())
            verified = False
        else:
            verified = await p.hasher.verify(key, found[0])
        if found is None or not verified:
            await p.cache.put_negative(digest)
            return None
        await p.cache.put(digest, found[1], mark)
        return found[1]

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await self._p.hasher.hash(_DUMMY_SECRET)
        return self._dummy_hash

    async def warm_up(self) -> None:
        """Make the dummy hash before the first caller, so no attempt pays for two hashes."""
        await self._dummy()

    async def _raise_if_blocked(self, client_ip: str) -> None:
        wait_s = await self._p.failures.blocked_for(client_ip, self._p.clock.now())
        if wait_s is not None:
            raise RateLimitExceeded(
                "Too many failed authentication attempts from this address; retry later.",
                retry_after_s=wait_s)

    async def _refuse(self, client_ip: str) -> NoReturn:
        """A failure found without hashing: 401, or 429 like every other attempt once this address
        is past its limit, so a blocked client is not told 401 for a key it already tried."""
        await self._raise_if_blocked(client_ip)
        await self._p.failures.record(client_ip, self._p.clock.now())
        raise InvalidApiKey()


class ModelPolicy:
    """SPEC §4.3 and §4.7 over the in-process discovery copy; no I/O on the request path."""

    def __init__(self, catalog: ModelCatalog, clock: Clock) -> None:
        self._catalog = catalog
        self._clock = clock
        self._memo: dict[tuple[int, tuple[str, ...], bool], EffectiveModels] = {}

    def catalog(self) -> Catalog | None:
        return self._catalog.current(self._clock.now())

    def effective(self, principal: Principal) -> EffectiveModels:
        """The caller's effective set now; empty when discovery is empty or expired."""
        catalog = self._catalog.current(self._clock.now())
        if catalog is None:
            return EffectiveModels(by_canonical={})
        return self._resolve(catalog, principal)

    def _resolve(self, catalog: Catalog, principal: Principal) -> EffectiveModels:
        memo_key = (catalog.version, principal.allowed_models, principal.allow_all_models)
        found = self._memo.get(memo_key)
        if found is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            found = EffectiveModels.resolve(principal.allowed_models, principal.allow_all_models,
                                            catalog.names)
            self._memo[memo_key] = found
        return found

    def authorize(self, principal: Principal, scope: Scope, model: str) -> str:
        """The upstream name for *model*; one generic 403 for disallowed and nonexistent alike."""
        if scope not in principal.scopes:
            raise ScopeNotAllowed()
        upstream = self.effective(principal).lookup(model)
        if upstream is None:
            raise ModelNotAllowed()
        return upstream
