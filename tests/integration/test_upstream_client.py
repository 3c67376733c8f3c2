"""The gateway's own HTTP/1.1 client for Ollama (adapters/upstream_http.py) against a scripted server
that writes raw bytes: keep-alive, chunked streams, early exits, and answers that are broken."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from adapters.ollama import OllamaBackend
from gateway_core.errors import UpstreamUnavailable, UpstreamUnreachable
from tests.services import free_port

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], "asyncio.Future[None] | object"]


class RawServer:
    """Answers each request on a connection with what *answer(request_number)* returns."""

    def __init__(self, answer: Callable[[int], list[bytes]], *, delay_s: float = 0.0,
                 close_after: bool = False) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()
        self.port = free_port()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                for piece in self.answer(len(self.requests)):
                    writer.write(piece)
                    await writer.drain()
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                if self.close_after:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()


def json_answer(body: bytes = b'{"ok": true}') -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body)]


def chunked(*pieces: bytes) -> list[bytes]:
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"]
    out += [b"%x\r\n%b\r\n" % (len(p), p) for p in pieces]
    return [*out, b"0\r\n\r\n"]


@pytest.fixture
async def backend_for() -> AsyncIterator[Callable[..., OllamaBackend]]:
    made: list[OllamaBackend] = []

    def make(port: int, timeout_s: float = 5.0) -> OllamaBackend:
        backend = OllamaBackend(f"http://127.0.0.1:{port}", timeout_s=timeout_s, connect_timeout_s=1.0)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


async def test_sequential_requests_reuse_one_connection_and_send_only_our_headers(backend_for) -> None:  # type: ignore[no-untyped-def]
    async with RawServer(lambda n: json_answer(b'{"n": %d}' % n)) as server:
        backend = backend_for(server.port)
        await backend.start()
        for n in range(1, 21):
            async with backend.open("POST", "/api/chat", b'{"model": "m"}') as resp:
                assert resp.status == 200 and await resp.read() == b'{"n": %d}' % n
    assert server.connections == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /api/chat HTTP/1.1"
    assert sorted(h.split(b":")[0].lower() for h in head[1:]) == [
        b"accept", b"content-length", b"content-type", b"host"]
    assert server.requests[0].endswith(b'{"model": "m"}')


async def test_a_chunked_stream_arrives_piece_by_piece(backend_for) -> None:  # type: ignore[no-untyped-def]
    pieces = [b'{"a": 1}\n', b'{"b": 2}\n', b'{"done": true}\n']
    async with RawServer(lambda n: chunked(*pieces), delay_s=0.05) as server:
        backend = backend_for(server.port)
        await backend.start()
        async with backend.open("POST", "/api/chat", b"{}") as resp:
            seen = [piece async for piece in resp.chunks()]
        assert b"".join(seen) == b"".join(pieces) and len(seen) >= 2  # not held back until the end
        async with backend.open("POST", "/api/chat", b"{}") as resp:  # and the connection is reusable
            assert await resp.read() == b"".join(pieces)
    assert server.connections == 1


async def test_leaving_a_stream_early_closes_its_connection(backend_for) -> None:  # type: ignore[no-untyped-def]
    async with RawServer(lambda n: chunked(*[b"token\n"] * 200), delay_s=0.01) as server:
        backend = backend_for(server.port)
        await backend.start()
        async with backend.open("POST", "/api/chat", b"{}") as resp:
            async for _ in resp.chunks():
                break
        await asyncio.wait_for(server.closed_by_client.wait(), 5)  # what makes Ollama stop generating
        async with backend.open("POST", "/api/chat", b"{}") as resp:
            assert resp.status == 200
    assert server.connections == 2


@pytest.mark.parametrize("garbage", [
    [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello"],  # two lengths
    [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"],  # bad chunk size
    [b"NOT HTTP AT ALL\r\n\r\n"],
])
async def test_a_malformed_answer_is_a_502_and_its_connection_is_not_reused(
        backend_for, garbage: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    async with RawServer(lambda n: garbage if n == 1 else json_answer()) as server:
        backend = backend_for(server.port)
        await backend.start()
        with pytest.raises(UpstreamUnavailable):
            async with backend.open("POST", "/api/chat", b"{}") as resp:
                await resp.read()
        async with backend.open("POST", "/api/chat", b"{}") as resp:
            assert await resp.read() == b'{"ok": true}'
    assert server.connections == 2


async def test_bytes_after_a_complete_answer_retire_the_connection(backend_for) -> None:  # type: ignore[no-untyped-def]
    extra = [*json_answer(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"]  # an answer nobody asked for
    async with RawServer(lambda n: extra if n == 1 else json_answer(b'{"second": 1}')) as server:
        backend = backend_for(server.port)
        await backend.start()
        async with backend.open("POST", "/api/chat", b"{}") as resp:
            assert await resp.read() == b'{"ok": true}'
        await asyncio.sleep(0.1)
        async with backend.open("POST", "/api/chat", b"{}") as resp:
            assert await resp.read() == b'{"second": 1}'  # never the stray answer
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_used_again(backend_for) -> None:  # type: ignore[no-untyped-def]
    async with RawServer(lambda n: json_answer(), close_after=True) as server:
        backend = backend_for(server.port)
        await backend.start()
        for _ in range(3):
            async with backend.open("POST", "/api/chat", b"{}") as resp:
                assert await resp.read() == b'{"ok": true}'
            await asyncio.sleep(0.05)
    assert server.connections == 3


async def test_refused_is_unreachable_and_silence_is_unavailable(backend_for) -> None:  # type: ignore[no-untyped-def]
    refused = backend_for(free_port())
    await refused.start()
    with pytest.raises(UpstreamUnreachable):  # nothing was sent: another backend may be tried
        async with refused.open("POST", "/api/chat", b"{}"):
            pass
    async with RawServer(lambda n: []) as silent:  # reads the request, never answers
        backend = backend_for(silent.port, timeout_s=0.3)
        await backend.start()
        with pytest.raises(UpstreamUnavailable):
            async with backend.open("POST", "/api/chat", b"{}"):
                pass


async def test_version_and_tags_give_up_after_their_timeout(backend_for) -> None:  # type: ignore[no-untyped-def]
    async with RawServer(lambda n: json_answer(b'{"version": "0.9"}')) as server:
        backend = backend_for(server.port)
        await backend.start()
        assert await backend.version() == {"version": "0.9"}
    async with RawServer(lambda n: []) as silent:
        backend = backend_for(silent.port)
        await backend.start()
        with pytest.raises(UpstreamUnavailable):
            await backend.version(timeout_s=0.3)


async def test_a_complete_answer_larger_than_the_stream_buffer_is_read_whole(backend_for) -> None:  # type: ignore[no-untyped-def]
    big = b'{"embeddings": [' + b",".join([b"0.123456789"] * 400_000) + b"]}"  # ~4.8 MB, one answer
    async with RawServer(lambda n: json_answer(big)) as server:
        backend = backend_for(server.port, timeout_s=2.0)
        await backend.start()
        async with backend.open("POST", "/api/embed", b"{}") as resp:
            assert await resp.read() == big


async def test_a_stream_read_slowly_arrives_whole_and_in_order(backend_for) -> None:  # type: ignore[no-untyped-def]
    pieces = [b'{"i": %d, "pad": "%b"}\n' % (i, b"x" * 20_000) for i in range(300)]  # ~6 MB
    async with RawServer(lambda n: chunked(*pieces)) as server:
        backend = backend_for(server.port, timeout_s=2.0)
        await backend.start()
        got = []
        async with backend.open("POST", "/api/chat", b"{}") as resp:
            async for piece in resp.chunks():
                got.append(piece)
                await asyncio.sleep(0.001)  # slower than the server writes: reading pauses, resumes
        assert b"".join(got) == b"".join(pieces)
