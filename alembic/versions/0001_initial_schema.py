"""Initial schema: tenants, keys, budgets, ledger, revocation outbox, audit, prompt log, admin events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE gateway.tenants (
    id               bigserial PRIMARY KEY,
    name             text NOT NULL UNIQUE CHECK (name <> ''),
    rpm              integer CHECK (rpm >= 0),
    tpm              bigint CHECK (tpm >= 0),
    concurrent       integer CHECK (concurrent >= 0),
    allowed_models   text[] NOT NULL DEFAULT '{}',
    allow_all_models boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gateway.api_keys (
    id                        bigserial PRIMARY KEY,
    tenant_id                 bigint NOT NULL REFERENCES gateway.tenants (id) ON DELETE CASCADE,
    name                      text NOT NULL CHECK (name <> ''),
    prefix                    text NOT NULL UNIQUE CHECK (prefix ~ '^nz_[A-Za-z0-9_-]{9}$'),
    key_hash                  text NOT NULL CHECK (key_hash LIKE '$argon2id$%'),
    scopes                    text[] NOT NULL DEFAULT '{chat,embeddings}'
                              CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['chat', 'embeddings']),
    status                    text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    rpm                       integer CHECK (rpm >= 0),
    tpm                       bigint CHECK (tpm >= 0),
    concurrent                integer CHECK (concurrent >= 0),
    prompt_log_enabled        boolean NOT NULL DEFAULT false,
    prompt_log_retention_days integer CHECK (prompt_log_retention_days > 0),
    created_at                timestamptz NOT NULL DEFAULT now(),
    revoked_at                timestamptz,
    CHECK (status = 'active' OR revoked_at IS NOT NULL)
);
CREATE INDEX api_keys_tenant_idx ON gateway.api_keys (tenant_id);

CREATE TABLE gateway.budgets (
    key_id     bigint PRIMARY KEY REFERENCES gateway.api_keys (id) ON DELETE CASCADE,
    daily      bigint CHECK (daily >= 0),
    monthly    bigint CHECK (monthly >= 0),
    total      bigint CHECK (total >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gateway.budget_usage (
    key_id       bigint NOT NULL REFERENCES gateway.api_keys (id) ON DELETE CASCADE,
    period       text NOT NULL CHECK (period IN ('daily', 'monthly', 'total')),
    period_start date NOT NULL,
    tokens_in    bigint NOT NULL DEFAULT 0 CHECK (tokens_in >= 0),
    tokens_out   bigint NOT NULL DEFAULT 0 CHECK (tokens_out >= 0),
    requests     bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, period, period_start)
);

CREATE TABLE gateway.revocations (
    id         bigserial PRIMARY KEY,
    key_prefix text NOT NULL REFERENCES gateway.api_keys (prefix) ON DELETE CASCADE,
    revoked_at timestamptz NOT NULL DEFAULT now(),
    source     text NOT NULL DEFAULT 'console' CHECK (source <> '')
);

CREATE TABLE gateway.audit_log (
    id          uuid PRIMARY KEY,
    request_id  text NOT NULL,
    key_prefix  text,
    tenant_id   bigint,
    model       text,
    route       text NOT NULL,
    tokens_in   integer NOT NULL DEFAULT 0,
    tokens_out  integer NOT NULL DEFAULT 0,
    status      smallint NOT NULL,
    latency_ms  double precision NOT NULL,
    client_ip   text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_created_idx ON gateway.audit_log (created_at);
CREATE INDEX audit_log_tenant_created_idx ON gateway.audit_log (tenant_id, created_at);
CREATE INDEX audit_log_request_idx ON gateway.audit_log (request_id);

CREATE TABLE gateway.prompt_log (
    id         bigserial PRIMARY KEY,
    request_id text NOT NULL,
    key_id     bigint NOT NULL REFERENCES gateway.api_keys (id) ON DELETE CASCADE,
    model      text,
    prompt     text NOT NULL,
    response   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX prompt_log_expires_idx ON gateway.prompt_log (expires_at);
CREATE INDEX prompt_log_key_idx ON gateway.prompt_log (key_id);

CREATE TABLE gateway.admin_events (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    target  text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX admin_events_at_idx ON gateway.admin_events (at);

-- The outbox row is the whole revocation: the console's plain INSERT must be enough.
CREATE FUNCTION gateway.apply_revocation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE gateway.api_keys
       SET status = 'revoked', revoked_at = COALESCE(revoked_at, NEW.revoked_at)
     WHERE prefix = NEW.key_prefix;
    PERFORM pg_notify('key_revoked', NEW.key_prefix);
    RETURN NEW;
END
$$;
CREATE TRIGGER revocations_apply AFTER INSERT ON gateway.revocations
    FOR EACH ROW EXECUTE FUNCTION gateway.apply_revocation();
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS gateway.admin_events, gateway.prompt_log, gateway.audit_log, gateway.revocations,
    gateway.budget_usage, gateway.budgets, gateway.api_keys, gateway.tenants CASCADE;
DROP FUNCTION IF EXISTS gateway.apply_revocation();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
