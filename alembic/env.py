from __future__ import annotations

from sqlalchemy import create_engine, text

from alembic import context
from entrypoints.settings import load_settings

VERSION_TABLE_SCHEMA = "gateway"


def _sqlalchemy_url() -> str:
    url = context.config.attributes.get("database_url") or load_settings().database_url
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def run_migrations_online() -> None:
    engine = create_engine(_sqlalchemy_url(), poolclass=None)
    with engine.connect() as connection:
        # The version table lives in our own schema, so it must exist before alembic looks.
        connection.execute(text("CREATE SCHEMA IF NOT EXISTS gateway"))
        connection.commit()
        context.configure(connection=connection, version_table_schema=VERSION_TABLE_SCHEMA,
                          transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
