"""`neuronetz-gateway migrate`: create the database if it is missing, then `alembic upgrade head`.

The migration scripts ship inside the installed package (`entrypoints/migrations`, a link to the
top-level `alembic/` directory in a checkout, real files in a wheel), so `migrate` needs no
`alembic.ini` and works from any install: they are found with importlib.resources.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import psycopg
from alembic.config import Config
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from alembic import command

MIGRATIONS = "migrations"


@contextmanager
def script_location() -> Iterator[Path]:
    """The directory holding env.py and versions/, as a real path for as long as alembic needs it."""
    shipped = resources.files("entrypoints").joinpath(MIGRATIONS)
    with resources.as_file(shipped) as path:
        if not (path / "env.py").is_file():
            raise RuntimeError(f"the migration scripts are missing from the installed package ({path})")
        yield path


@contextmanager
def alembic_config(database_url: str) -> Iterator[Config]:
    with script_location() as location:
        config = Config()
        config.set_main_option("script_location", str(location))
        config.attributes["database_url"] = database_url
        yield config


def ensure_database(database_url: str) -> bool:
    """Create the target database when it does not exist yet; True when it was created."""
    params = conninfo_to_dict(database_url)
    name = params.get("dbname") or "postgres"
    try:
        psycopg.connect(database_url, connect_timeout=5).close()
        return False
    except psycopg.OperationalError as exc:
        if f'database "{name}" does not exist' not in str(exc):
            raise
    with psycopg.connect(make_conninfo(database_url, dbname="postgres"), autocommit=True,
                         connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(name))))
    return True


def upgrade_to_head(database_url: str, actor: str | None = None) -> None:
    ensure_database(database_url)
    with alembic_config(database_url) as config:
        command.upgrade(config, "head")
    if actor is not None:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("INSERT INTO gateway.admin_events (actor, action, target) VALUES (%s, 'migrate', "
                         "(SELECT version_num FROM gateway.alembic_version LIMIT 1))", (actor,))


def downgrade_to_base(database_url: str) -> None:
    with alembic_config(database_url) as config:
        command.downgrade(config, "base")
