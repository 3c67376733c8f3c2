"""BackendRouter (adapters/circuit.py) over scripted backends: in-flight bookkeeping, who has which
model, /api/version from any healthy backend. No network."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from adapters.circuit import BackendRouter
from gateway_core.breaker import CircuitState
from gateway_core.errors import UpstreamUnavailable, UpstreamUnreachable
from gateway_core.routing import Outcome
from tests.fakes import FrozenClock


class ScriptedServer:
    """Enough of OllamaBackend for the router: `open` yields a placeholder, `version` answers or fails."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.calls = 0

    @asynccontextmanager
    async def open(self, method: str, path: str, body: bytes | None = None) -> AsyncIterator[Any]:
        self.calls += 1
        if not self.up:
            raise UpstreamUnreachable(retry_after_s=1.0)
        yield object()

    async def version(self, timeout_s: float = 5.0) -> dict[str, Any]:
        self.calls += 1
        if not self.up:
            raise UpstreamUnreachable(retry_after_s=1.0)
        return {"version": "0.33.0-rc2"}


def router(*servers: ScriptedServer, holders: dict[str, set[int]] | None = None,
           seen: list[tuple[int, Outcome]] | None = None) -> tuple[BackendRouter, FrozenClock]:
    clock = FrozenClock()
    found = (lambda model: None) if holders is None else (lambda model: holders.get(model, set()))
    hook = (lambda i, o: None) if seen is None else (lambda i, o: seen.append((i, o)))
    return BackendRouter(servers, 2, 30, clock, holders=found, on_outcome=hook), clock  # type: ignore[arg-type]


async def test_a_lane_counts_as_in_flight_until_its_post_block_ends() -> None:
    r, _ = router(ScriptedServer(), ScriptedServer())
    first, second = r.lane("m"), r.lane("m")
    assert (first.index, second.index) == (0, 1)  # idle tie, then the busy one is avoided
    assert r.in_flight == (1, 1)
    async with second.post("/api/chat", b"{}"):
        assert r.in_flight == (1, 1)
    assert r.in_flight == (1, 0)
    third = r.lane("m")
    assert third.index == 1
    for lane in (first, third):
        async with lane.post("/api/chat", b"{}"):
            pass
    assert r.in_flight == (0, 0)


async def test_a_failed_connection_frees_its_slot() -> None:
    down = ScriptedServer(up=False)
    r, _ = router(down)
    lane = r.lane("m")
    with pytest.raises(UpstreamUnreachable):
        async with lane.post("/api/chat", b"{}"):
            pass
    assert r.in_flight == (0,)


async def test_only_backends_that_have_the_model_are_candidates() -> None:
    r, _ = router(ScriptedServer(), ScriptedServer(), holders={"a": {0}, "b": {1}, "c": {0, 1}})
    assert {r.lane("a").index for _ in range(4)} == {0}
    assert {r.lane("b").index for _ in range(4)} == {1}
    with pytest.raises(UpstreamUnavailable):
        r.lane("nowhere")
    with pytest.raises(UpstreamUnavailable):
        r.lane("a", avoid=frozenset({0}))


async def test_model_failures_pause_that_model_on_that_backend_only() -> None:
    seen: list[tuple[int, Outcome]] = []
    r, clock = router(ScriptedServer(), ScriptedServer(), holders={"a": {0}, "c": {0, 1}}, seen=seen)
    for _ in range(2):
        await r.lane("a").record(Outcome.MODEL_FAILED)
    with pytest.raises(UpstreamUnavailable) as paused:
        r.lane("a")
    assert paused.value.retry_after_s == 30
    assert r.lane("c").index in (0, 1) and r.states() == [CircuitState.CLOSED] * 2
    assert r.open_model_circuits() == [1, 0]
    assert seen == [(0, Outcome.MODEL_FAILED)] * 2
    clock.advance(30)
    assert r.lane("a").index == 0  # the half-open probe


async def test_version_comes_from_a_backend_that_answers_and_skips_open_ones() -> None:
    down, up = ScriptedServer(up=False), ScriptedServer()
    r, _ = router(down, up)
    assert (await r.version())["version"] == "0.33.0-rc2"
    assert (await r.version())["version"] == "0.33.0-rc2"
    assert r.states() == [CircuitState.OPEN, CircuitState.CLOSED]
    calls = down.calls
    await r.version()
    assert down.calls == calls  # open: not asked
    up.up = False
    with pytest.raises(UpstreamUnavailable):
        await r.version()


async def test_a_backend_that_recovered_is_routed_like_one_that_never_failed() -> None:
    r, clock = router(ScriptedServer(), ScriptedServer())
    lane = r.lane("m")
    await lane.record(Outcome.BACKEND_FAILED)
    async with lane.post("/api/chat", b"{}"):
        pass
    await r.lane("m").record(Outcome.OK)
    await r.lane("m").record(Outcome.OK)
    await r.version()
    assert r.states() == [CircuitState.CLOSED] * 2 and r.open_model_circuits() == [0, 0]
    assert r.in_flight == (1, 1)  # two lanes never posted: still counted, spread as usual
