"""`serve --workers 2` (SPEC §4.11) as an operator runs it: one port, two processes, clean drain.

Real PostgreSQL and Redis; the fake Ollama runs in the test's loop, the gateway in its own process
tree (supervisor + two forked workers).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest_asyncio

from entrypoints.app import open_admin
from gateway_core.limits import Limits
from gateway_core.models import ALL_SCOPES
from tests.e2e.conftest_faults import wait_for_exit
from tests.e2e.harness import CLI, gateway_settings
from tests.fake_ollama import FakeOllama
from tests.services import free_port

CHAT_MODEL = "llama3.1:8b"


def free_pair() -> int:
    """A free port whose successor is free too: worker 1 serves its metrics on METRICS_PORT + 1."""
    for _ in range(100):
        base = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


class Workers:
    def __init__(self, database_url: str, redis_url: str, fake: FakeOllama, workdir: Path) -> None:
        self.port, self.metrics_port = free_port(), free_pair()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "gateway.log"
        self.env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
                    "OLLAMA_BASE_URL": fake.url, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.port),
                    "METRICS_PORT": str(self.metrics_port), "AUDIT_SPOOL_DIR": str(workdir / "spool"),
                    "LOG_FORMAT": "json", "LOG_LEVEL": "info", "MODEL_DISCOVERY_REFRESH_S": "1"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_pids: list[int] = []

    async def start(self, timeout_s: float = 30.0) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([CLI, "serve", "--workers", "2"], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while True:
                assert self.proc.poll() is None, f"gateway exited at start-up:\n{self.tail()}"
                assert time.monotonic() < deadline, f"gateway not ready within {timeout_s}s:\n{self.tail()}"
                if len([e for e in self.events() if e.get("event") == "listening"]) == 2:
                    try:
                        async with http.get(self.url + "/readyz") as resp:
                            if resp.status == 200:
                                self.started_pids = self.worker_pids()
                                return
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.1)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    async def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return await wait_for_exit(self.proc, timeout_s, self.tail)

    def kill(self) -> None:
        """Teardown: the supervisor and every worker it started, whatever state the test left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.started_pids:
            try:  # only if the pid is still one of ours, not a reused number
                if b"neuronetz-gateway" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                found.append(event)
        return found

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest_asyncio.fixture
async def workers(database_url: str, redis_url: str, fake: FakeOllama, tmp_path: Path
                  ) -> AsyncIterator[Workers]:
    served = Workers(database_url, redis_url, fake, tmp_path)
    await served.start()
    try:
        yield served
    finally:
        served.kill()


async def new_key(database_url: str, redis_url: str, fake: FakeOllama, tmp_path: Path) -> tuple[str, str]:
    settings = gateway_settings(database_url, redis_url, fake.url, tmp_path)
    tenant = f"w-{uuid.uuid4().hex[:10]}"
    async with open_admin(settings, "e2e-workers") as admin:
        await admin.create_tenant(tenant, Limits(100_000, 100_000_000, 1000))
        await admin.set_models(tenant, (CHAT_MODEL,), False)
        new, _ = await admin.create_key(tenant, "k", ALL_SCOPES, None)
    return new.secret, tenant


async def chat(url: str, secret: str, request_id: str) -> int:
    # A connection per request, so the kernel's SO_REUSEPORT hash spreads them over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http, http.post(
            url + "/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {secret}", "X-Request-Id": request_id}) as resp:
        await resp.read()
        return resp.status


async def requests_counted(metrics_port: int, tenant: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
        text = await resp.text()
    pattern = re.compile(r'^gateway_requests_total\{[^}]*tenant="' + re.escape(tenant) + r'"[^}]*\} (\S+)$')
    return sum(int(float(m.group(1))) for line in text.splitlines() if (m := pattern.match(line)))


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def audited(database_url: str, request_ids: list[str]) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT request_id, status FROM gateway.audit_log WHERE request_id = ANY(%s)", (request_ids,))
        return {str(rid): int(status) for rid, status in await cur.fetchall()}


async def test_two_workers_share_the_port_and_drain_on_sigterm(
        workers: Workers, database_url: str, redis_url: str, fake: FakeOllama, tmp_path: Path) -> None:
    secret, tenant = await new_key(database_url, redis_url, fake, tmp_path)
    listening = [e for e in workers.events() if e.get("event") == "listening"]
    assert sorted(e["worker"] for e in listening) == [0, 1]
    assert len(set(workers.worker_pids())) == 2

    # Each worker reads the model-discovery copy within a second of starting; until then it knows
    # no model (403, fail-closed). Wait until both answer.
    deadline = time.monotonic() + 20
    while set(await asyncio.gather(*(chat(workers.url, secret, f"w-{uuid.uuid4().hex}")
                                     for _ in range(10)))) != {200}:
        assert time.monotonic() < deadline, "the workers do not all serve the model"
        await asyncio.sleep(0.2)
    before = [await requests_counted(workers.metrics_port + i, tenant) for i in (0, 1)]

    first = [f"w-{uuid.uuid4().hex}" for _ in range(40)]
    statuses = await asyncio.gather(*(chat(workers.url, secret, rid) for rid in first))
    assert statuses == [200] * 40
    # Each worker serves its own /metrics on METRICS_PORT + index, and both took a share of the load.
    per_worker = [await requests_counted(workers.metrics_port + i, tenant) - before[i] for i in (0, 1)]
    assert sum(per_worker) == 40 and min(per_worker) > 0, per_worker

    # SIGTERM while requests are in flight: they finish, and every audit row is written before exit.
    fake.latency_s = 1.0
    late = [f"w-{uuid.uuid4().hex}" for _ in range(8)]
    in_flight = [asyncio.create_task(chat(workers.url, secret, rid)) for rid in late]
    await asyncio.sleep(0.5)
    assert workers.proc is not None
    workers.proc.send_signal(signal.SIGTERM)
    assert await asyncio.gather(*in_flight) == [200] * 8
    assert await workers.wait(60) == 0, workers.tail()
    rows = await audited(database_url, first + late)
    assert rows == {rid: 200 for rid in first + late}
    assert any(e.get("event") == "stopping workers" for e in workers.events())


async def test_a_dead_worker_stops_the_gateway_with_a_failure_code(workers: Workers) -> None:
    pids = workers.worker_pids()
    os.kill(pids[1], signal.SIGKILL)
    assert await workers.wait(60) == 1, workers.tail()
    # The other worker was drained, not left behind.
    assert not process_exists(pids[0])
    died = [e for e in workers.events() if e.get("event") == "worker exited; stopping the gateway"]
    assert [(e["worker"], e["exit_code"]) for e in died] == [(1, -signal.SIGKILL)]


async def test_a_port_out_of_range_for_the_metrics_of_every_worker_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "METRICS_PORT": "65535"}
    proc = await asyncio.create_subprocess_exec(
        CLI, "serve", "--workers", "2", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert err.decode().strip().splitlines() == [
        "error: METRICS_PORT=65535 leaves no room for 2 workers' metrics ports"]


async def test_workers_of_a_killed_supervisor_drain_and_exit(workers: Workers) -> None:
    pids = workers.worker_pids()
    assert workers.proc is not None
    workers.proc.kill()  # SIGKILL: the supervisor cannot forward anything
    workers.proc.wait(10)
    deadline = time.monotonic() + 60
    while any(process_exists(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} still running after their supervisor died"
        await asyncio.sleep(0.1)
    # Nobody is left holding the port.
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(workers.url + "/healthz") as resp:
                raise AssertionError(f"something still answers on the port: {resp.status}")
        except aiohttp.ClientConnectorError:
            pass
