"""`neuronetz-gateway serve`: the public listener, and /metrics on loopback only (SPEC §8.2)."""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web

from adapters.prometheus import metrics_app
from entrypoints.app import METRICS, REFRESH_GAUGES, build_app
from entrypoints.logging_setup import configure_logging
from entrypoints.settings import Settings

# In-flight requests get this long to finish on SIGTERM before the writers flush and close.
SHUTDOWN_GRACE_S = 30.0


async def run(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    app = build_app(settings)
    # handler_cancellation: a caller who hangs up before the first byte also stops the upstream.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S,
                           handle_signals=False, handler_cancellation=True)
    await runner.setup()
    metrics_runner = web.AppRunner(metrics_app(app[METRICS], lambda: app[REFRESH_GAUGES]()),
                                   access_log=None)
    await metrics_runner.setup()
    await web.TCPSite(metrics_runner, "127.0.0.1", settings.metrics_port).start()
    await web.TCPSite(runner, settings.gateway_host, settings.gateway_port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Through structlog, so that with LOG_FORMAT=json every line of output is a JSON object.
    structlog.get_logger("neuronetz.server").info(
        "listening", url=f"http://{settings.gateway_host}:{settings.gateway_port}",
        metrics=f"http://127.0.0.1:{settings.metrics_port}/metrics")
    await stop.wait()
    await metrics_runner.cleanup()
    await runner.cleanup()


def serve(settings: Settings) -> None:
    asyncio.run(run(settings))
