"""Notify every replica of changes to tenants, keys and budgets (SPEC §4.5), whoever made them.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Payloads name what to evict: `tenant:<id>` or `key:<prefix>`.
UPGRADE = r"""
CREATE FUNCTION gateway.notify_tenant_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_config_changed', 'tenant:' || COALESCE(NEW.id, OLD.id));
    RETURN NULL;
END
$$;

CREATE FUNCTION gateway.notify_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gateway_config_changed', 'key:' || COALESCE(NEW.prefix, OLD.prefix));
    RETURN NULL;
END
$$;

CREATE FUNCTION gateway.notify_budget_changed() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER tenants_changed AFTER UPDATE OR DELETE ON gateway.tenants
    FOR EACH ROW EXECUTE FUNCTION gateway.notify_tenant_changed();
CREATE TRIGGER api_keys_changed AFTER UPDATE OR DELETE ON gateway.api_keys
    FOR EACH ROW EXECUTE FUNCTION gateway.notify_key_changed();
CREATE TRIGGER budgets_changed AFTER INSERT OR UPDATE OR DELETE ON gateway.budgets
    FOR EACH ROW EXECUTE FUNCTION gateway.notify_budget_changed();
"""

DOWNGRADE = r"""
DROP TRIGGER IF EXISTS budgets_changed ON gateway.budgets;
DROP TRIGGER IF EXISTS api_keys_changed ON gateway.api_keys;
DROP TRIGGER IF EXISTS tenants_changed ON gateway.tenants;
DROP FUNCTION IF EXISTS gateway.notify_budget_changed();
DROP FUNCTION IF EXISTS gateway.notify_key_changed();
DROP FUNCTION IF EXISTS gateway.notify_tenant_changed();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
