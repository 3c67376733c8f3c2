"""Exactly-once ledger and idempotent, repairable writer rows (SPEC §6.3, §8.3).

`ledger_settlements` holds every settlement id the ledger has applied, with the period instances
of its admission; the ledger inserts it in the same transaction as the totals. Prompt-log rows get
a gateway-made row id (replays are idempotent), and audit/prompt rows a `repaired` mark.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE gateway.ledger_settlements (
    id          text PRIMARY KEY,
    key_id      bigint NOT NULL REFERENCES gateway.api_keys (id) ON DELETE CASCADE,
    admitted_at timestamptz NOT NULL,
    day_start   date NOT NULL,
    month_start date NOT NULL,
    tokens_in   bigint NOT NULL CHECK (tokens_in >= 0),
    tokens_out  bigint NOT NULL CHECK (tokens_out >= 0),
    settled_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_settlements_key_idx ON gateway.ledger_settlements (key_id, day_start);
ALTER TABLE gateway.prompt_log ADD COLUMN row_id uuid UNIQUE;
ALTER TABLE gateway.prompt_log ADD COLUMN repaired boolean NOT NULL DEFAULT false;
ALTER TABLE gateway.audit_log ADD COLUMN repaired boolean NOT NULL DEFAULT false;
"""

DOWNGRADE = """
ALTER TABLE gateway.audit_log DROP COLUMN IF EXISTS repaired;
ALTER TABLE gateway.prompt_log DROP COLUMN IF EXISTS repaired;
ALTER TABLE gateway.prompt_log DROP COLUMN IF EXISTS row_id;
DROP TABLE IF EXISTS gateway.ledger_settlements;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
