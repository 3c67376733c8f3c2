"""Row handling of the writers that needs no database: repair and reviving spooled lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from adapters.postgres.audit import PromptLogWriter
from adapters.postgres.batching import Repaired, without_nul
from adapters.postgres.ledger import PostgresLedger
from adapters.postgres.pool import make_pool

URL = "postgresql://postgres@127.0.0.1:1/none"  # never opened


def test_nul_is_replaced_and_the_row_marked_and_a_clean_row_is_left_alone() -> None:
    fixed = without_nul(("req", 7, "a\x00b", None))
    assert fixed == ("req", 7, "a\ufffdb", None) and isinstance(fixed, Repaired)
    assert without_nul(("req", 7, "ab", None)) is None


def test_lines_spooled_by_the_previous_version_are_revived_not_lost(tmp_path: Path) -> None:
    pool = make_pool(URL)
    now = datetime.now(UTC).isoformat()
    prompt = PromptLogWriter(pool, str(tmp_path)).revive(json.loads(json.dumps(
        ["req-1", 5, "m", "prompt", "answer", now, now])))
    assert len(prompt) == 8 and prompt[1:5] == ("req-1", 5, "m", "prompt")
    assert isinstance(prompt[-1], datetime)
    ledger = PostgresLedger(pool, str(tmp_path))
    old = ledger.revive([5, 1_790_000_000.0, 3, 4])
    assert len(old) == 5 and old[1:] == (5, 1_790_000_000.0, 3, 4) and len(str(old[0])) == 32
    assert ledger.revive(["sid", 5, 1.0, 3, 4]) == ("sid", 5, 1.0, 3, 4)
