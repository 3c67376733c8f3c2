"""Every operator command against real PostgreSQL and Redis, happy path and bad input (SPEC §11)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import psycopg
import pytest

from adapters.redis.discovery import DISCOVERED_KEY
from entrypoints.migrate import downgrade_to_base, upgrade_to_head
from gateway_core.budget import Period
from tests.integration.conftest import RunCli, unique
from tests.services import as_url, create_database, drop_database

Conn = psycopg.Connection[tuple[object, ...]]


def _tenant(cli: RunCli, **limits: int) -> str:
    name = unique("acme")
    lim = {"rpm": 120, "tpm": 200000, "concurrent": 8, **limits}
    res = cli("create-tenant", "--name", name, *[f"--{k}={v}" for k, v in lim.items()])
    assert res.code == 0, res.err
    return name


def _key(cli: RunCli, tenant: str, *extra: str) -> dict[str, str]:
    res = cli("create-key", "--tenant", tenant, "--name", unique("k"), *extra)
    assert res.code == 0, res.err
    return res.pairs()


def _events(db: Conn) -> int:
    return int(db.execute("SELECT count(*) FROM gateway.admin_events").fetchone()[0])  # type: ignore[index]


def _snapshot(db: Conn) -> list[object]:
    tables = ["tenants", "api_keys", "budgets", "revocations", "admin_events"]
    return [db.execute(f"SELECT * FROM gateway.{t} ORDER BY 1").fetchall() for t in tables]


class TestMigrations:
    def test_migrate_twice_is_harmless_and_downgrade_base_then_upgrade_works(self) -> None:
        url = as_url(create_database())
        try:
            upgrade_to_head(url)
            upgrade_to_head(url)
            downgrade_to_base(url)
            with psycopg.connect(url) as conn:
                left = conn.execute("SELECT count(*) FROM information_schema.tables "
                                    "WHERE table_schema = 'gateway' AND table_name <> 'alembic_version'")
                assert left.fetchone() == (0,)
            upgrade_to_head(url)
        finally:
            drop_database(url)

    def test_migrate_command_creates_a_missing_database(self, cli: RunCli) -> None:
        url = as_url(create_database())
        drop_database(url)
        try:
            res = cli("migrate", env={"DATABASE_URL": url})
            assert res.code == 0 and res.pairs() == {"migrated": "head"}, res.err
        finally:
            drop_database(url)


class TestTenantsAndKeys:
    def test_create_key_prints_the_key_once_and_stores_only_an_argon2id_hash(
        self, cli: RunCli, db: Conn
    ) -> None:
        tenant = _tenant(cli)
        res = cli("create-key", "--tenant", tenant, "--name", "prod-server-1")
        assert res.code == 0, res.err
        pairs = res.pairs()
        key, prefix = pairs["key"], pairs["prefix"]
        assert re.fullmatch(r"nz_[A-Za-z0-9_-]{43}", key) and len(key) == 46
        assert prefix == key[:12] and len(prefix) == 12
        (hashed,) = db.execute("SELECT key_hash FROM gateway.api_keys WHERE prefix = %s",
                               (prefix,)).fetchone()
        assert str(hashed).startswith("$argon2id$v=19$m=19456,t=2,p=1$")
        tables = [r[0] for r in db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'gateway'")]
        for table in tables:
            hits = db.execute(f"SELECT count(*) FROM gateway.{table} t WHERE t::text LIKE %s",
                              (f"%{key[12:]}%",)).fetchone()
            assert hits == (0,), f"gateway.{table} holds the key"

    def test_list_keys_shows_prefix_status_name_and_created_but_never_a_secret(
        self, cli: RunCli, db: Conn
    ) -> None:
        tenant = _tenant(cli)
        res = cli("create-key", "--tenant", tenant, "--name", "prod-server-1")
        key = res.pairs()["key"]
        listing = cli("list-keys", "--tenant", tenant)
        assert listing.code == 0
        line = listing.out.strip()
        assert re.fullmatch(
            rf"prefix={re.escape(key[:12])} status=active name='prod-server-1' "
            r"created=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line), line
        assert key[12:] not in listing.out and "$argon2" not in listing.out
        as_json = json.loads(cli("list-keys", "--tenant", tenant, "--json").out)
        assert as_json[0]["prefix"] == key[:12] and "key_hash" not in as_json[0]

    def test_a_key_name_is_a_human_label_quoted_in_list_keys(self, cli: RunCli) -> None:
        tenant = _tenant(cli)
        key = cli("create-key", "--tenant", tenant, "--name", "alpha one's box").pairs()["key"]
        line = cli("list-keys", "--tenant", tenant).out.strip()
        assert f"prefix={key[:12]} status=active name='alpha one'\\''s box' created=" in line, line
        refused = cli("create-key", "--tenant", tenant, "--name", "a\nprefix=nz_forged")
        assert refused.code != 0 and len(refused.err.strip().splitlines()) == 1

    def test_scopes_and_key_limits_are_stored(self, cli: RunCli, db: Conn) -> None:
        tenant = _tenant(cli)
        pairs = _key(cli, tenant, "--scopes", "embeddings", "--rpm", "5", "--concurrent", "0")
        row = db.execute("SELECT scopes, rpm, tpm, concurrent FROM gateway.api_keys WHERE prefix = %s",
                         (pairs["prefix"],)).fetchone()
        assert row == (["embeddings"], 5, None, 0)

    def test_changes_are_recorded_as_admin_events_with_the_actor(self, cli: RunCli, db: Conn) -> None:
        tenant = _tenant(cli)
        prefix = _key(cli, tenant)["prefix"]
        rows = db.execute("SELECT actor, action, target FROM gateway.admin_events "
                          "WHERE target IN (%s, %s) ORDER BY id", (tenant, prefix)).fetchall()
        assert rows == [("test-operator", "create-tenant", tenant), ("test-operator", "create-key", prefix)]


class TestRevocation:
    @pytest.mark.parametrize("how", ["cli", "console-insert"])
    def test_revocation_flips_the_key_and_notifies_key_revoked_with_the_prefix(
        self, cli: RunCli, db: Conn, database_url: str, how: str
    ) -> None:
        tenant = _tenant(cli)
        prefix = _key(cli, tenant)["prefix"]
        with psycopg.connect(database_url, autocommit=True) as listener:
            listener.execute("LISTEN key_revoked")
            if how == "cli":
                res = cli("revoke-key", "--prefix", prefix)
                assert res.code == 0 and res.pairs() == {"prefix": prefix, "status": "revoked"}, res.err
            else:
                db.execute("INSERT INTO gateway.revocations (key_prefix, source) VALUES (%s, 'console')",
                           (prefix,))
            payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert payloads == [prefix]
        status, revoked_at = db.execute("SELECT status, revoked_at FROM gateway.api_keys WHERE prefix = %s",
                                        (prefix,)).fetchone()  # type: ignore[misc]
        assert status == "revoked" and revoked_at is not None
        assert "status=revoked" in cli("list-keys", "--tenant", tenant).out

    def test_console_insert_for_an_unknown_prefix_is_refused(self, db: Conn) -> None:
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            db.execute("INSERT INTO gateway.revocations (key_prefix, source) VALUES ('nz_000000000', 'x')")


class TestLimitsBudgetsModelsPromptLog:
    def test_set_limits_for_tenant_and_key_with_none_clearing_a_key_value(
        self, cli: RunCli, db: Conn
    ) -> None:
        tenant = _tenant(cli)
        prefix = _key(cli, tenant, "--rpm", "5")["prefix"]
        res = cli("set-limits", "--tenant", tenant, "--rpm", "60", "--concurrent", "2")
        assert res.code == 0 and res.pairs() == {"tenant": tenant, "rpm": "60", "tpm": "200000",
                                                 "concurrent": "2"}, res.err
        res = cli("set-limits", "--key", prefix, "--rpm", "none", "--tpm", "1000")
        assert res.code == 0, res.err
        row = db.execute("SELECT rpm, tpm, concurrent FROM gateway.api_keys WHERE prefix = %s",
                         (prefix,)).fetchone()
        assert row == (None, 1000, None)

    def test_set_budget_sets_and_clears_periods(self, cli: RunCli, db: Conn) -> None:
        prefix = _key(cli, _tenant(cli))["prefix"]
        assert cli("set-budget", "--key", prefix, "--daily", "1000000", "--total", "500").code == 0
        res = cli("set-budget", "--key", prefix, "--daily", "none", "--monthly", "30000000")
        assert res.pairs() == {"key": prefix, "daily": "none", "monthly": "30000000", "total": "500"}
        row = db.execute("SELECT b.daily, b.monthly, b.total FROM gateway.budgets b JOIN gateway.api_keys k"
                         " ON k.id = b.key_id WHERE k.prefix = %s", (prefix,)).fetchone()
        assert row == (None, 30000000, 500)

    def test_set_models_and_list_models_against_the_discovery_cache(
        self, cli: RunCli, redis_server: object
    ) -> None:
        import redis

        tenant = _tenant(cli)
        res = cli("set-models", "--tenant", tenant, "--models", "llama3.1:8b,mistral:7b")
        assert res.code == 0 and res.pairs()["models"] == "llama3.1:8b,mistral:7b", res.err
        client = redis.Redis.from_url(redis_server.url)  # type: ignore[attr-defined]
        client.delete(DISCOVERED_KEY)
        empty = cli("list-models", "--tenant", tenant)
        assert empty.code == 0 and empty.pairs() == {"discovered": "", "effective": ""}
        assert "empty" in empty.err
        client.set(DISCOVERED_KEY, json.dumps(["llama3.1:8b", "qwen3:8b"]), ex=60)
        try:
            assert cli("list-models").pairs() == {"discovered": "llama3.1:8b,qwen3:8b"}
            assert cli("list-models", "--tenant", tenant).pairs()["effective"] == "llama3.1:8b"
            assert json.loads(cli("list-models", "--tenant", tenant, "--json").out) == {
                "discovered": ["llama3.1:8b", "qwen3:8b"], "effective": ["llama3.1:8b"]}
            assert cli("set-models", "--tenant", tenant, "--allow-all").code == 0
            assert cli("list-models", "--tenant", tenant).pairs()["effective"] == "llama3.1:8b,qwen3:8b"
            assert cli("set-models", "--tenant", tenant, "--no-allow-all").code == 0
            assert cli("list-models", "--tenant", tenant).pairs()["effective"] == "llama3.1:8b"
        finally:
            client.delete(DISCOVERED_KEY)

    def test_set_prompt_log_enables_with_retention_and_disables(self, cli: RunCli, db: Conn) -> None:
        prefix = _key(cli, _tenant(cli))["prefix"]
        assert cli("set-prompt-log", "--key", prefix, "--enable", "--retention-days", "3").code == 0
        query = "SELECT prompt_log_enabled, prompt_log_retention_days FROM gateway.api_keys WHERE prefix = %s"
        assert db.execute(query, (prefix,)).fetchone() == (True, 3)
        assert cli("set-prompt-log", "--key", prefix, "--disable").code == 0
        assert db.execute(query, (prefix,)).fetchone() == (False, 3)


class TestShowUsage:
    def test_show_usage_sums_the_ledger_per_period_and_per_key(self, cli: RunCli, db: Conn) -> None:
        tenant = _tenant(cli)
        a, b = _key(cli, tenant)["prefix"], _key(cli, tenant)["prefix"]
        now = datetime.now(UTC).timestamp()
        rows = [(a, Period.DAILY, 2, 30, 40), (b, Period.DAILY, 1, 5, 6), (a, Period.MONTHLY, 7, 100, 200),
                (a, Period.TOTAL, 9, 1000, 2000)]
        for prefix, period, req, tin, tout in rows:
            db.execute("INSERT INTO gateway.budget_usage (key_id, period, period_start, requests, tokens_in,"
                       " tokens_out) SELECT id, %s, %s, %s, %s, %s FROM gateway.api_keys WHERE prefix = %s",
                       (period.value, period.start(now), req, tin, tout, prefix))
        db.execute("INSERT INTO gateway.budget_usage (key_id, period, period_start, requests, tokens_in,"
                   " tokens_out) SELECT id, 'daily', '2001-01-01', 50, 50, 50 FROM gateway.api_keys"
                   " WHERE prefix = %s", (a,))
        assert cli("show-usage", "--tenant", tenant, "--period", "day").out.split() == [
            "requests=3", "tokens_in=35", "tokens_out=46"]
        assert cli("show-usage", "--tenant", tenant, "--period", "day", "--key", b).pairs() == {
            "requests": "1", "tokens_in": "5", "tokens_out": "6"}
        assert cli("show-usage", "--tenant", tenant, "--period", "month").pairs()["tokens_out"] == "200"
        total = json.loads(cli("show-usage", "--tenant", tenant, "--period", "total", "--json").out)
        assert total == {"requests": 9, "tokens_in": 1000, "tokens_out": 2000}

    def test_a_new_tenant_shows_zeros(self, cli: RunCli) -> None:
        res = cli("show-usage", "--tenant", _tenant(cli), "--period", "total")
        assert res.out.split() == ["requests=0", "tokens_in=0", "tokens_out=0"]


@pytest.fixture(scope="module")
def victim(cli: RunCli) -> tuple[str, str]:
    tenant = _tenant(cli)
    return tenant, _key(cli, tenant)["prefix"]


class TestBadInput:
    @pytest.mark.parametrize("args", [
        ["create-tenant", "--name", "{t}", "--rpm", "1", "--tpm", "1", "--concurrent", "1"],
        ["create-tenant", "--name", "new-{t}", "--rpm", "-5", "--tpm", "1", "--concurrent", "1"],
        ["create-tenant", "--name", "new-{t}", "--rpm", "ten", "--tpm", "1", "--concurrent", "1"],
        ["create-tenant", "--name", "has space", "--rpm", "1", "--tpm", "1", "--concurrent", "1"],
        ["create-tenant", "--name", "new-{t}", "--rpm", "1"],
        ["create-key", "--tenant", "no-such-tenant", "--name", "k"],
        ["create-key", "--tenant", "{t}", "--name", "k", "--scopes", "chat,admin"],
        ["create-key", "--tenant", "{t}", "--name", "k", "--tpm", "-1"],
        ["list-keys", "--tenant", "no-such-tenant"],
        ["revoke-key", "--prefix", "nz_short"],
        ["revoke-key", "--prefix", "nz_000000000"],
        ["set-limits", "--tenant", "{t}", "--rpm", "none"],
        ["set-limits", "--tenant", "{t}", "--key", "{p}", "--rpm", "1"],
        ["set-limits", "--key", "{p}"],
        ["set-limits", "--key", "{p}", "--rpm", "1.5"],
        ["set-limits", "--key", "{p}", "--rpm", "²"],
        ["set-limits", "--key", "{p}", "--rpm", "٣"],
        ["set-limits", "--key", "{p}", "--rpm", "1_000"],
        ["set-limits", "--key", "{p}", "--rpm", "2147483648"],
        ["create-tenant", "--name", "new-{t}", "--rpm", "²", "--tpm", "1", "--concurrent", "1"],
        ["set-budget", "--key", "{p}", "--daily", "99999999999999999999"],
        ["set-budget", "--key", "nz_000000000", "--daily", "5"],
        ["set-budget", "--key", "{p}", "--daily", "-5"],
        ["set-models", "--tenant", "{t}"],
        ["set-models", "--tenant", "{t}", "--models", "ok,not ok"],
        ["set-prompt-log", "--key", "{p}"],
        ["set-prompt-log", "--key", "{p}", "--enable", "--retention-days", "0"],
        ["show-usage", "--tenant", "{t}", "--period", "week"],
        ["show-usage", "--tenant", "{t}", "--period", "day", "--key", "nz_000000000"],
        ["no-such-command"],
    ])
    def test_bad_input_prints_one_line_exits_non_zero_and_changes_nothing(
        self, cli: RunCli, db: Conn, victim: tuple[str, str], args: list[str]
    ) -> None:
        tenant, prefix = victim
        before = _snapshot(db)
        res = cli(*[a.format(t=tenant, p=prefix) for a in args])
        assert res.code != 0
        assert res.out == ""
        assert len(res.err.strip().splitlines()) == 1 and res.err.startswith("error: "), res.err
        assert _snapshot(db) == before

    def test_a_revoked_key_cannot_be_revoked_again(self, cli: RunCli) -> None:
        prefix = _key(cli, _tenant(cli))["prefix"]
        assert cli("revoke-key", "--prefix", prefix).code == 0
        res = cli("revoke-key", "--prefix", prefix)
        assert res.code == 1 and "already revoked" in res.err

    def test_a_bad_setting_stops_the_command_with_one_line_naming_it(self, cli: RunCli) -> None:
        res = cli("list-keys", "--tenant", "x", env={"KEY_CACHE_TTL_S": "soon"})
        assert res.code != 0 and res.err.strip().count("\n") == 0 and "KEY_CACHE_TTL_S" in res.err

    def test_an_unreachable_database_is_one_line_not_a_traceback(self, cli: RunCli) -> None:
        from tests.services import free_port

        url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
        res = cli("list-keys", "--tenant", "x", env={"DATABASE_URL": url})
        assert res.code != 0 and res.err.count("\n") == 1 and "Traceback" not in res.err, res.err
