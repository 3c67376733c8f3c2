"""SPEC §12 settings: shipped defaults overridden by environment variables of exactly these names."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen
from dynaconf import Dynaconf

from adapters.http.client_address import TrustedProxies


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
    "GATEWAY_WORKERS": 1,
    "REDIS_CLUSTER": "false",
    "TRUSTED_PROXIES": "",
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
    gateway_workers: int = 1
    # SPEC §4.11; defaults so that code building Settings by hand needs no change.
    redis_cluster: bool = False
    trusted_proxies: TrustedProxies = field(factory=TrustedProxies)

    @property
    def ollama_base_urls(self) -> tuple[str, ...]:
        """The backends in order; a backend's index here is its name in metrics and /readyz."""
        return tuple(u.strip() for u in self.ollama_base_url.split(",") if u.strip())


_WHOLE = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")


def _int(low: int, high: int) -> Callable[[str, Any], int]:
    """A whole number in ASCII digits within [low, high]."""

    def check(name: str, raw: Any) -> int:
        text = str(raw).strip()
        # Not int(): it takes "1_000", "+5" and non-ASCII digits; a setting is plain digits.
        if isinstance(raw, bool) or not _WHOLE.fullmatch(text):
            raise SettingsError(f"invalid setting {name}={raw!r}: expected a whole number")
        if len(text) > len(str(high)) or not low <= int(text) <= high:
            raise SettingsError(f"invalid setting {name}={raw!r}: must be between {low} and {high}")
        return int(text)

    return check


def _seconds(low: float, high: float) -> Callable[[str, Any], float]:
    """A finite number of seconds within [low, high]: `inf`, `nan`, `1e9` and `0.0001` are refused
    (a TTL of a tenth of a millisecond made every request 503)."""

    def check(name: str, raw: Any) -> float:
        text = str(raw).strip()
        if isinstance(raw, bool) or not _DECIMAL.fullmatch(text):
            raise SettingsError(f"invalid setting {name}={raw!r}: expected a number of seconds")
        value = float(text)
        if not (math.isfinite(value) and low <= value <= high):
            raise SettingsError(f"invalid setting {name}={raw!r}: must be between {low:g} and {high:g} s")
        return value

    return check


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


def _bool(name: str, raw: Any) -> bool:
    value = str(raw).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise SettingsError(f"invalid setting {name}={raw!r}: use true or false")


def _cidrs(name: str, raw: Any) -> TrustedProxies:
    try:
        return TrustedProxies.parse(str(raw))
    except ValueError as exc:
        raise SettingsError(f"invalid setting {name}: {exc}") from None


_PORT = _int(1, 65535)
_DAY_S = 86_400.0
_TTL = _seconds(0.1, 7 * _DAY_S)
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "DATABASE_URL": _url("postgresql", "postgres"),
    "REDIS_URL": _url("redis", "rediss", "unix"),
    "OLLAMA_BASE_URL": _url_list("http", "https"),
    "GATEWAY_HOST": _text,
    "GATEWAY_PORT": _PORT,
    "METRICS_PORT": _PORT,
    "MODEL_DISCOVERY_REFRESH_S": _seconds(0.1, _DAY_S),
    "MODEL_DISCOVERY_CACHE_TTL_S": _TTL,
    "KEY_CACHE_TTL_S": _TTL,
    "ARGON2_MEMORY_KIB": _int(8, 4 * 1024 * 1024),
    "ARGON2_TIME_COST": _int(1, 100),
    "ARGON2_PARALLELISM": _int(1, 64),
    "CIRCUIT_FAILURE_THRESHOLD": _int(1, 1_000_000),
    "CIRCUIT_RESET_S": _seconds(0.1, _DAY_S),
    "BUDGET_DEFAULT_COMPLETION_RESERVE": _int(1, 10_000_000),
    "PROMPT_LOG_DEFAULT_RETENTION_DAYS": _int(1, 36_500),
    "PROMPT_LOG_SWEEP_INTERVAL_S": _seconds(0.1, _DAY_S),
    "AUTH_FAILURES_PER_MINUTE": _int(1, 1_000_000),
    "MAX_REQUEST_BYTES": _int(1024, 1024 * 1024 * 1024),
    "UPSTREAM_TIMEOUT_S": _seconds(0.1, _DAY_S),
    "LOG_FORMAT": _choice("json", "console"),
    "LOG_LEVEL": _choice("debug", "info", "warning", "error"),
    "AUDIT_SPOOL_DIR": _text,
    "GATEWAY_WORKERS": _int(1, 64),
    "REDIS_CLUSTER": _bool,
    "TRUSTED_PROXIES": _cidrs,
}


def load_settings() -> Settings:
    """Defaults, then the environment; raises SettingsError naming the first bad value."""
    source = Dynaconf(envvar_prefix=False, environments=False, load_dotenv=False, settings_files=[])
    values: dict[str, Any] = {}
    for name, check in _CHECKS.items():
        raw = source.get(name)
        values[name.lower()] = check(name, DEFAULTS[name] if raw is None else raw)
    if values["model_discovery_cache_ttl_s"] < values["model_discovery_refresh_s"]:
        # The shared copy would lapse between two polls and deny every model meanwhile (SPEC §8.5).
        raise SettingsError("invalid setting MODEL_DISCOVERY_CACHE_TTL_S: must be at least "
                            "MODEL_DISCOVERY_REFRESH_S")
    return Settings(**values)
