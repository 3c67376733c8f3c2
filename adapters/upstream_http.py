"""A small HTTP/1.1 client for the gateway's calls to one Ollama server (SPEC §3.2, §4.10).

Why not aiohttp's client: on this path it cost about four times the CPU of a request written and
read here (docs/performance.md), and the gateway needs only a fraction of it: a handful of fixed
paths, JSON bodies it already holds as bytes, answers with a length or in chunks, keep-alive.
Parsing is httptools (llhttp, the parser Node uses), so framing, chunked encoding and malformed
answers are handled by a parser built for hostile input, not by code written here.

Errors are the core's: a connection that could not be made is UpstreamUnreachable (nothing was
sent, so another backend may be tried); anything after that, UpstreamUnavailable.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
from yarl import URL

from gateway_core.errors import UpstreamUnavailable, UpstreamUnreachable

# A stream whose caller reads slower than the model writes stops being read from the socket past
# this many buffered bytes (TCP then slows the upstream down), and resumes below the low mark. Only
# while it is read piece by piece: a complete answer (`read`) is wanted whole, whatever its size.
_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18


class _DroppedError(Exception):
    """The connection ended or the answer could not be parsed."""


class UpstreamResponse:
    """One answer being received; `read` and `chunks` raise UpstreamUnavailable on any failure."""

    def __init__(self, conn: UpstreamConnection, read_timeout_s: float | None) -> None:
        self._conn = conn
        self._loop = conn.loop
        self._read_timeout_s = read_timeout_s
        self.status: int | None = None
        self.complete = False
        self.keep_alive = False
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._streaming = False
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the connection --------------------------------------------------------------------
    def headers_done(self, status: int) -> None:
        self.status = status
        self._wake()

    def feed(self, piece: bytes) -> None:
        self._pieces.append(piece)
        self._buffered += len(piece)
        if self._streaming and self._buffered > _HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def finish(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.complete and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the gateway ----------------------------------------------------------------------
    async def _wait(self) -> None:
        """Until something arrives, or the read timeout (time without data) passes."""
        if self._error is not None:
            raise UpstreamUnavailable(retry_after_s=1.0) from self._error
        waiter = self._waiter = self._loop.create_future()
        timer = (None if self._read_timeout_s is None
                 else self._loop.call_later(self._read_timeout_s, _expire, waiter))
        try:
            await waiter
        except TimeoutError as exc:
            raise UpstreamUnavailable(retry_after_s=1.0) from exc
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._error is not None:
            raise UpstreamUnavailable(retry_after_s=1.0) from self._error

    async def wait_headers(self) -> int:
        while self.status is None:
            await self._wait()
        return self.status

    async def read(self) -> bytes:
        while not self.complete:
            await self._wait()
        body = b"".join(self._pieces)
        self._pieces.clear()
        self._buffered = 0
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        self._streaming = True
        while True:
            while self._pieces:
                piece = self._pieces.popleft()
                self._buffered -= len(piece)
                if self._paused and self._buffered < _LOW_WATER:
                    self._paused = False
                    self._conn.resume_reading()
                yield piece
            if self.complete:
                return
            await self._wait()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self._stray = False
        self.idle_since = 0.0

    def send(self, head: bytes, body: bytes | None, read_timeout_s: float | None) -> UpstreamResponse:
        assert self.transport is not None and self.response is None
        response = self.response = UpstreamResponse(self, read_timeout_s)
        if self.closed:
            response.fail(_DroppedError("the connection closed before the request was sent"))
        else:
            self.transport.write(head if body is None else head + body)
        return response

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None or self.response.complete:
            # Bytes nobody asked for: this connection is out of step with its server.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.response.fail(_DroppedError(f"unparseable answer: {type(exc).__name__}"))
            self.close()
            return
        if self._stray:
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response.fail(_DroppedError("the upstream closed the connection"))
        self._pool.forget(self)

    # httptools callbacks. One read can hold more than the answer asked for (a server out of step):
    # whatever follows the answer is ignored and the connection is not used again.
    def on_message_begin(self) -> None:
        if self.response is None or self.response.complete:
            self._stray = True

    def on_headers_complete(self) -> None:
        if self.response is not None and not self._stray:
            self.response.headers_done(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        if self.response is not None and not self._stray:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None and not self._stray:
            self.response.finish(self._parser.should_keep_alive())


class UpstreamPool:
    """Keep-alive connections to one server, most recently used first."""

    def __init__(self, base_url: str, *, limit: int, keepalive_s: float, connect_timeout_s: float) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("an upstream URL is http:// or https:// with a host")
        self.loop = asyncio.get_running_loop()
        self._host = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        self._base_path = url.path.rstrip("/")
        host = f"[{url.host}]" if ":" in url.host else url.host
        self._host_header = host if url.is_default_port() else f"{host}:{self._port}"
        self._limit = limit
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Everything of a request head but its length, per allowlisted call (a handful).
        self._heads: dict[tuple[str, str], bytes] = {}

    def head(self, method: str, path: str, length: int | None) -> bytes:
        start = self._heads.get((method, path))
        if start is None:
            start = self._heads[(method, path)] = (
                f"{method} {self._base_path}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                "Accept: application/json\r\n").encode("ascii")
        if length is None:
            return start + b"\r\n"
        return start + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length

    async def acquire(self) -> UpstreamConnection:
        while True:
            now = self.loop.time()
            while self._idle:
                conn = self._idle.pop()
                if conn.closed:
                    continue
                if now - conn.idle_since > self._keepalive_s:
                    conn.close()
                    continue
                return conn
            if len(self._open) + self._connecting < self._limit:
                return await self._connect()
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()

    async def _connect(self) -> UpstreamConnection:
        self._connecting += 1
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None)
            self._open.add(conn)
            return conn
        except (OSError, TimeoutError) as exc:
            self._wake_one()
            raise UpstreamUnreachable(retry_after_s=1.0) from exc
        finally:
            self._connecting -= 1

    def release(self, conn: UpstreamConnection) -> None:
        """After a complete answer: kept for the next request if the server keeps it open."""
        response, conn.response = conn.response, None
        if conn.closed or response is None or not (response.complete and response.keep_alive):
            conn.close()
        else:
            conn.idle_since = self.loop.time()
            self._idle.append(conn)
        self._wake_one()

    def discard(self, conn: UpstreamConnection) -> None:
        """After an answer left unfinished: closing the connection is what stops the model."""
        conn.response = None
        conn.close()
        self._wake_one()

    def forget(self, conn: UpstreamConnection) -> None:
        self._open.discard(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        # Let the transports finish closing before the loop goes away.
        await asyncio.sleep(0)


class UpstreamExchange:
    """One request as an async context manager (a class, not a generator: it is on every request's
    path). Leaving the block before the answer was read to its end closes the connection."""

    def __init__(self, pool: UpstreamPool, method: str, path: str, body: bytes | None,
                 read_timeout_s: float | None) -> None:
        self._pool = pool
        self._method = method
        self._path = path
        self._body = body
        self._read_timeout_s = read_timeout_s
        self._conn: UpstreamConnection | None = None
        self._response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        conn = self._conn = await self._pool.acquire()
        body = self._body
        head = self._pool.head(self._method, self._path, None if body is None else len(body))
        response = self._response = conn.send(head, body, self._read_timeout_s)
        try:
            await response.wait_headers()
        except BaseException:
            self._pool.discard(conn)
            raise
        return response

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: Any) -> None:
        conn, response = self._conn, self._response
        assert conn is not None and response is not None
        if exc is None and response.complete:
            self._pool.release(conn)
        else:
            self._pool.discard(conn)
