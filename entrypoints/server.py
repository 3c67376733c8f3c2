"""`neuronetz-gateway serve`: the public listener, and /metrics on loopback only (SPEC §8.2).

One process by default; with `--workers N` / GATEWAY_WORKERS=N (SPEC §4.11) the supervisor in
entrypoints/workers.py forks N copies of `run`, each binding the public port with SO_REUSEPORT and
its own metrics port (METRICS_PORT + worker index), each with its own pools and background tasks.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import sys

import structlog
import uvloop
from aiohttp import web

from adapters.prometheus import metrics_app
from entrypoints.app import METRICS, REFRESH_GAUGES, build_app
from entrypoints.logging_setup import configure_logging, flush_logs
from entrypoints.settings import Settings
from entrypoints.workers import supervise

# In-flight requests get this long to finish on SIGTERM before the writers flush and close.
SHUTDOWN_GRACE_S = 30.0


async def run(settings: Settings, worker: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain. *worker* is the index under a supervisor (else None)."""
    configure_logging(settings.log_format, settings.log_level,
                      static={} if worker is None else {"worker": worker})
    app = build_app(settings)
    # handler_cancellation: a caller who hangs up before the first byte also stops the upstream.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S,
                           handle_signals=False, handler_cancellation=True)
    await runner.setup()
    metrics_port = settings.metrics_port + (worker or 0)
    metrics_runner = web.AppRunner(metrics_app(app[METRICS], lambda: app[REFRESH_GAUGES]()),
                                   access_log=None)
    await metrics_runner.setup()
    await web.TCPSite(metrics_runner, "127.0.0.1", metrics_port).start()
    # SO_REUSEPORT only between our own workers: a lone process keeps the plain "port in use" error.
    await web.TCPSite(runner, settings.gateway_host, settings.gateway_port, backlog=1024,
                      reuse_port=worker is not None).start()
    _tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Through structlog, so that with LOG_FORMAT=json every line of output is a JSON object.
    structlog.get_logger("neuronetz.server").info(
        "listening", url=f"http://{settings.gateway_host}:{settings.gateway_port}",
        metrics=f"http://127.0.0.1:{metrics_port}/metrics")
    await stop.wait()
    await metrics_runner.cleanup()
    await runner.cleanup()


# Requests allocate many short-lived objects but create almost no cycles (docs/performance.md): with
# the default threshold of 700 the young generation was collected every few requests, and each full
# collection walked every object built at start-up (modules, settings, pools) again.
GC_YOUNG_THRESHOLD = 20_000


def _tune_gc() -> None:
    gc.collect()
    # What exists once the app is up lives as long as the process: out of the collector's way.
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run_in_loop(settings: Settings, worker: int | None = None) -> None:
    # uvloop: the same asyncio API with a libuv loop, measurably less CPU per request (docs/performance.md).
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(settings, worker))
    finally:
        flush_logs()


def serve(settings: Settings, workers: int | None = None) -> None:
    count = settings.gateway_workers if workers is None else workers
    if count == 1:
        run_in_loop(settings)
        return
    configure_logging(settings.log_format, settings.log_level, static={"role": "supervisor"})
    sys.exit(supervise(settings, count, run_in_loop, grace_s=SHUTDOWN_GRACE_S))
