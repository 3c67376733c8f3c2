"""`serve --workers N` (SPEC §4.11): a supervisor process and N forked workers on one port.

Each worker is a whole gateway (its own PostgreSQL/Redis pools, upstream connector, writers,
change listener and background tasks) binding the public port with SO_REUSEPORT, so the kernel
spreads connections over them; every state that matters (limits, budgets, caches, revocations) is
already shared through Redis and PostgreSQL. The supervisor holds no sockets and no pools.

- SIGTERM/SIGINT to the supervisor: every worker gets SIGTERM and drains as a single process does
  (in-flight requests finish, writers flush); the supervisor exits 0 when all of them exited 0.
- A worker that exits on its own (a crash, the OOM killer, a port it cannot bind) is not restarted:
  the supervisor logs which one, drains the others and exits 1, so the service manager restarts the
  whole gateway (a half-sized gateway that looks healthy would be worse).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

from entrypoints.settings import Settings

# After the request grace a worker still flushes its writers (bounded); past this it is killed.
_FLUSH_MARGIN_S = 30.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def supervise(settings: Settings, count: int, target: Callable[[Settings, int], None], *,
              grace_s: float) -> int:
    """Run *count* workers until a signal or a worker's death; returns the process exit code."""
    log = structlog.get_logger("neuronetz.workers")
    # A signal wakes the wait below at once (set_wakeup_fd writes its number to this socket).
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
    # fork: the supervisor has no threads, loop or connections yet, and the workers start fast and
    # share the imported code's pages.
    context = multiprocessing.get_context("fork")
    workers: list[BaseProcess] = []
    failed: list[BaseProcess] = []
    try:
        for index in range(count):
            worker = context.Process(target=_worker_main, args=(target, settings, index, os.getpid()),
                                     name=f"gateway-worker-{index}")
            worker.start()
            workers.append(worker)
        log.info("workers started", workers=count, pids=[p.pid for p in workers])
        while not stopping:
            wait([*(p.sentinel for p in workers), wake_r], timeout=5.0)
            _drain(wake_r)
            failed = [p for p in workers if p.exitcode is not None]
            if failed:
                for proc in failed:
                    log.error("worker exited; stopping the gateway", worker=workers.index(proc),
                              pid=proc.pid, exit_code=proc.exitcode)
                break
        else:
            log.info("stopping workers", workers=count)
        code = _stop_all(workers, grace_s + _FLUSH_MARGIN_S, log)
        return 1 if failed else code
    finally:
        # Whatever happened above, no worker outlives the supervisor.
        for proc in workers:
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wake_r.close()
        wake_w.close()


def _worker_main(target: Callable[[Settings, int], None], settings: Settings, index: int,
                 supervisor: int) -> None:
    # The supervisor's handlers and wakeup socket are inherited through fork; the worker's event
    # loop installs its own handlers for SIGTERM/SIGINT.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    _drain_when_orphaned(supervisor)
    target(settings, index)


def _drain_when_orphaned(supervisor: int) -> None:
    """A supervisor killed with SIGKILL cannot stop its workers: the kernel sends them SIGTERM then."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: orphans keep serving until stopped
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(64):
            pass
    except BlockingIOError:
        pass


def _stop_all(workers: list[BaseProcess], timeout_s: float, log: Any) -> int:
    """SIGTERM to every live worker, wait for all; 0 only if every worker exited 0 by itself."""
    for proc in workers:
        if proc.exitcode is None and proc.pid is not None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    code = 0
    for index, proc in enumerate(workers):
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            log.error("worker did not stop in time; killed", worker=index, pid=proc.pid)
            proc.kill()
            proc.join(5)
            code = 1
        elif proc.exitcode != 0:
            code = 1
    return code
