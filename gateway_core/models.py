"""Value objects shared by the use cases: tenants, keys, the cached principal, usage."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from attrs import field, frozen

from gateway_core.budget import Budget
from gateway_core.limits import Limits


class Scope(enum.StrEnum):
    CHAT = "chat"
    EMBEDDINGS = "embeddings"


ALL_SCOPES = frozenset(Scope)


class KeyStatus(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


@frozen
class Tenant:
    id: int
    name: str
    limits: Limits
    allowed_models: tuple[str, ...] = ()
    allow_all_models: bool = False
    created_at: datetime | None = None


@frozen
class KeyRecord:
    """A stored key: everything but the secret, which only its argon2id hash stands for."""

    id: int
    tenant_id: int
    name: str
    prefix: str
    key_hash: str
    scopes: frozenset[Scope]
    status: KeyStatus
    limits: Limits
    prompt_log_enabled: bool = False
    prompt_log_retention_days: int | None = None
    created_at: datetime | None = None
    revoked_at: datetime | None = None


@frozen
class Principal:
    """What a verified key may do; this is what the key cache holds (SPEC §3.1)."""

    key_id: int
    key_prefix: str
    tenant_id: int
    tenant_name: str
    scopes: frozenset[Scope]
    key_limits: Limits
    tenant_limits: Limits
    budget: Budget = field(factory=Budget)
    allowed_models: tuple[str, ...] = ()
    allow_all_models: bool = False
    prompt_log_enabled: bool = False
    prompt_log_retention_days: int | None = None

    @property
    def limits(self) -> Limits:
        """The key's effective limits after inheritance."""
        return self.key_limits.over(self.tenant_limits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "key_prefix": self.key_prefix,
            "tenant_id": self.tenant_id,
            "tenant_name": self.tenant_name,
            "scopes": sorted(self.scopes),
            "key_limits": [self.key_limits.rpm, self.key_limits.tpm, self.key_limits.concurrent],
            "tenant_limits": [self.tenant_limits.rpm, self.tenant_limits.tpm, self.tenant_limits.concurrent],
            "budget": [self.budget.daily, self.budget.monthly, self.budget.total],
            "allowed_models": list(self.allowed_models),
            "allow_all_models": self.allow_all_models,
            "prompt_log_enabled": self.prompt_log_enabled,
            "prompt_log_retention_days": self.prompt_log_retention_days,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Principal:
        return cls(
            key_id=int(raw["key_id"]),
            key_prefix=str(raw["key_prefix"]),
            tenant_id=int(raw["tenant_id"]),
            tenant_name=str(raw["tenant_name"]),
            scopes=frozenset(Scope(s) for s in raw["scopes"]),
            key_limits=Limits(*raw["key_limits"]),
            tenant_limits=Limits(*raw["tenant_limits"]),
            budget=Budget(*raw["budget"]),
            allowed_models=tuple(raw["allowed_models"]),
            allow_all_models=bool(raw["allow_all_models"]),
            prompt_log_enabled=bool(raw["prompt_log_enabled"]),
            prompt_log_retention_days=raw["prompt_log_retention_days"],
        )


@frozen
class Usage:
    """Ledger totals for a slice of keys and one period instance."""

    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


@frozen
class AdminEvent:
    """One operator change, recorded in the same transaction as the change itself."""

    actor: str
    action: str
    target: str
    details: dict[str, Any] = field(factory=dict)


@frozen
class Catalog:
    """One discovery result: names as Ollama lists them, and their `/api/tags` entries."""

    version: int
    names: tuple[str, ...]
    entries: tuple[dict[str, Any], ...] = ()
