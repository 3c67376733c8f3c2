"""Chunk-by-chunk relays of upstream streams (SPEC §4.9): SSE for /v1, NDJSON for /api.

Each chunk is forwarded as soon as it arrives, as the upstream's own bytes; only the chunks that
carry usage are parsed. A stream that ends without its normal end gets the route's error frame.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from functools import cache

import orjson
from aiohttp import web

from adapters.http.errors import error_bytes
from gateway_core.errors import GatewayError, UpstreamUnavailable
from gateway_core.forwarding import Relayed
from gateway_core.ports import UpstreamAnswer


class ClientGone(Exception):  # noqa: N818 (a condition, not an error of ours)
    """The caller closed its connection mid-stream."""


async def _send(out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write(data)
    except (ConnectionError, RuntimeError) as exc:
        # aiohttp raises ClientConnectionResetError (a ConnectionError) or RuntimeError on a closed transport.
        raise ClientGone() from exc


async def _finish(out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write_eof(data)
    except (ConnectionError, RuntimeError) as exc:
        raise ClientGone() from exc


_DONE = b"[DONE]"
# Ollama's /v1 layer turns a mid-stream native error into one blank chunk with an empty model, then
# closes without [DONE] (reference §2.3). A chunk holding an empty string is parsed to see whether
# it is that one (the pre-check only spares parsing the others).
_EMPTY_STRING = b'""'


def _loads(payload: bytes) -> object:
    # orjson is several times faster; the standard parser still takes what orjson refuses and JSON
    # allows (integers beyond 64 bits), so the choice of parser never changes an outcome.
    try:
        return orjson.loads(payload)
    except ValueError:
        return json.loads(payload)


def _is_error_stand_in(payload: bytes) -> bool:
    if _EMPTY_STRING not in payload:
        return False
    try:
        chunk = _loads(payload)
    except ValueError:
        return False
    return isinstance(chunk, dict) and chunk.get("model") == ""


async def _arrivals(up: UpstreamAnswer, separator: bytes) -> AsyncIterator[bytes]:
    """Complete frames as they arrived, each with its separator: everything one network read
    completed comes as one piece, so frames that came together are relayed in one write (fewer
    syscalls than a write per frame)."""
    pending = b""
    async for piece in up.chunks():
        if b"\r" in piece:
            piece = piece.replace(b"\r\n", b"\n")
        pending += piece
        end = pending.rfind(separator)
        if end < 0:
            continue
        end += len(separator)
        complete, pending = pending[:end], pending[end:]
        yield complete
    if pending.strip():
        yield pending + separator


# A frame handler turns one upstream frame into the bytes to relay (None: relay nothing) and says
# whether the stream has reached its end (normal or failed).
FrameHandler = Callable[[bytes, Relayed], tuple[bytes | None, bool]]
# A fast path: how many leading bytes of an arrival (whole frames) can be relayed as they are, their
# frames counted in the result; the frames after them go through the handler.
Passthrough = Callable[[bytes, Relayed], int]


def _no_passthrough(arrived: bytes, result: Relayed) -> int:
    return 0


async def _relay(up: UpstreamAnswer, out: web.StreamResponse, result: Relayed,
                 separator: bytes, handle: FrameHandler, error_frame: bytes,
                 passthrough: Passthrough = _no_passthrough) -> None:
    """Relay into *result* as it goes, so a caller who is cancelled midway still knows what was
    sent; a stream that ends without its normal end gets *error_frame*."""
    try:
        async for arrived in _arrivals(up, separator):
            plain = passthrough(arrived, result)
            batch: list[bytes] = [arrived[:plain]] if plain else []
            stop = False
            for frame in (arrived[plain:] if plain else arrived).split(separator)[:-1]:
                relayed, stop = handle(frame, result)
                if relayed is not None:
                    batch.append(relayed)
                if stop:
                    break
            if stop and result.completed:
                # The last frames and the end of the chunked body in one write.
                await _finish(out, b"".join(batch))
                return
            if batch:
                await _send(out, b"".join(batch))
            if stop:
                break
    except (UpstreamUnavailable, ValueError):
        pass
    if not result.completed:
        result.failed = True
        await _finish(out, error_frame)


# Any of these in an arrival sends it frame by frame through the handler: an end, usage to read, a
# possible error stand-in.
_NOTABLE = (b'"usage"', _EMPTY_STRING, _DONE)


def _plain_sse(arrived: bytes, result: Relayed) -> int:
    """Most frames are content chunks, each `data: <json>\n\n` with no other line: the handler
    would give back exactly those bytes, so the run of them an arrival starts with goes out unsplit
    and unparsed, up to the first frame that may be notable."""
    if result.text is not None:
        return 0
    end = len(arrived)
    for marker in _NOTABLE:
        at = arrived.find(marker, 0, end)
        if at >= 0:
            end = arrived.rfind(b"\n\n", 0, at) + 2  # back to the start of that frame (0: none before)
    if end < 2 or not arrived.startswith(b"data: "):
        return 0
    frames = arrived.count(b"\n\n", 0, end)
    # Only separators hold newlines, and every frame starts with `data: `.
    if arrived.count(b"\n", 0, end) != 2 * frames or arrived.count(b"\n\ndata: ", 0, end) != frames - 1:
        return 0
    result.chunks += frames
    return end


async def relay_sse(up: UpstreamAnswer, out: web.StreamResponse, result: Relayed, *,
                    caller_wants_usage: bool) -> None:
    def handle(frame: bytes, result: Relayed) -> tuple[bytes | None, bool]:
        # Only `data:` lines carry anything; comments, event names and ids are not in Ollama's framing.
        data = [ln[6:] if ln[5:6] == b" " else ln[5:] for ln in frame.split(b"\n") if ln.startswith(b"data:")]
        if not data:
            return None, False
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if payload == _DONE:
            result.completed = True
            return b"data: [DONE]\n\n", True
        if _is_error_stand_in(payload):
            return None, True  # not content: neither relayed nor charged; our error frame replaces it
        kept = _usage_from_sse(payload, result, caller_wants_usage)
        if kept is None:
            return None, False
        result.chunks += 1
        if result.text is not None:
            _collect_sse_text(kept, result.text)
        return b"data: " + kept + b"\n\n", False

    await _relay(up, out, result, b"\n\n", handle, _midstream_frame(sse=True), _plain_sse)


def _usage_from_sse(payload: bytes, result: Relayed, caller_wants_usage: bool) -> bytes | None:
    """Read usage where it is; drop what the caller did not ask for and Ollama's zeroed copies (ref. §4.2)."""
    if b'"usage"' not in payload:
        return payload
    chunk = _loads(payload)
    if not isinstance(chunk, dict):
        return payload
    usage = chunk.get("usage")
    final = chunk.get("choices") == []
    if final and isinstance(usage, dict):
        result.prompt_tokens = _count(usage.get("prompt_tokens"))
        result.completion_tokens = _count(usage.get("completion_tokens"))
        return payload if caller_wants_usage else None
    # /v1/completions repeats a zeroed usage on every chunk when usage was requested upstream. It is
    # dropped even for a caller who asked for usage: OpenAI sends it only on the final chunk, and a
    # client that takes the first usage it sees would otherwise read zeros.
    chunk.pop("usage", None)
    return json.dumps(chunk, separators=(",", ":")).encode()


def _collect_sse_text(payload: bytes, sink: list[str]) -> None:
    try:
        chunk = json.loads(payload)
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") or choice.get("text")
            if isinstance(piece, str):
                sink.append(piece)
    except (ValueError, AttributeError):
        pass


async def relay_ndjson(up: UpstreamAnswer, out: web.StreamResponse, result: Relayed) -> None:
    await _relay(up, out, result, b"\n", _native_line, _midstream_frame(sse=False))


def _native_line(raw: bytes, result: Relayed) -> tuple[bytes | None, bool]:
    line = raw.strip()
    if not line:
        return None, False
    # Every line is parsed: the final one is found by its `done` field, whatever the spacing
    # (servers and proxies that re-serialize write `"done": true`), and an error line is never
    # relayed (the upstream's own message may name hosts; ours replaces it).
    if not _may_end(line):
        result.chunks += 1
        if result.text is not None:
            _collect_native_text(json.loads(line), result.text)
        return line + b"\n", False
    chunk = json.loads(line)
    if not isinstance(chunk, dict) or "error" in chunk:
        return None, True
    if chunk.get("done") is True:
        final = chunk
        result.prompt_tokens = _count(final.get("prompt_eval_count"))
        result.completion_tokens = _count(final.get("eval_count"))
        result.completed = True
        if result.text is not None:
            _collect_native_text(final, result.text)
        return line + b"\n", True
    result.chunks += 1
    if result.text is not None:
        _collect_native_text(chunk, result.text)
    return line + b"\n", False


def _may_end(line: bytes) -> bool:
    """Cheap pre-check: a line that may be final or an error is parsed; an ordinary chunk with
    `"done":false` (in any spacing) is not. Quotes inside JSON strings are escaped, so the bytes
    `"done"` can only be a key; the decision itself is always made on the parsed line."""
    at = line.find(b'"done"')
    if at < 0 or b'"error"' in line:
        return True
    return b"false" not in line[at + 6:at + 16]


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def error_frame(exc: GatewayError, *, sse: bool) -> bytes:
    """The route's in-stream error frame: an SDK that reads it raises instead of keeping a cut answer."""
    return b"data: " + error_bytes(exc) + b"\n\n" if sse else _ndjson_error_line(exc)


async def end_with_error(out: web.StreamResponse, exc: GatewayError, *, sse: bool) -> None:
    """Best effort: end a started stream with *exc*'s frame (the caller may be gone already)."""
    try:
        await out.write(error_frame(exc, sse=sse))
        await out.write_eof()
    except (ConnectionError, RuntimeError):
        pass


def _ndjson_error_line(exc: GatewayError) -> bytes:
    """The in-stream error line in Ollama's native form: `error` is a string, with the §3.3 code beside it.

    Native clients read `part["error"]` as the message (ollama-python passes it to ResponseError, which
    fails with TypeError on an object; ollama-js and Go's api client expect a string too), so the
    OpenAI-shaped object used for whole error bodies would break exactly the callers of this framing.
    """
    return json.dumps({"error": exc.message, "code": exc.code}, separators=(",", ":")).encode() + b"\n"


def _collect_native_text(chunk: object, sink: list[str]) -> None:
    if not isinstance(chunk, dict):
        return  # not a chunk of Ollama's: relayed as it came, it holds no text of ours to log
    message = chunk.get("message")
    piece = message.get("content") if isinstance(message, dict) else chunk.get("response")
    if isinstance(piece, str):
        sink.append(piece)


@cache
def _midstream_frame(*, sse: bool) -> bytes:
    """The same bytes for every stream: built once, not per request."""
    return error_frame(_midstream_error(), sse=sse)


def _midstream_error() -> UpstreamUnavailable:
    return UpstreamUnavailable("The model backend failed while streaming; the response is incomplete.")
