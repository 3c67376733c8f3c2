"""OllamaBackend: one pooled aiohttp client per Ollama server, for the only upstream paths the gateway
may call. Choosing among several servers is adapters/circuit.py's job."""

from __future__ import annotations

import json as _json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from gateway_core.errors import UpstreamUnavailable, UpstreamUnreachable

# SPEC §3.2: the gateway calls Ollama only on this explicit allowlist.
ALLOWED_UPSTREAM: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/api/tags"), ("GET", "/api/version"),
    ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/embed"), ("POST", "/api/embeddings"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
})


class UpstreamError(Exception):
    """Ollama answered with a non-2xx status; carries the status only (its body is never shown)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream status {status}")
        self.status = status


class OllamaAnswer:
    """The Upstream port's answer over one aiohttp response; read failures become 502s."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp

    @property
    def status(self) -> int:
        return self._resp.status

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(retry_after_s=1.0) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._resp.content.iter_any():
                yield piece
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(retry_after_s=1.0) from exc

    async def error_message(self) -> str | None:
        try:
            data = _json.loads(await self._resp.read())
        except (ValueError, TimeoutError, aiohttp.ClientError, OSError):
            return None
        message = data.get("error") if isinstance(data, dict) else None
        return message if isinstance(message, str) else None


_JSON_BODY = {"Accept": "application/json", "Content-Type": "application/json"}
_NO_BODY = {"Accept": "application/json"}


class UpstreamExchange:
    """One request to Ollama as an async context manager (a class, not a generator: it is on every
    request's path). Failures to connect become UpstreamUnreachable (nothing was sent, so another
    backend may be tried, SPEC §4.10); any other failure, UpstreamUnavailable."""

    def __init__(self, session: aiohttp.ClientSession, method: str, url: URL, body: bytes | None,
                 timeout: aiohttp.ClientTimeout) -> None:
        self._session = session
        self._method = method
        self._url = url
        self._body = body
        self._timeout = timeout
        self._resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            self._resp = await self._session.request(
                self._method, self._url, data=self._body, timeout=self._timeout, allow_redirects=False,
                headers=_NO_BODY if self._body is None else _JSON_BODY)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamUnreachable(retry_after_s=1.0) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(retry_after_s=1.0) from exc
        return self._resp

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        resp = self._resp
        assert resp is not None
        if exc is not None:
            resp.close()
            if isinstance(exc, TimeoutError | aiohttp.ClientError | OSError):
                raise UpstreamUnavailable(retry_after_s=1.0) from exc
            return
        if resp.content.at_eof():
            resp.release()
        else:
            resp.close()


class OllamaBackend:
    def __init__(self, base_url: str, *, timeout_s: float, connect_timeout_s: float = 5.0,
                 max_connections: int = 512) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=timeout_s)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # Parsed once: building a URL from a string was a measurable part of every upstream call.
        self._urls = {path: URL(self._base_url + path) for _, path in ALLOWED_UPSTREAM}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30,
                                         enable_cleanup_closed=True)
        # No cookies, no caller headers, no proxy from the environment: every request is ours.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding"), trust_env=False, read_bufsize=2**22,
            # Bytes are relayed as they come: no Accept-Encoding is sent, so none come compressed.
            auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def open(self, method: str, path: str, body: bytes | None = None,
             timeout_s: float | None = None) -> UpstreamExchange:
        """A response to read or stream; leaving the block early closes the connection, which is
        what makes Ollama stop generating (reference §4.3)."""
        if (method, path) not in ALLOWED_UPSTREAM:
            raise ValueError(f"{method} {path} is not an allowed upstream call")
        assert self._session is not None, "OllamaBackend.start() was not awaited"
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else self._timeout
        return UpstreamExchange(self._session, method, self._urls[path], body, timeout)

    async def get_json(self, path: str, timeout_s: float = 5.0) -> dict[str, Any]:
        async with self.open("GET", path, timeout_s=timeout_s) as resp:
            if resp.status != 200:
                raise UpstreamUnavailable()
            try:
                data = _json.loads(await resp.read())
            except ValueError as exc:
                raise UpstreamUnavailable(retry_after_s=1.0) from exc
        if not isinstance(data, dict):
            raise UpstreamUnavailable()
        return data

    async def tags(self) -> dict[str, Any]:
        return await self.get_json("/api/tags")

    async def version(self, timeout_s: float = 5.0) -> dict[str, Any]:
        return await self.get_json("/api/version", timeout_s)
