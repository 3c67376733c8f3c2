from __future__ import annotations

import pytest

from gateway_core.admin import KEEP, Admin, parse_models, parse_scopes
from gateway_core.errors import AdminError
from gateway_core.limits import Limits
from gateway_core.models import KeyStatus, Scope
from tests.fakes import FrozenClock, InMemoryDiscovery, InMemoryTenantStore, InstantHasher


@pytest.fixture
def store() -> InMemoryTenantStore:
    return InMemoryTenantStore()


@pytest.fixture
def admin(store: InMemoryTenantStore) -> Admin:
    return Admin(store, InstantHasher(), InMemoryDiscovery(["qwen3:8b", "llama3.1:8b"]), FrozenClock(), "ops")


async def _tenant(admin: Admin, name: str = "acme") -> None:
    await admin.create_tenant(name, Limits(120, 200_000, 8))


class TestTenantsAndKeys:
    async def test_create_key_returns_the_secret_once_and_stores_only_its_hash(
        self, admin: Admin, store: InMemoryTenantStore
    ) -> None:
        await _tenant(admin)
        new, record = await admin.create_key("acme", "prod-server-1")
        assert record.prefix == new.secret[:12]
        assert new.secret not in repr(store.keys) and record.key_hash.startswith("$argon2id$")
        assert record.scopes == {Scope.CHAT, Scope.EMBEDDINGS}

    @pytest.mark.parametrize("name", ["alpha one", "Zürich build box", "x" * 64, "k'quoted"])
    async def test_key_names_are_human_labels(self, admin: Admin, name: str) -> None:
        await _tenant(admin)
        _, record = await admin.create_key("acme", name)
        assert record.name == name

    @pytest.mark.parametrize("name", ["", " ", "x" * 65, "a\nprefix=nz_fake", "tab\there", "bell\x07",
                                      "rtl\u202eoverride"])
    async def test_key_names_with_control_characters_or_out_of_length_are_refused(
        self, admin: Admin, store: InMemoryTenantStore, name: str
    ) -> None:
        await _tenant(admin)
        before = len(store.events)
        with pytest.raises(AdminError):
            await admin.create_key("acme", name)
        assert len(store.events) == before and not store.keys

    async def test_every_change_is_recorded_with_its_actor(
        self, admin: Admin, store: InMemoryTenantStore
    ) -> None:
        await _tenant(admin)
        new, _ = await admin.create_key("acme", "k")
        await admin.revoke_key(new.prefix)
        assert [(e.actor, e.action) for e in store.events] == [
            ("ops", "create-tenant"), ("ops", "create-key"), ("ops", "revoke-key")]

    async def test_bad_input_is_refused_and_changes_nothing(
        self, admin: Admin, store: InMemoryTenantStore
    ) -> None:
        await _tenant(admin)
        before = len(store.events)
        for attempt in (
            admin.create_tenant("acme", Limits(1, 1, 1)),
            admin.create_tenant("bad name!", Limits(1, 1, 1)),
            admin.create_key("nope", "k"),
            admin.revoke_key("nz_short"),
            admin.revoke_key("nz_abcdefghi"),
            admin.set_key_limits("nz_abcdefghi", 5, KEEP, KEEP),
            admin.set_tenant_limits("acme", None, KEEP, KEEP),
            admin.set_tenant_limits("acme", KEEP, KEEP, KEEP),
            admin.show_usage("acme", "week", None),
        ):
            with pytest.raises(AdminError):
                await attempt
        assert len(store.events) == before

    async def test_revoking_twice_is_an_error(self, admin: Admin) -> None:
        await _tenant(admin)
        new, _ = await admin.create_key("acme", "k")
        await admin.revoke_key(new.prefix)
        assert (await admin.list_keys("acme"))[0].status is KeyStatus.REVOKED
        with pytest.raises(AdminError, match="already revoked"):
            await admin.revoke_key(new.prefix)

    def test_scopes_and_model_lists_are_validated(self) -> None:
        assert parse_scopes("chat") == {Scope.CHAT}
        for bad in ("", "chat,admin", " , "):
            with pytest.raises(AdminError):
                parse_scopes(bad)
        assert parse_models("a:1, b ,a:1") == ("a:1", "b")
        with pytest.raises(AdminError):
            parse_models("ok,bad model")


class TestLimitsBudgetsModels:
    async def test_none_clears_a_key_limit_and_keep_leaves_it(self, admin: Admin) -> None:
        await _tenant(admin)
        new, _ = await admin.create_key("acme", "k", limits=Limits(rpm=5, tpm=100))
        assert await admin.set_key_limits(new.prefix, None, KEEP, 2) == Limits(None, 100, 2)

    async def test_budget_changes_merge_with_the_existing_budget(self, admin: Admin) -> None:
        await _tenant(admin)
        new, _ = await admin.create_key("acme", "k")
        await admin.set_budget(new.prefix, 1000, KEEP, 5000)
        budget = await admin.set_budget(new.prefix, None, 9000, KEEP)
        assert (budget.daily, budget.monthly, budget.total) == (None, 9000, 5000)

    async def test_list_models_shows_discovered_and_the_tenants_effective_set(self, admin: Admin) -> None:
        await _tenant(admin)
        await admin.set_models("acme", ("qwen3:8b", "mistral:7b"), None)
        assert await admin.list_models("acme") == (["llama3.1:8b", "qwen3:8b"], ["qwen3:8b"])

    async def test_an_empty_discovery_cache_is_reported_not_invented(
        self, store: InMemoryTenantStore
    ) -> None:
        admin = Admin(store, InstantHasher(), InMemoryDiscovery(None), FrozenClock(), "ops")
        await _tenant(admin)
        await admin.set_models("acme", (), True)
        assert await admin.list_models("acme") == (None, [])
