"""OllamaBackend: one pool of keep-alive connections per Ollama server, for the only upstream paths the
gateway may call (adapters/upstream_http.py speaks the HTTP). Choosing among several servers is
adapters/circuit.py's job."""

from __future__ import annotations

import asyncio
import json as _json
from collections.abc import AsyncIterator
from typing import Any

from adapters.upstream_http import UpstreamExchange, UpstreamPool, UpstreamResponse
from gateway_core.errors import UpstreamUnavailable

# SPEC §3.2: the gateway calls Ollama only on this explicit allowlist.
ALLOWED_UPSTREAM: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/api/tags"), ("GET", "/api/version"),
    ("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/embed"), ("POST", "/api/embeddings"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
})

# Idle connections older than this are not reused (a server or a NAT in between may have dropped them).
KEEPALIVE_S = 30.0


class OllamaAnswer:
    """The Upstream port's answer; read failures are UpstreamUnavailable (502) already."""

    def __init__(self, resp: UpstreamResponse) -> None:
        self._resp = resp

    @property
    def status(self) -> int:
        return self._resp.status or 0

    async def read(self) -> bytes:
        return await self._resp.read()

    def chunks(self) -> AsyncIterator[bytes]:
        return self._resp.chunks()

    async def error_message(self) -> str | None:
        try:
            data = _json.loads(await self._resp.read())
        except (ValueError, UpstreamUnavailable):
            return None
        message = data.get("error") if isinstance(data, dict) else None
        return message if isinstance(message, str) else None


class OllamaBackend:
    def __init__(self, base_url: str, *, timeout_s: float, connect_timeout_s: float = 5.0,
                 max_connections: int = 512) -> None:
        self._base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._pool: UpstreamPool | None = None

    async def start(self) -> None:
        self._pool = UpstreamPool(self._base_url, limit=self._max_connections, keepalive_s=KEEPALIVE_S,
                                  connect_timeout_s=self._connect_timeout_s)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    def open(self, method: str, path: str, body: bytes | None = None,
             timeout_s: float | None = None) -> UpstreamExchange:
        """A response to read or stream; leaving the block early closes the connection, which is
        what makes Ollama stop generating (reference §4.3). *timeout_s*: the longest wait for data
        (default: the upstream timeout)."""
        if (method, path) not in ALLOWED_UPSTREAM:
            raise ValueError(f"{method} {path} is not an allowed upstream call")
        assert self._pool is not None, "OllamaBackend.start() was not awaited"
        return UpstreamExchange(self._pool, method, path, body, timeout_s or self._timeout_s)

    async def get_json(self, path: str, timeout_s: float = 5.0) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout_s):
                async with self.open("GET", path, timeout_s=timeout_s) as resp:
                    if resp.status != 200:
                        raise UpstreamUnavailable()
                    raw = await resp.read()
        except TimeoutError as exc:
            raise UpstreamUnavailable(retry_after_s=1.0) from exc
        try:
            data = _json.loads(raw)
        except ValueError as exc:
            raise UpstreamUnavailable(retry_after_s=1.0) from exc
        if not isinstance(data, dict):
            raise UpstreamUnavailable()
        return data

    async def tags(self) -> dict[str, Any]:
        return await self.get_json("/api/tags")

    async def version(self, timeout_s: float = 5.0) -> dict[str, Any]:
        return await self.get_json("/api/version", timeout_s)
