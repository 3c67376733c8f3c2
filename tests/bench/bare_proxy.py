"""The floor of our stack for `make bench`: aiohttp in, aiohttp out, on uvloop, and no checks at all.

``python -m tests.bench.bare_proxy --port P --upstream http://127.0.0.1:U``. Every POST goes to the
same path upstream with its body as bytes; a JSON answer comes back whole, a stream chunk by chunk
as it arrives. No auth, policy, limits, accounting, logs or metrics: whatever the gateway needs on
top of this is what it adds.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web

STREAM_TYPES = ("text/event-stream", "application/x-ndjson")


def make_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        app[session_key] = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                 timeout=aiohttp.ClientTimeout(total=600))
        yield
        await app[session_key].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with app[session_key].post(upstream + request.path, data=body,
                                         headers={"Content-Type": "application/json"}) as up:
            content_type = up.headers.get("Content-Type", "application/json")
            if not content_type.startswith(STREAM_TYPES):
                return web.Response(status=up.status, body=await up.read(),
                                    headers={"Content-Type": content_type})
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": content_type})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bare_proxy", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the fake Ollama's base URL")
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port, access_log=None,
                backlog=1024, print=None)


if __name__ == "__main__":
    main()
