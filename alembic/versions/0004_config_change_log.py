"""A log of config changes, so a listener that was away replays exactly what changed (SPEC §4.5).

Every change the 0002 triggers announce is also written to `gateway.config_changes` in the same
transaction, and the notification names the row (`key:<prefix>#<id>`, `tenant:<id>#<id>`), so a
listener knows which rows it has already applied. Rows older than a day are pruned by the triggers.

Revision ID: 0004
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE gateway.config_changes (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('key', 'tenant')),
    ident      text NOT NULL,
    -- clock_timestamp(), not now(): a replay looks back from when the row was written, and a
    -- transaction may start long before it writes.
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX config_changes_at_idx ON gateway.config_changes (changed_at);

CREATE FUNCTION gateway.log_config_change(change_kind text, change_ident text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    change_id bigint;
BEGIN
    INSERT INTO gateway.config_changes (kind, ident) VALUES (change_kind, change_ident)
        RETURNING id INTO change_id;
    PERFORM pg_notify('gateway_config_changed', change_kind || ':' || change_ident || '#' || change_id);
    -- Cheap, bounded pruning: a listener away for longer than a day has its cache TTL as backstop.
    IF change_id % 100 = 0 THEN
        DELETE FROM gateway.config_changes WHERE changed_at < clock_timestamp() - interval '1 day';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION gateway.notify_tenant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM gateway.log_config_change('tenant', COALESCE(NEW.id, OLD.id)::text);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION gateway.notify_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM gateway.log_config_change('key', COALESCE(NEW.prefix, OLD.prefix));
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION gateway.notify_budget_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed_prefix text;
BEGIN
    SELECT prefix INTO changed_prefix FROM gateway.api_keys WHERE id = COALESCE(NEW.key_id, OLD.key_id);
    IF changed_prefix IS NOT NULL THEN
        PERFORM gateway.log_config_change('key', changed_prefix);
    END IF;
    RETURN NULL;
END
$$;
"""

DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION gateway.notify_tenant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_config_changed', 'tenant:' || COALESCE(NEW.id, OLD.id));
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION gateway.notify_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_config_changed', 'key:' || COALESCE(NEW.prefix, OLD.prefix));
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION gateway.notify_budget_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed_prefix text;
BEGIN
    SELECT prefix INTO changed_prefix FROM gateway.api_keys WHERE id = COALESCE(NEW.key_id, OLD.key_id);
    IF changed_prefix IS NOT NULL THEN
        PERFORM pg_notify('gateway_config_changed', 'key:' || changed_prefix);
    END IF;
    RETURN NULL;
END
$$;

DROP FUNCTION IF EXISTS gateway.log_config_change(text, text);
DROP TABLE IF EXISTS gateway.config_changes;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
