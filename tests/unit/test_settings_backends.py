"""OLLAMA_BASE_URL as a list of backends (SPEC §12): each entry checked, one line naming the setting."""

from __future__ import annotations

import pytest

from entrypoints.settings import SettingsError, load_settings


def test_one_url_is_one_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_BASE_URL", "http://ollama:11434/")
    assert load_settings().ollama_base_urls == ("http://ollama:11434",)


def test_a_comma_separated_list_keeps_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_BASE_URL", " http://b:11434 , https://a:443/ ")
    assert load_settings().ollama_base_urls == ("http://b:11434", "https://a:443")


@pytest.mark.parametrize("raw", ["http://a:11434,", "http://a:11434,,http://b:11434", "http://a:11434,ftp://b",
                                 "http://a:11434,b:11434", "http://a:11434,http://a:11434/"])
def test_a_bad_entry_stops_start_up_with_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("OLLAMA_BASE_URL", raw)
    with pytest.raises(SettingsError) as bad:
        load_settings()
    message = str(bad.value)
    assert "OLLAMA_BASE_URL" in message and "\n" not in message
