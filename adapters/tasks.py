"""Stopping background tasks without letting one that swallows its cancel hang a shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

STOP_WAIT_S = 2.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None] | None], timeout_s: float = STOP_WAIT_S) -> None:
    """Cancel *tasks* and wait for them, at most *timeout_s*: psycopg_pool and redis-py have been
    seen to absorb a CancelledError, and the process must still exit (and flush its writers)."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    if running:
        await asyncio.wait(running, timeout=timeout_s)
