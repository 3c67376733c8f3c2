"""structlog once, at start-up (SPEC §8.1): JSON lines to stdout in production, console in dev."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Keys, Authorization values and key hashes never reach a log line (SPEC §3.1, §8.1). The gateway's
# own events never carry them, but library messages can quote raw request bytes: aiohttp's error for
# a malformed header line repeats that line, so `Authorization: Bearer nz_…` plus one bad byte would
# otherwise be logged in full. So every string of every event is scrubbed just before rendering.
_SECRETS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Everything after an Authorization header name up to the end of the text line, as a parser error
    # or a headers repr quotes it (a folded continuation inside a bytes repr goes with it).
    (re.compile(r"(?i)(\b(?:proxy-)?authorization['\"]?\s*[:=])[^\r\n]*"), r"\1 [redacted]"),
    (re.compile(r"(?i)\bbearer\b(?:\s+[^\s'\"\\,;]+)?"), "[redacted]"),
    (re.compile(r"(?i)\bbasic\s+[A-Za-z0-9+/=_-]{8,}"), "[redacted]"),
    (re.compile(r"\$argon2[a-z]*\$[A-Za-z0-9+/=$,.-]*"), "[redacted]"),
    # A key is `nz_` + 43 characters; its 12-character prefix is not secret and stays for correlation.
    (re.compile(r"(nz_[A-Za-z0-9_-]{9})[A-Za-z0-9_-]+"), r"\1[redacted]"),
)


# One cheap search first: almost every string logged holds none of these, and five substitutions
# per field of every request event would be a measurable share of the gateway's CPU.
# A bare 12-character key prefix (nz_ + 9) is logged with every request and is not secret, so only a
# longer run after nz_ counts; the key pattern above needs at least 10 characters there as well.
_MAYBE_SECRET = re.compile(r"(?i)nz_[A-Za-z0-9_-]{10}|authorization|bearer|basic|\$argon2")


def scrub(text: str) -> str:
    if _MAYBE_SECRET.search(text) is None:
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    return value


_PLAIN = (int, float, bool, type(None))


def redact_secrets(_logger: Any, _method: str, event_dict: Any) -> Any:
    # In place (structlog hands every event a dict of its own): most values are numbers or strings
    # without a hit, and a new dict plus a call per field was the largest cost of a request's event.
    for key, value in event_dict.items():
        if type(value) is str:
            if _MAYBE_SECRET.search(value) is None:
                continue
        elif isinstance(value, _PLAIN):
            continue
        # Keys starting with "_" are structlog's own bookkeeping (the LogRecord), removed before rendering.
        if not key.startswith("_"):
            event_dict[key] = _scrubbed(value)
    return event_dict


def _orjson_text(value: Any, **kwargs: Any) -> str:
    return orjson.dumps(value, **kwargs).decode()


def _with_static(fields: dict[str, Any]) -> structlog.types.Processor:
    def add(_logger: Any, _method: str, event_dict: Any) -> Any:
        event_dict.update(fields)
        return event_dict

    return add


class LineWriter:
    """The JSON-lines sink: the lines logged during one round of the event loop go out in one write
    at its end (under load many requests finish per round; a write and a flush per line were a
    measurable share of the gateway's CPU). Nothing waits on time: a line is written in the same
    round it was logged, and `flush` writes what is pending at once (shutdown calls it). Lines
    logged off the loop's thread are written at once."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._pending: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def msg(self, message: bytes) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() != self._loop_thread:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write(message + b"\n")
                return
            self.flush()
            self._loop, self._loop_thread = loop, threading.get_ident()
        if not self._pending:
            loop.call_soon(self.flush)
        self._pending.append(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg

    def flush(self) -> None:
        if self._pending:
            data = b"\n".join(self._pending) + b"\n"
            self._pending.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()


_writer: LineWriter | None = None


def flush_logs() -> None:
    """Write the lines still pending (before the loop or the process ends)."""
    if _writer is not None:
        _writer.flush()


def configure_logging(log_format: str, log_level: str, static: dict[str, Any] | None = None) -> None:
    """*static*: fields added to every event (e.g. the worker index under `serve --workers`)."""
    level = _LEVELS[log_level]
    json_lines = log_format == "json"
    # orjson renders to bytes, written as they are: about 3x cheaper than json.dumps per event.
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps) if json_lines
        else structlog.dev.ConsoleRenderer(colors=False))
    text_renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_orjson_text) if json_lines else renderer)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if static:
        shared.append(_with_static(dict(static)))
    # Exceptions become text here (not a repr of the exception and its traceback object) so that the
    # scrubber sees exactly what will be written; it must stay the last step before the renderer.
    final: list[structlog.types.Processor] = [structlog.processors.format_exc_info, redact_secrets]
    global _writer
    flush_logs()
    _writer = LineWriter(sys.stdout.buffer) if json_lines else None
    factory: Any = ((lambda *_args: _writer) if json_lines
                    else structlog.WriteLoggerFactory(file=sys.stdout))
    structlog.configure(
        processors=[*shared, *final, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Library and adapter warnings (stdlib logging) come out in the same format and stream.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=text_renderer, foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, *final]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
