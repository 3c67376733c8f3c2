"""SPEC §12: every setting has bounds, and a bad one stops start-up with one line naming it."""

from __future__ import annotations

import pytest

from entrypoints.settings import SettingsError, load_settings


@pytest.mark.parametrize(("name", "value"), [
    ("KEY_CACHE_TTL_S", "0.0001"),
    ("KEY_CACHE_TTL_S", "0"),
    ("KEY_CACHE_TTL_S", "inf"),
    ("KEY_CACHE_TTL_S", "nan"),
    ("KEY_CACHE_TTL_S", "-5"),
    ("KEY_CACHE_TTL_S", "1e400"),
    ("KEY_CACHE_TTL_S", "soon"),
    ("MODEL_DISCOVERY_REFRESH_S", "inf"),
    ("UPSTREAM_TIMEOUT_S", "0.01"),
    ("CIRCUIT_RESET_S", "nan"),
    ("GATEWAY_PORT", "0"),
    ("GATEWAY_PORT", "65536"),
    ("METRICS_PORT", "²"),
    ("ARGON2_TIME_COST", "1_000"),
    ("ARGON2_MEMORY_KIB", "99999999999999999999999"),
    ("MAX_REQUEST_BYTES", "10"),
    ("AUTH_FAILURES_PER_MINUTE", "٣"),
    ("PROMPT_LOG_DEFAULT_RETENTION_DAYS", "0"),
    ("MODEL_DISCOVERY_CACHE_TTL_S", "10"),  # below the default refresh of 60 s
])
def test_a_bad_setting_is_refused_with_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert name in message and "\n" not in message


def test_sensible_values_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_CACHE_TTL_S", "0.1")
    monkeypatch.setenv("MODEL_DISCOVERY_REFRESH_S", "30")
    monkeypatch.setenv("GATEWAY_PORT", "65535")
    monkeypatch.setenv("UPSTREAM_TIMEOUT_S", "2.5")
    settings = load_settings()
    assert settings.key_cache_ttl_s == 0.1
    assert settings.model_discovery_refresh_s == 30.0
    assert settings.gateway_port == 65535
    assert settings.upstream_timeout_s == 2.5
