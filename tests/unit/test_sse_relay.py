"""The SSE relay's whole-arrival pass-through must relay exactly what the frame-by-frame path does.

Upstream streams are built from every kind of frame the relay distinguishes (plain content, the
final usage chunk, Ollama's blank error stand-in, comments, multi-line data, `data:` without its
space, CRLF framing, a trailing frame without separator) and cut into arbitrary network reads; the
bytes the caller receives and what the relay reports for charging must be the same either way.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from adapters.http import relay
from gateway_core.errors import UpstreamUnavailable
from gateway_core.forwarding import Relayed


class _Upstream:
    def __init__(self, pieces: list[bytes], broken: bool = False) -> None:
        self._pieces = pieces
        self._broken = broken
        self.status = 200

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            yield piece
        if self._broken:
            raise UpstreamUnavailable("cut")


class _Caller:
    """What the caller's connection received, write by write, and whether the body was ended."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.ended = False

    async def write(self, data: bytes) -> None:
        assert not self.ended, "written after the end"
        self.writes.append(bytes(data))

    async def write_eof(self, data: bytes = b"") -> None:
        assert not self.ended
        if data:
            self.writes.append(bytes(data))
        self.ended = True


def _content(i: int) -> bytes:
    return (b'{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
            b'"delta":{"content":"tok%d"},"finish_reason":null}]}' % i)


_USAGE = (b'{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"m","choices":[],'
          b'"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}')
_FINISH = (b'{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
           b'"delta":{"role":"assistant","content":""},"finish_reason":"stop"}]}')
_STAND_IN = (b'{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"","choices":[{"index":0,'
             b'"delta":{"content":""},"finish_reason":null}]}')


def _frame(rng: random.Random, i: int) -> bytes:
    kind = rng.random()
    if kind < 0.7:
        return b"data: " + _content(i) + b"\n\n"
    if kind < 0.75:
        return b"data:" + _content(i) + b"\n\n"  # no space after the colon
    if kind < 0.8:
        return b": keep-alive comment\n\n"
    if kind < 0.85:
        return b"data: " + _content(i) + b"\nid: 7\n\n"
    if kind < 0.9:
        return b"data: " + _content(i) + b"\r\n\r\n"
    if kind < 0.95:
        return b"data: " + _FINISH + b"\n\n"
    return b"data: \n\n"


def _stream(rng: random.Random) -> tuple[bytes, bool]:
    frames = [_frame(rng, i) for i in range(rng.randint(0, 30))]
    ending = rng.random()
    broken = False
    if ending < 0.6:
        frames += [b"data: " + _USAGE + b"\n\n", b"data: [DONE]\n\n"]
    elif ending < 0.7:
        frames.append(b"data: " + _STAND_IN + b"\n\n")
    elif ending < 0.8:
        frames.append(b"data: " + _content(99))  # cut mid-frame, no separator
    elif ending < 0.9:
        broken = True
    return b"".join(frames), broken


def _cut(rng: random.Random, raw: bytes) -> list[bytes]:
    pieces, at = [], 0
    while at < len(raw):
        step = rng.choice((1, 7, 64, 300, 5000))
        pieces.append(raw[at:at + step])
        at += step
    return pieces


async def _run(pieces: list[bytes], broken: bool, fast: bool,
               wants_usage: bool) -> tuple[bytes, Relayed, int]:
    caller = _Caller()
    result = Relayed()
    up = _Upstream(pieces, broken)
    if fast:
        await relay.relay_sse(up, caller, result, caller_wants_usage=wants_usage)  # type: ignore[arg-type]
    else:
        original = relay._plain_sse
        relay._plain_sse = relay._no_passthrough  # type: ignore[assignment]
        try:
            await relay.relay_sse(up, caller, result, caller_wants_usage=wants_usage)  # type: ignore[arg-type]
        finally:
            relay._plain_sse = original  # type: ignore[assignment]
    assert caller.ended == (result.completed or result.failed)
    return b"".join(caller.writes), result, len(caller.writes)


@pytest.mark.parametrize("seed", range(300))
def test_pass_through_relays_what_the_frame_path_relays(seed: int) -> None:
    rng = random.Random(seed)
    raw, broken = _stream(rng)
    pieces = _cut(rng, raw)
    wants_usage = rng.random() < 0.5
    fast = asyncio.run(_run(pieces, broken, True, wants_usage))
    slow = asyncio.run(_run(pieces, broken, False, wants_usage))
    assert fast[0] == slow[0]
    assert fast[1] == slow[1]


def test_plain_content_arrivals_go_out_unchanged_and_are_counted() -> None:
    raw = b"".join(b"data: " + _content(i) + b"\n\n" for i in range(16))
    raw += b"data: " + _USAGE + b"\n\ndata: [DONE]\n\n"
    body, result, writes = asyncio.run(_run([raw[:2000], raw[2000:]], False, True, False))
    assert result.chunks == 16 and result.completed and not result.failed
    assert (result.prompt_tokens, result.completion_tokens) == (11, 7)
    # The usage the caller did not ask for is dropped; everything else is byte for byte the upstream's.
    assert body == raw.replace(b"data: " + _USAGE + b"\n\n", b"")
    # One write per network read, the last one ending the body.
    assert writes == 2


def test_a_blank_stand_in_still_ends_the_stream_with_our_error_frame() -> None:
    raw = b"data: " + _content(1) + b"\n\ndata: " + _STAND_IN + b"\n\n"
    body, result, _ = asyncio.run(_run([raw], False, True, True))
    assert result.failed and not result.completed and result.chunks == 1
    assert _STAND_IN not in body
    assert body.startswith(b"data: " + _content(1) + b"\n\n")
    assert b'"error"' in body.split(b"\n\n")[1]
