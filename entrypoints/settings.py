"""SPEC §12 settings: shipped defaults overridden by environment variables of exactly these names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from dynaconf import Dynaconf


class SettingsError(Exception):
    """One line naming the bad setting; start-up stops on it."""


DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/neuronetz",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "OLLAMA_BASE_URL": "http://127.0.0.1:11434",
    "GATEWAY_HOST": "0.0.0.0",
    "GATEWAY_PORT": 8080,
    "METRICS_PORT": 9464,
    "MODEL_DISCOVERY_REFRESH_S": 60,
    "MODEL_DISCOVERY_CACHE_TTL_S": 300,
    "KEY_CACHE_TTL_S": 300,
    "ARGON2_MEMORY_KIB": 19456,
    "ARGON2_TIME_COST": 2,
    "ARGON2_PARALLELISM": 1,
    "CIRCUIT_FAILURE_THRESHOLD": 5,
    "CIRCUIT_RESET_S": 30,
    "BUDGET_DEFAULT_COMPLETION_RESERVE": 512,
    "PROMPT_LOG_DEFAULT_RETENTION_DAYS": 7,
    "PROMPT_LOG_SWEEP_INTERVAL_S": 300,
    "AUTH_FAILURES_PER_MINUTE": 30,
    "MAX_REQUEST_BYTES": 8388608,
    "UPSTREAM_TIMEOUT_S": 600,
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "info",
    # Not in SPEC §12: where the audit writer spools rows Postgres could not take (SPEC §8.3).
    "AUDIT_SPOOL_DIR": "/var/tmp/neuronetz-gateway",
}


@frozen
class Settings:
    database_url: str
    redis_url: str
    ollama_base_url: str
    gateway_host: str
    gateway_port: int
    metrics_port: int
    model_discovery_refresh_s: float
    model_discovery_cache_ttl_s: float
    key_cache_ttl_s: float
    argon2_memory_kib: int
    argon2_time_cost: int
    argon2_parallelism: int
    circuit_failure_threshold: int
    circuit_reset_s: float
    budget_default_completion_reserve: int
    prompt_log_default_retention_days: int
    prompt_log_sweep_interval_s: float
    auth_failures_per_minute: int
    max_request_bytes: int
    upstream_timeout_s: float
    log_format: str
    log_level: str
    audit_spool_dir: str

    @property
    def ollama_base_urls(self) -> tuple[str, ...]:
        """The backends in order; a backend's index here is its name in metrics and /readyz."""
        return tuple(u.strip() for u in self.ollama_base_url.split(",") if u.strip())


def _int(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, raw: Any) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise SettingsError(f"invalid setting {name}={raw!r}: expected a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise SettingsError(f"invalid setting {name}={raw!r}: must be {bound}")
        return value

    return check


def _seconds(name: str, raw: Any) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise SettingsError(f"invalid setting {name}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise SettingsError(f"invalid setting {name}={raw!r}: must be greater than 0")
    return value


def _url(*schemes: str) -> Callable[[str, Any], str]:
    def check(name: str, raw: Any) -> str:
        value = str(raw).strip()
        parts = urlsplit(value)
        if parts.scheme not in schemes or (not parts.hostname and not parts.path):
            raise SettingsError(f"invalid setting {name}: expected a {'/'.join(schemes)} URL")
        return value.rstrip("/") if "http" in schemes else value

    return check


def _url_list(*schemes: str) -> Callable[[str, Any], str]:
    """A comma-separated list of URLs (SPEC §12: several Ollama backends), each checked alone."""
    one = _url(*schemes)

    def check(name: str, raw: Any) -> str:
        parts = [p.strip() for p in str(raw).split(",")]
        if not all(parts):
            raise SettingsError(f"invalid setting {name}: expected {'/'.join(schemes)} URLs, comma-separated")
        urls = [one(name, p) for p in parts]
        if len(set(urls)) != len(urls):
            raise SettingsError(f"invalid setting {name}: the same URL is listed twice")
        return ",".join(urls)

    return check


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(name: str, raw: Any) -> str:
        value = str(raw).strip().lower()
        if value not in allowed:
            raise SettingsError(f"invalid setting {name}={raw!r}: use one of {', '.join(allowed)}")
        return value

    return check


def _text(name: str, raw: Any) -> str:
    value = str(raw).strip()
    if not value:
        raise SettingsError(f"invalid setting {name}: must not be empty")
    return value


_PORT = _int(1, 65535)
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "DATABASE_URL": _url("postgresql", "postgres"),
    "REDIS_URL": _url("redis", "rediss", "unix"),
    "OLLAMA_BASE_URL": _url_list("http", "https"),
    "GATEWAY_HOST": _text,
    "GATEWAY_PORT": _PORT,
    "METRICS_PORT": _PORT,
    "MODEL_DISCOVERY_REFRESH_S": _seconds,
    "MODEL_DISCOVERY_CACHE_TTL_S": _seconds,
    "KEY_CACHE_TTL_S": _seconds,
    "ARGON2_MEMORY_KIB": _int(8),
    "ARGON2_TIME_COST": _int(1),
    "ARGON2_PARALLELISM": _int(1, 64),
    "CIRCUIT_FAILURE_THRESHOLD": _int(1),
    "CIRCUIT_RESET_S": _seconds,
    "BUDGET_DEFAULT_COMPLETION_RESERVE": _int(1),
    "PROMPT_LOG_DEFAULT_RETENTION_DAYS": _int(1),
    "PROMPT_LOG_SWEEP_INTERVAL_S": _seconds,
    "AUTH_FAILURES_PER_MINUTE": _int(1),
    "MAX_REQUEST_BYTES": _int(1024),
    "UPSTREAM_TIMEOUT_S": _seconds,
    "LOG_FORMAT": _choice("json", "console"),
    "LOG_LEVEL": _choice("debug", "info", "warning", "error"),
    "AUDIT_SPOOL_DIR": _text,
}


def load_settings() -> Settings:
    """Defaults, then the environment; raises SettingsError naming the first bad value."""
    source = Dynaconf(envvar_prefix=False, environments=False, load_dotenv=False, settings_files=[])
    values: dict[str, Any] = {}
    for name, check in _CHECKS.items():
        raw = source.get(name)
        values[name.lower()] = check(name, DEFAULTS[name] if raw is None else raw)
    return Settings(**values)
