"""The log pipeline's last step before rendering: secrets never reach a line, the rest is untouched."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from entrypoints.logging_setup import configure_logging, redact_secrets

KEY = "nz_" + "Ab3_-" * 8 + "xyz"  # 43 characters after nz_, like a real key


def test_full_keys_headers_and_hashes_are_redacted_wherever_they_sit() -> None:
    event = {"event": "bad request", "error": f"Invalid header: b'Authorization: Bearer {KEY}\\x00'",
             "raw": f"token {KEY} trailing", "nested": {"h": f"Bearer {KEY}"}, "items": [KEY, 3],
             "hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA", "basic": "Basic dXNlcjpwYXNzd29yZA=="}
    out = redact_secrets(None, "info", event)
    text = json.dumps(out)
    assert KEY not in text and KEY[3:] not in text
    assert "$argon2id$" not in text and "dXNlcjpwYXNzd29yZA" not in text
    assert out["raw"] == "token nz_Ab3_-Ab3_[redacted] trailing"
    assert out["items"][1] == 3


def test_prefixes_numbers_and_plain_text_pass_unchanged() -> None:
    event = {"event": "request", "key_prefix": "nz_Ab3_-Ab3_", "route": "/v1/chat/completions",
             "status": 200, "latency_ms": 1.25, "tenant": None, "ok": True}
    assert redact_secrets(None, "info", dict(event)) == event


def test_json_lines_are_rendered_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buffer, encoding="utf-8", write_through=True))
    configure_logging("json", "info", static={"worker": 1})
    try:
        structlog.get_logger("t").info("request", key_prefix="nz_Ab3_-Ab3_", detail=f"Bearer {KEY}", n=2)
        structlog.get_logger("t").debug("hidden")
        import logging

        logging.getLogger("lib").warning("library says Authorization: Bearer %s", KEY)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in buffer.getvalue().decode().splitlines()]
    assert [line["event"] for line in lines] == ["request", "library says Authorization: [redacted]"]
    assert lines[0]["key_prefix"] == "nz_Ab3_-Ab3_" and lines[0]["detail"] == "[redacted]"
    assert lines[0]["worker"] == 1 and lines[0]["n"] == 2 and lines[0]["level"] == "info"
    assert KEY[3:] not in buffer.getvalue().decode()
