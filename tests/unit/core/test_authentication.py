from __future__ import annotations

import asyncio

import pytest

from gateway_core.api_keys import cache_digest, generate_key
from gateway_core.errors import (
    DependencyUnavailable,
    InvalidApiKey,
    ModelNotAllowed,
    RateLimitExceeded,
    ScopeNotAllowed,
)
from gateway_core.gateway import Authenticator, AuthPorts, ModelPolicy
from gateway_core.limits import Limits
from gateway_core.models import Principal, Scope
from gateway_core.ports import NEGATIVE
from tests.fakes import (
    FrozenClock,
    InMemoryAuthFailures,
    InMemoryKeyCache,
    InMemoryPrincipalSource,
    InstantHasher,
    StaticCatalog,
    SwitchableFeed,
)


def _principal(prefix: str, **kw: object) -> Principal:
    base: dict[str, object] = dict(key_id=1, key_prefix=prefix, tenant_id=7, tenant_name="acme",
                                   scopes=frozenset(Scope), key_limits=Limits(),
                                   tenant_limits=Limits(1, 2, 3),
                                   allowed_models=("llama3.1:8b",))
    base.update(kw)
    return Principal(**base)  # type: ignore[arg-type]


class Rig:
    def __init__(self, failures_per_minute: int = 30) -> None:
        self.cache = InMemoryKeyCache()
        self.source = InMemoryPrincipalSource()
        self.failures = InMemoryAuthFailures(failures_per_minute)
        self.feed = SwitchableFeed()
        self.clock = FrozenClock()
        self.hasher = InstantHasher()
        self.auth = Authenticator(AuthPorts(cache=self.cache, source=self.source, hasher=self.hasher,
                                            failures=self.failures, feed=self.feed, clock=self.clock))

    async def add_key(self) -> str:
        key = generate_key()
        self.source.keys[key.prefix] = (await InstantHasher().hash(key.secret), _principal(key.prefix))
        return key.secret


class CountingHasher(InstantHasher):
    def __init__(self) -> None:
        self.verifications = 0

    async def verify(self, secret: str, hashed: str) -> bool:
        self.verifications += 1
        await asyncio.sleep(0.01)  # an argon2 run takes a while; others arrive meanwhile
        return await super().verify(secret, hashed)


class TestOneVerificationPerKey:
    async def test_requests_that_miss_the_cache_together_share_one_verification(self) -> None:
        rig = Rig()
        rig.hasher = hasher = CountingHasher()
        rig.auth = Authenticator(AuthPorts(cache=rig.cache, source=rig.source, hasher=hasher,
                                           failures=rig.failures, feed=rig.feed, clock=rig.clock))
        secret, other = await rig.add_key(), await rig.add_key()
        results = await asyncio.gather(*(rig.auth.authenticate(f"Bearer {k}", "1.2.3.4")
                                         for k in [secret] * 20 + [other] * 5))
        assert [r.key_prefix for r in results] == [secret[:12]] * 20 + [other[:12]] * 5
        assert hasher.verifications == 2  # one per key, not one per request

    async def test_a_wrong_key_shared_by_many_is_hashed_once_and_counted_per_caller(self) -> None:
        rig = Rig(failures_per_minute=1000)
        rig.hasher = hasher = CountingHasher()
        rig.auth = Authenticator(AuthPorts(cache=rig.cache, source=rig.source, hasher=hasher,
                                           failures=rig.failures, feed=rig.feed, clock=rig.clock))
        secret = await rig.add_key()
        wrong = secret[:12] + ("A" if secret[12] != "A" else "B") + secret[13:]
        outcomes = await asyncio.gather(*(rig.auth.authenticate(f"Bearer {wrong}", f"10.0.0.{i}")
                                          for i in range(10)), return_exceptions=True)
        assert all(isinstance(o, InvalidApiKey) for o in outcomes)
        assert hasher.verifications == 1
        for i in range(10):  # every caller's address has its failure recorded
            assert len(rig.failures.seen[f"10.0.0.{i}"]) == 1


class TestAuthenticate:
    async def test_a_valid_key_is_verified_once_then_served_from_the_cache(self) -> None:
        rig = Rig()
        secret = await rig.add_key()
        for _ in range(3):
            assert (await rig.auth.authenticate(f"Bearer {secret}", "1.2.3.4")).key_prefix == secret[:12]
        assert rig.source.lookups == 1
        assert cache_digest(secret) in rig.cache.entries

    async def test_every_failure_is_the_same_invalid_api_key(self) -> None:
        rig = Rig()
        secret = await rig.add_key()
        wrong_secret_same_prefix = secret[:12] + ("A" * 34)
        for header in [None, "", "Bearer", "Bearer abc", f"Basic {secret}", f"Bearer {generate_key().secret}",
                       f"Bearer {wrong_secret_same_prefix}"]:
            with pytest.raises(InvalidApiKey) as caught:
                await rig.auth.authenticate(header, "1.2.3.4")
            assert caught.value.message == InvalidApiKey().message

    async def test_a_sibling_key_with_the_same_prefix_is_refused_even_after_the_real_one_is_cached(
        self
    ) -> None:
        rig = Rig()
        secret = await rig.add_key()
        await rig.auth.authenticate(f"Bearer {secret}", "ip")
        sibling = secret[:12] + ("B" if secret[12] != "B" else "C") + secret[13:]
        with pytest.raises(InvalidApiKey):
            await rig.auth.authenticate(f"Bearer {sibling}", "ip")
        assert rig.cache.entries[cache_digest(sibling)] == NEGATIVE

    async def test_repeated_failures_from_one_ip_are_throttled_before_any_hash(self) -> None:
        rig = Rig(failures_per_minute=3)
        for _ in range(3):
            with pytest.raises(InvalidApiKey):
                await rig.auth.authenticate(f"Bearer {generate_key().secret}", "9.9.9.9")
        lookups = rig.source.lookups
        with pytest.raises(RateLimitExceeded) as caught:
            await rig.auth.authenticate(f"Bearer {generate_key().secret}", "9.9.9.9")
        assert caught.value.retry_after_s and caught.value.retry_after_s > 0
        assert rig.source.lookups == lookups  # no key was loaded, so no hash was checked
        secret = await rig.add_key()
        assert await rig.auth.authenticate(f"Bearer {secret}", "8.8.8.8")  # other IPs are unaffected

    async def test_nothing_is_trusted_while_the_change_feed_is_down(self) -> None:
        rig = Rig()
        secret = await rig.add_key()
        await rig.auth.authenticate(f"Bearer {secret}", "ip")
        rig.feed.up = False
        with pytest.raises(DependencyUnavailable):
            await rig.auth.authenticate(f"Bearer {secret}", "ip")

    async def test_a_load_that_raced_an_eviction_is_not_cached(self) -> None:
        rig = Rig()
        secret = await rig.add_key()
        original = rig.source.principal_by_prefix

        async def evicting_lookup(prefix: str) -> tuple[str, Principal] | None:
            found = await original(prefix)
            await rig.cache.evict_prefix(prefix)  # a revocation lands while the key is being verified
            return found

        rig.source.principal_by_prefix = evicting_lookup  # type: ignore[method-assign]
        await rig.auth.authenticate(f"Bearer {secret}", "ip")
        assert cache_digest(secret) not in rig.cache.entries


class TestModelPolicy:
    def test_scope_and_model_checks(self) -> None:
        policy = ModelPolicy(StaticCatalog(["llama3.1:8b", "qwen3:8b"]), FrozenClock())
        principal = _principal("nz_abcdefghi", scopes=frozenset({Scope.EMBEDDINGS}))
        with pytest.raises(ScopeNotAllowed):
            policy.authorize(principal, Scope.CHAT, "llama3.1:8b")
        chat = _principal("nz_abcdefghi")
        assert policy.authorize(chat, Scope.CHAT, "LLAMA3.1:8b") == "llama3.1:8b"
        for model in ("qwen3:8b", "does-not-exist"):
            with pytest.raises(ModelNotAllowed) as caught:
                policy.authorize(chat, Scope.CHAT, model)
            assert caught.value.message == ModelNotAllowed().message

    def test_expired_discovery_resolves_nothing(self) -> None:
        clock = FrozenClock()
        policy = ModelPolicy(StaticCatalog(["llama3.1:8b"], expires_at=clock.now() + 5), clock)
        assert policy.effective(_principal("nz_abcdefghi")).names() == ["llama3.1:8b"]
        clock.advance(6)
        with pytest.raises(ModelNotAllowed):
            policy.authorize(_principal("nz_abcdefghi"), Scope.CHAT, "llama3.1:8b")


class TestEqualCost:
    async def test_unknown_revoked_and_wrong_secret_attempts_all_verify_one_hash(self) -> None:
        rig = Rig()
        secret = await rig.add_key()
        calls: list[str] = []
        verify = rig.hasher.verify

        async def counting(candidate: str, hashed: str) -> bool:
            calls.append(hashed)
            return await verify(candidate, hashed)

        rig.hasher.verify = counting  # type: ignore[method-assign]
        unknown = "nz_" + "Z" * 43
        wrong = secret[:12] + ("A" if secret[12] != "A" else "B") + secret[13:]
        for attempt in (unknown, wrong):
            with pytest.raises(InvalidApiKey):
                await rig.auth.authenticate(f"Bearer {attempt}", "ip")
        assert len(calls) == 2  # the unknown prefix was checked against a dummy hash too
