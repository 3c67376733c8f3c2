"""The operator CLI (SPEC §11): `key=value` lines (or --json), one-line errors, non-zero exit."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from entrypoints.settings import Settings, SettingsError, load_settings
from gateway_core.admin import KEEP, Admin, Change, parse_models, parse_scopes
from gateway_core.errors import AdminError, DependencyUnavailable
from gateway_core.limits import Limits

T = TypeVar("T")


INT_MAX = 2**31 - 1  # a Postgres integer column
BIGINT_MAX = 2**63 - 1  # a Postgres bigint column
_ASCII_DIGITS = re.compile(r"[0-9]+")


class _Count(click.ParamType):
    """A whole number ≥ 0 in ASCII digits, at most *maximum* (what its column holds); with
    `clearable`, also `none` (clears a key-level value or a budget)."""

    name = "count"

    def __init__(self, clearable: bool = False, maximum: int = INT_MAX) -> None:
        self.clearable = clearable
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value is None or value is KEEP:
            return value
        text = str(value).strip().lower()
        if self.clearable and text == "none":
            return None
        # Not str.isdigit(): it is true for "²" and other digits int() refuses or reads otherwise.
        if not _ASCII_DIGITS.fullmatch(text):
            expected = "a whole number ≥ 0 or 'none'" if self.clearable else "a whole number ≥ 0"
            self.fail(f"{value!r} is not {expected}", param, ctx)
        if len(text) > len(str(self.maximum)) or int(text) > self.maximum:
            self.fail(f"{value!r} is larger than {self.maximum}", param, ctx)
        return int(text)


COUNT = _Count()
CLEARABLE = _Count(clearable=True)
BIG_COUNT = _Count(maximum=BIGINT_MAX)
BIG_CLEARABLE = _Count(clearable=True, maximum=BIGINT_MAX)


def _actor() -> str:
    actor = os.environ.get("NEURONETZ_ACTOR", "").strip()
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        _fail(str(exc), 2)


def _run(action: Callable[[Admin], Awaitable[T]]) -> T:
    """Run one use case against real Postgres/Redis; every failure becomes one line on stderr."""
    from entrypoints.app import open_admin

    # The pool's own connection warnings would add lines to the one-line error below.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

    async def go() -> T:
        async with open_admin(_settings(), _actor()) as admin:
            return await action(admin)

    try:
        return asyncio.run(go())
    except AdminError as exc:
        _fail(str(exc))
    except DependencyUnavailable as exc:
        cause = exc.__cause__
        _fail(exc.message if "DATABASE_URL" in exc.message else
              f"a dependency is unavailable ({type(cause).__name__ if cause else 'unknown'}); "
              "check DATABASE_URL and REDIS_URL")
    except psycopg.errors.UndefinedTable:
        _fail("the database schema is missing; run 'neuronetz-gateway migrate' first")
    except psycopg.Error as exc:
        _fail(f"database error: {type(exc).__name__}")


def _emit(pairs: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(pairs, default=str))
        return
    for name, value in pairs.items():
        click.echo(f"{name}={_plain(value)}")


def _plain(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _when(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """neuronetz-gateway: a multi-tenant gateway in front of Ollama."""


@cli.command()
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Processes on the one port (SO_REUSEPORT); default GATEWAY_WORKERS.")
def serve(workers: int | None) -> None:
    """Run the gateway."""
    from entrypoints.server import serve as run_server

    settings = _settings()
    count = settings.gateway_workers if workers is None else workers
    # Worker i serves /metrics on METRICS_PORT + i (docs/operations.md).
    if settings.metrics_port + count - 1 > 65535:
        _fail(f"METRICS_PORT={settings.metrics_port} leaves no room for {count} workers' metrics ports", 2)
    run_server(settings, count)


@cli.command()
@json_option
def migrate(as_json: bool) -> None:
    """Upgrade the schema to the newest migration (safe to run again)."""
    from entrypoints.migrate import upgrade_to_head

    settings = _settings()
    try:
        upgrade_to_head(settings.database_url, _actor())
    except psycopg.OperationalError:
        _fail("cannot reach PostgreSQL at DATABASE_URL")
    _emit({"migrated": "head"}, as_json)


@cli.command("create-tenant")
@click.option("--name", required=True)
@click.option("--rpm", type=COUNT, required=True)
@click.option("--tpm", type=BIG_COUNT, required=True)
@click.option("--concurrent", type=COUNT, required=True)
@click.option("--allow-all-models", is_flag=True, default=False)
@json_option
def create_tenant(name: str, rpm: int, tpm: int, concurrent: int, allow_all_models: bool,
                  as_json: bool) -> None:
    """Create a tenant with its default limits."""
    tenant = _run(lambda a: a.create_tenant(name, Limits(rpm, tpm, concurrent), allow_all_models))
    _emit({"tenant": tenant.name, "rpm": rpm, "tpm": tpm, "concurrent": concurrent,
           "allow_all_models": tenant.allow_all_models}, as_json)


@cli.command("create-key")
@click.option("--tenant", required=True)
@click.option("--name", required=True)
@click.option("--scopes", default="chat,embeddings", show_default=True)
@click.option("--rpm", type=COUNT)
@click.option("--tpm", type=BIG_COUNT)
@click.option("--concurrent", type=COUNT)
@json_option
def create_key(tenant: str, name: str, scopes: str, rpm: int | None, tpm: int | None,
               concurrent: int | None, as_json: bool) -> None:
    """Create a key; the full key is printed now and never again."""
    try:
        wanted = parse_scopes(scopes)
    except AdminError as exc:
        _fail(str(exc))
    new, record = _run(lambda a: a.create_key(tenant, name, wanted, Limits(rpm, tpm, concurrent)))
    _emit({"key": new.secret, "prefix": record.prefix, "tenant": tenant, "name": record.name,
           "scopes": sorted(record.scopes)}, as_json)


@cli.command("list-keys")
@click.option("--tenant", required=True)
@json_option
def list_keys(tenant: str, as_json: bool) -> None:
    """List a tenant's keys (never a full key or a hash)."""
    keys = _run(lambda a: a.list_keys(tenant))
    rows = [{"prefix": k.prefix, "status": k.status.value, "name": k.name, "created": _when(k.created_at),
             "scopes": sorted(k.scopes), "rpm": k.limits.rpm, "tpm": k.limits.tpm,
             "concurrent": k.limits.concurrent, "prompt_log": k.prompt_log_enabled} for k in keys]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"prefix={r['prefix']} status={r['status']} name={_quoted(r['name'])} "
                   f"created={r['created']}")


@cli.command("revoke-key")
@click.option("--prefix", required=True)
@json_option
def revoke_key(prefix: str, as_json: bool) -> None:
    """Revoke a key on every replica within a second."""
    _run(lambda a: a.revoke_key(prefix))
    _emit({"prefix": prefix, "status": "revoked"}, as_json)


@cli.command("set-limits")
@click.option("--tenant")
@click.option("--key", "prefix")
@click.option("--rpm", type=CLEARABLE, default=KEEP)
@click.option("--tpm", type=BIG_CLEARABLE, default=KEEP)
@click.option("--concurrent", type=CLEARABLE, default=KEEP)
@json_option
def set_limits(tenant: str | None, prefix: str | None, rpm: Change, tpm: Change, concurrent: Change,
               as_json: bool) -> None:
    """Change a tenant's or a key's limits; `none` clears a key-level value."""
    if (tenant is None) == (prefix is None):
        _fail("set-limits needs exactly one of --tenant or --key")
    if tenant is not None:
        limits = _run(lambda a: a.set_tenant_limits(tenant, rpm, tpm, concurrent))
        target = {"tenant": tenant}
    else:
        assert prefix is not None
        limits = _run(lambda a: a.set_key_limits(prefix, rpm, tpm, concurrent))
        target = {"key": prefix}
    _emit({**target, "rpm": limits.rpm, "tpm": limits.tpm, "concurrent": limits.concurrent}, as_json)


@cli.command("set-budget")
@click.option("--key", "prefix", required=True)
@click.option("--daily", type=BIG_CLEARABLE, default=KEEP)
@click.option("--monthly", type=BIG_CLEARABLE, default=KEEP)
@click.option("--total", type=BIG_CLEARABLE, default=KEEP)
@json_option
def set_budget(prefix: str, daily: Change, monthly: Change, total: Change, as_json: bool) -> None:
    """Set a key's token budgets per period; `none` clears one."""
    budget = _run(lambda a: a.set_budget(prefix, daily, monthly, total))
    _emit({"key": prefix, "daily": budget.daily, "monthly": budget.monthly, "total": budget.total},
          as_json)


@cli.command("set-models")
@click.option("--tenant", required=True)
@click.option("--models")
@click.option("--allow-all/--no-allow-all", default=None)
@json_option
def set_models(tenant: str, models: str | None, allow_all: bool | None, as_json: bool) -> None:
    """Set a tenant's model allowlist and/or allow_all_models."""
    try:
        allowed = parse_models(models) if models is not None else None
    except AdminError as exc:
        _fail(str(exc))
    updated = _run(lambda a: a.set_models(tenant, allowed, allow_all))
    _emit({"tenant": tenant, "models": list(updated.allowed_models),
           "allow_all_models": updated.allow_all_models}, as_json)


@cli.command("list-models")
@click.option("--tenant")
@json_option
def list_models(tenant: str | None, as_json: bool) -> None:
    """Show the discovered models and, with --tenant, that tenant's effective set."""
    discovered, effective = _run(lambda a: a.list_models(tenant))
    if discovered is None:
        click.echo("note: the discovery cache is empty or expired, so no model resolves; "
                   "it fills while a gateway runs and Ollama answers", err=True)
    pairs: dict[str, Any] = {"discovered": discovered or []}
    if tenant is not None:
        pairs["effective"] = effective or []
    _emit(pairs, as_json)


@cli.command("set-prompt-log")
@click.option("--key", "prefix", required=True)
@click.option("--enable/--disable", "enabled", required=True, default=None)
@click.option("--retention-days", type=COUNT)
@json_option
def set_prompt_log(prefix: str, enabled: bool, retention_days: int | None, as_json: bool) -> None:
    """Turn prompt logging on or off for one key."""
    key = _run(lambda a: a.set_prompt_log(prefix, enabled, retention_days))
    _emit({"key": prefix, "prompt_log": key.prompt_log_enabled,
           "retention_days": key.prompt_log_retention_days}, as_json)


@cli.command("show-usage")
@click.option("--tenant", required=True)
@click.option("--period", required=True, type=click.Choice(["day", "month", "total"]))
@click.option("--key", "prefix")
@json_option
def show_usage(tenant: str, period: str, prefix: str | None, as_json: bool) -> None:
    """Requests and tokens from the ledger for the current UTC day, month, or all time."""
    usage = _run(lambda a: a.show_usage(tenant, period, prefix))
    _emit({"requests": usage.requests, "tokens_in": usage.tokens_in, "tokens_out": usage.tokens_out},
          as_json)


def main() -> None:
    """Console entry point: click's multi-line usage errors become one line as well."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except SystemExit:
        raise
