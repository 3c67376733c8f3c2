"""`neuronetz-gateway migrate`: create the database if it is missing, then `alembic upgrade head`."""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic.config import Config
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from alembic import command

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def alembic_config(database_url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.attributes["database_url"] = database_url
    return config


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
    command.upgrade(alembic_config(database_url), "head")
    if actor is not None:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("INSERT INTO gateway.admin_events (actor, action, target) VALUES (%s, 'migrate', "
                         "(SELECT version_num FROM gateway.alembic_version LIMIT 1))", (actor,))


def downgrade_to_base(database_url: str) -> None:
    command.downgrade(alembic_config(database_url), "base")
