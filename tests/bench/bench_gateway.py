"""Gateway overhead benchmark (`make bench`): the same load straight to the fake Ollama, through a
bare aiohttp proxy (tests/bench/bare_proxy.py: the floor of our stack) and through the gateway with
every check on, alternating in one run, so the differences are what each layer adds.

Not a test (pytest does not collect it). Run: ``.venv/bin/python -m tests.bench.bench_gateway
[--workers 2] [--soak] [--json out.json]``. Everything runs on this machine, on loopback only, and is
torn down at the end (also on Ctrl-C / SIGTERM):

* a private Redis and a private PostgreSQL cluster (initdb + pg_ctl) on free ports, migrated to head;
* one tenant (allow_all_models) and one key with rpm/tpm/concurrency limits at tenant AND key level
  and daily/monthly/total budgets, all far too high to bind, so every admission check still runs;
  JSON request logs, metrics and the audit trail are on as in production;
* the fake Ollama in its own process (``--fast``: no latency, no token delay; 16 completion tokens;
  ``--coalesce`` by default: each stream is sent in one write, which keeps the fake's share small);
* the bare proxy and the gateway (``neuronetz-gateway serve``) in processes of their own; with
  ``--workers N`` also a second gateway started with ``serve --workers N`` for the same phases;
* the load generator in its own process: ``wrk`` with a Lua script, else :mod:`tests.bench.loadgen`.
  Streaming phases also run :mod:`tests.bench.loadgen` on 4 of the connections for time to first byte.

Phases, each scenario in turn against direct → proxy → gateway (→ gateway xN): warm-up; concurrency 1
chat for latency; concurrency 64 for chat, streaming chat and embeddings. CPU per request of every
process comes from utime+stime deltas in /proc/<pid>/stat (all threads; PostgreSQL = postmaster +
backends; a gateway with workers = supervisor + workers) over the phase plus a settle second for
batched writers; RSS from /proc/<pid>/status. The table is appended to docs/performance.md
(``--no-doc`` to skip). ``--soak`` adds 10 minutes of chat at concurrency 64 and compares the
gateway's RSS after warm-up with the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench.procs import (
    _on_sigterm,
    _Stop,
    http_call,
    machine_busy_s,
    proc_cpu_s,
    reaped_children_cpu_s,
    stop_process,
    tail,
    tree_cpu_s,
    tree_status_kib,
    wait_port,
)
from tests.services import PrivatePostgres, PrivateRedis, free_port

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "performance.md"
CAVEAT = ("All processes share this machine's {cores} core(s): the load generator, the fake Ollama, Redis, "
          "PostgreSQL, the proxy and the gateway compete for CPU. Compare the columns of one run, not "
          "absolute numbers across machines.")

CHAT_MODEL = "llama3.1:8b"
EMBED_MODEL = "nomic-embed-text:latest"
COMPLETION_TOKENS = 16
CHAT_BODY = {"model": CHAT_MODEL, "messages": [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say hello to the benchmark in one short sentence."}]}
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", CHAT_BODY),
    "chat_stream": ("/v1/chat/completions", {**CHAT_BODY, "stream": True}),
    "embeddings": ("/v1/embeddings", {"model": EMBED_MODEL,
                                      "input": "The quick brown fox jumps over the lazy dog."}),
}
HUGE_RPM = 1_000_000_000      # column is int4
HUGE_TPM = 10**15
HUGE_CONCURRENT = 1_000_000
HUGE_BUDGET = 10**15
SETTLE_S = 1.0                # after each phase: the gateway's batched writers flush (every 0.2 s)
TTFB_PROBE_CONNECTIONS = 4
SOAK_CHUNK_S = 30.0
SOAK_WARMUP_S = 60.0
PROCESSES = ("target", "fake", "redis", "postgres", "loadgen")

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{auth}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"connect":%.0f,' ..
    '"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f,"mean_us":%.1f,"max_us":%.1f,' ..
    '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"p999_us":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


# --------------------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int]
    ttfb_p50_ms: float | None = None
    ttfb_p99_ms: float | None = None

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> LoadResult:
        duration_s = float(raw["duration_us"]) / 1e6
        requests = int(raw["requests"])
        return cls(
            requests=requests, duration_s=round(duration_s, 3),
            rps=round(requests / duration_s, 1) if duration_s > 0 else 0.0,
            **{f"{p}_ms": round(float(raw[f"{p}_us"]) / 1000, 3)
               for p in ("p50", "p90", "p99", "p999", "mean", "max")},
            errors={k: int(raw[k]) for k in ("connect", "read", "write", "status", "timeout") if int(raw[k])},
        )

    def with_probe(self, probe: LoadResult, raw_probe: dict[str, Any]) -> LoadResult:
        """The main generator's latencies, both generators' requests, the probe's time to first byte."""
        errors = dict(self.errors)
        for name, count in probe.errors.items():
            errors[name] = errors.get(name, 0) + count
        return LoadResult(
            requests=self.requests + probe.requests, duration_s=self.duration_s,
            rps=round(self.rps + probe.rps, 1), p50_ms=self.p50_ms, p90_ms=self.p90_ms, p99_ms=self.p99_ms,
            p999_ms=self.p999_ms, mean_ms=self.mean_ms, max_ms=self.max_ms, errors=errors,
            ttfb_p50_ms=round(float(raw_probe["ttfb_p50_us"]) / 1000, 3),
            ttfb_p99_ms=round(float(raw_probe["ttfb_p99_us"]) / 1000, 3))


class LoadGenerator:
    """wrk when installed (`--loadgen auto|wrk`), else the aiohttp generator in its own process."""

    def __init__(self, kind: str, workdir: Path, procs: list[subprocess.Popen[bytes]]) -> None:
        wrk = shutil.which("wrk")
        if kind == "wrk" and wrk is None:
            raise RuntimeError("--loadgen wrk: wrk is not installed (apt-get install -y wrk)")
        self.kind = "wrk" if kind in ("auto", "wrk") and wrk is not None else "python"
        self.wrk = wrk
        self.workdir = workdir
        self.procs = procs

    def describe(self) -> str:
        if self.kind == "wrk":
            version = subprocess.run([str(self.wrk), "-v"], capture_output=True, text=True, check=False)
            first = (version.stdout or version.stderr).splitlines()
            name = first[0].split(" [")[0].strip() if first else "wrk (unknown version)"
            return f"{name} (+ tests.bench.loadgen on {TTFB_PROBE_CONNECTIONS} connections for TTFB)"
        why = "wrk not installed" if self.wrk is None else "--loadgen python"
        return f"python aiohttp load generator (tests.bench.loadgen; {why})"

    def _start(self, kind: str, port: int, path: str, body: dict[str, Any], auth: str | None,
               connections: int, duration_s: float) -> subprocess.Popen[bytes]:
        payload = json.dumps(body, separators=(",", ":"))
        url = f"http://127.0.0.1:{port}{path}"
        name = uuid.uuid4().hex[:8]
        if kind == "wrk":
            script = self.workdir / f"wrk-{name}.lua"
            auth_line = f'wrk.headers["Authorization"] = "Bearer {auth}"' if auth else ""
            script.write_text(WRK_SCRIPT.format(body=payload, auth=auth_line), encoding="utf-8")
            # wrk takes whole seconds only.
            cmd = [str(self.wrk), "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
                   "--timeout", "10s", "-s", str(script), url]
        else:
            body_file = self.workdir / f"body-{name}.json"
            body_file.write_text(payload, encoding="utf-8")
            cmd = [sys.executable, "-m", "tests.bench.loadgen", "--url", url, "--body-file", str(body_file),
                   "-c", str(connections), "-d", str(duration_s)]
            if auth:
                cmd += ["--header", f"Authorization: Bearer {auth}"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _collect(self, proc: subprocess.Popen[bytes], duration_s: float) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=duration_s + 60)
        finally:
            stop_process(proc, 5)
            self.procs.remove(proc)
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("BENCH_JSON "):
                parsed: dict[str, Any] = json.loads(line[len("BENCH_JSON "):])
                return parsed
        raise RuntimeError(f"load generator printed no result (exit {proc.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}")

    def run(self, port: int, path: str, body: dict[str, Any], auth: str | None, connections: int,
            duration_s: float, ttfb: bool = False) -> LoadResult:
        """With *ttfb* and wrk, the python generator takes a few of the connections to time first bytes."""
        if self.kind == "python" or not ttfb or connections <= TTFB_PROBE_CONNECTIONS:
            raw = self._collect(self._start(self.kind, port, path, body, auth, connections, duration_s),
                                duration_s)
            result = LoadResult.from_raw(raw)
            if ttfb and "ttfb_p50_us" in raw:
                result.ttfb_p50_ms = round(float(raw["ttfb_p50_us"]) / 1000, 3)
                result.ttfb_p99_ms = round(float(raw["ttfb_p99_us"]) / 1000, 3)
            return result
        main = self._start("wrk", port, path, body, auth, connections - TTFB_PROBE_CONNECTIONS, duration_s)
        probe = self._start("python", port, path, body, auth, TTFB_PROBE_CONNECTIONS, duration_s)
        raw_main = self._collect(main, duration_s)
        raw_probe = self._collect(probe, duration_s)
        return LoadResult.from_raw(raw_main).with_probe(LoadResult.from_raw(raw_probe), raw_probe)


# --------------------------------------------------------------------------------------------------
# The stack under test
# --------------------------------------------------------------------------------------------------


@dataclass
class Served:
    """One process tree the load goes to: the fake itself, the bare proxy, or a gateway."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None
    log: Path
    auth: bool = False

    def cpu_s(self) -> float:
        assert self.proc is not None
        return tree_cpu_s(self.proc.pid)

    def rss_kib(self) -> dict[str, int]:
        assert self.proc is not None
        return {"rss_kib": tree_status_kib(self.proc.pid, "VmRSS"),
                "peak_rss_kib": tree_status_kib(self.proc.pid, "VmHWM")}


@dataclass
class Stack:
    workdir: Path
    coalesce: bool
    workers: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis: SessionRedis | None = None
    postgres: PrivatePostgres | None = None
    targets: dict[str, Served] = field(default_factory=dict)
    secret: str = ""

    def start(self) -> None:
        self.redis = SessionRedis()
        self.redis.start()
        self.postgres = PrivatePostgres()
        self.postgres.init()
        self.postgres.start()
        _migrate(self.postgres.url)
        self.secret = asyncio.run(_provision(self.postgres.url, self.redis.url))

        fake_port = free_port()
        cmd = [sys.executable, "-m", "tests.fake_ollama", "--port", str(fake_port), "--fast",
               "--completion-tokens", str(COMPLETION_TOKENS), "--max-log", "1000"]
        if self.coalesce:
            cmd.append("--coalesce")
        fake = self._spawn("direct", fake_port, cmd, None)
        wait_port(fake_port, fake.proc, 20, "fake Ollama")
        fake_url = f"http://127.0.0.1:{fake_port}"

        proxy_port = free_port()
        proxy = self._spawn("proxy", proxy_port, [sys.executable, "-m", "tests.bench.bare_proxy", "--port",
                                                  str(proxy_port), "--upstream", fake_url], None)
        wait_port(proxy_port, proxy.proc, 20, "bare proxy")

        self._start_gateway("gateway", 1, fake_url)
        if self.workers > 1:
            self._start_gateway(f"gateway x{self.workers}", self.workers, fake_url)

    def _spawn(self, name: str, port: int, cmd: list[str], env: dict[str, str] | None,
               auth: bool = False) -> Served:
        log = self.workdir / f"{name.replace(' ', '-')}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        self.targets[name] = Served(name, port, proc, log, auth)
        return self.targets[name]

    def _start_gateway(self, name: str, workers: int, fake_url: str) -> None:
        assert self.postgres is not None and self.redis is not None
        port = free_port()
        metrics_port = _free_port_range(workers)
        spool = self.workdir / f"spool-{workers}"
        spool.mkdir()
        env = {**os.environ, "DATABASE_URL": self.postgres.url, "REDIS_URL": self.redis.url,
               "OLLAMA_BASE_URL": fake_url, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
               "METRICS_PORT": str(metrics_port), "AUDIT_SPOOL_DIR": str(spool), "LOG_FORMAT": "json",
               "GATEWAY_WORKERS": str(workers)}
        served = self._spawn(name, port, [str(Path(sys.executable).with_name("neuronetz-gateway")), "serve"],
                             env, auth=True)
        self._wait_ready(served, 60)

    def _wait_ready(self, served: Served, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        assert served.proc is not None
        while time.monotonic() < deadline:
            if served.proc.poll() is not None:
                raise RuntimeError(f"{served.name} exited with code {served.proc.returncode}:\n"
                                   f"{tail(served.log)}")
            try:
                status, body = http_call(served.port, "GET", "/readyz", timeout_s=3)
                if status == 200:
                    return
                last = f"{status} {body[:200]!r}"
            except OSError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
        raise RuntimeError(f"{served.name} is not ready after {timeout_s}s ({last}):\n{tail(served.log)}")

    def check(self) -> None:
        """One request of each scenario through every target must succeed with the expected shape."""
        for served in self.targets.values():
            headers = {"Content-Type": "application/json"}
            if served.auth:
                headers["Authorization"] = f"Bearer {self.secret}"
            for name, (path, body) in SCENARIOS.items():
                deadline = time.monotonic() + 20
                while True:
                    status, raw = http_call(served.port, "POST", path, json.dumps(body).encode(), headers)
                    if status == 200 or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)  # model discovery may not have filled yet
                if status != 200:
                    raise RuntimeError(f"{name} via {served.name}: answered {status}: {raw[:300]!r}")
                if name == "chat_stream":
                    ok = raw.rstrip().endswith(b"data: [DONE]")
                elif name == "chat":
                    ok = bool(json.loads(raw)["choices"][0]["message"]["content"])
                else:
                    ok = len(json.loads(raw)["data"][0]["embedding"]) > 0
                if not ok:
                    raise RuntimeError(f"{name} via {served.name}: unexpected answer: {raw[:300]!r}")

    def assert_alive(self) -> None:
        """A service that died mid-run makes every later number meaningless: stop with its name."""
        named = [(s.name, s.proc) for s in self.targets.values()]
        named.append(("redis-server", self.redis.proc if self.redis else None))
        for name, proc in named:
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else "never started"
                raise RuntimeError(f"{name} is not running any more (exit {code})")
        with contextlib.suppress(OSError, ValueError):
            os.kill(self.postgres_pid(), 0)
            return
        raise RuntimeError("PostgreSQL is not running any more")

    def postgres_pid(self) -> int:
        assert self.postgres is not None
        return int((self.postgres.data / "postmaster.pid").read_text().split()[0])

    def cpu_snapshot(self) -> dict[str, float]:
        assert self.redis is not None and self.redis.proc is not None
        snap = {name: served.cpu_s() for name, served in self.targets.items()}
        snap.update({"redis": proc_cpu_s(self.redis.proc.pid), "postgres": tree_cpu_s(self.postgres_pid()),
                     "loadgen": reaped_children_cpu_s(), "machine_busy": machine_busy_s()})
        return snap

    def stop(self) -> None:
        for proc in list(reversed(self.procs)):
            with contextlib.suppress(Exception):
                stop_process(proc, 60)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                self.postgres.destroy()


def _free_port_range(count: int) -> int:
    """A port with the *count* - 1 ports after it free as well (worker i serves metrics on base + i)."""
    import socket

    for _ in range(100):
        base = free_port()
        if base + count - 1 > 65535:
            continue
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


class SessionRedis(PrivateRedis):
    """PrivateRedis in a session of its own: a Ctrl-C on the terminal reaches only the bench, which
    then stops everything in order (the gateway first, while its Redis and PostgreSQL still answer)."""

    def start(self) -> SessionRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, self.proc, 10, "redis-server")
        return self


def _migrate(url: str) -> None:
    from entrypoints.migrate import upgrade_to_head

    upgrade_to_head(url)


async def _provision(database_url: str, redis_url: str) -> str:
    import attrs

    from entrypoints.app import open_admin
    from entrypoints.settings import load_settings
    from gateway_core.limits import Limits
    from gateway_core.models import ALL_SCOPES

    settings = attrs.evolve(load_settings(), database_url=database_url, redis_url=redis_url)
    limits = Limits(HUGE_RPM, HUGE_TPM, HUGE_CONCURRENT)
    async with open_admin(settings, "bench") as admin:
        await admin.create_tenant("bench", limits)
        await admin.set_models("bench", (), True)
        new, _ = await admin.create_key("bench", "bench-key", ALL_SCOPES, limits)
        await admin.set_budget(new.prefix, HUGE_BUDGET, HUGE_BUDGET, HUGE_BUDGET)
    return new.secret


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    scenario: str
    target: str            # "direct" (fake Ollama), "proxy", "gateway", "gateway xN"
    connections: int
    load: LoadResult
    cpu_ms_per_request: dict[str, float]   # target (proxy/gateway tree), fake, redis, postgres, loadgen
    target_cpu_util: float                 # the target's CPU seconds / wall seconds (1.0 = one core)
    target_rss_kib: int                    # after the phase (0 for direct: the fake is in "fake")
    machine_busy_cores: float              # all CPU use on the machine during the phase, in cores
    foreign_busy_cores: float              # of which by processes that are not part of this bench


class Bench:
    def __init__(self, stack: Stack, loadgen: LoadGenerator, py_spy_dir: Path | None,
                 py_spy_format: str) -> None:
        self.stack = stack
        self.loadgen = loadgen
        self.py_spy_dir = py_spy_dir
        self.py_spy_format = py_spy_format
        self.phases: list[Phase] = []

    def load(self, scenario: str, target: str, connections: int, duration_s: float) -> LoadResult:
        path, body = SCENARIOS[scenario]
        served = self.stack.targets[target]
        auth = self.stack.secret if served.auth else None
        return self.loadgen.run(served.port, path, body, auth, connections, duration_s,
                                ttfb=scenario == "chat_stream")

    def phase(self, scenario: str, target: str, connections: int, duration_s: float) -> Phase:
        label = f"{scenario}/{target}/c{connections}"
        print(f"  {label:<34} {duration_s:g} s ...", end="", flush=True)
        spy = self._start_py_spy(label, duration_s) if target.startswith("gateway") else None
        before, t0 = self.stack.cpu_snapshot(), time.monotonic()
        load = self.load(scenario, target, connections, duration_s)
        time.sleep(SETTLE_S)
        self.stack.assert_alive()
        after, wall = self.stack.cpu_snapshot(), time.monotonic() - t0
        if spy is not None:
            # py-spy writes its profile when its -d duration ends (or on SIGINT, not on SIGTERM).
            try:
                spy.wait(duration_s + 30)
            except subprocess.TimeoutExpired:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            self.stack.procs.remove(spy)
        n = max(load.requests, 1)
        delta = {name: after[name] - before[name] for name in before}
        delta["fake"] = delta["direct"]
        delta["target"] = 0.0 if target == "direct" else delta[target]
        ours = sum(delta[name] for name in self.stack.targets) + sum(
            delta[name] for name in ("redis", "postgres", "loadgen"))
        cpu = {name: round(delta[name] * 1000 / n, 3) for name in PROCESSES}
        served = self.stack.targets[target]
        result = Phase(scenario, target, connections, load, cpu,
                       target_cpu_util=round(delta["target"] / wall, 3),
                       target_rss_kib=0 if target == "direct" else served.rss_kib()["rss_kib"],
                       machine_busy_cores=round(delta["machine_busy"] / wall, 3),
                       foreign_busy_cores=round(max(0.0, delta["machine_busy"] - ours) / wall, 3))
        self.phases.append(result)
        errors = f"  errors={load.errors}" if load.errors else ""
        ttfb = f"  ttfb p50 {load.ttfb_p50_ms:.2f} ms" if load.ttfb_p50_ms is not None else ""
        print(f" {load.requests:>7} req {load.rps:>8.1f} req/s  p50 {load.p50_ms:.3f}"
              f"  p99 {load.p99_ms:.3f} ms"
              f"{ttfb}  cpu {cpu['target'] if target != 'direct' else cpu['fake']:.3f} ms/req"
              f"  (other load {result.foreign_busy_cores:.2f} cores){errors}", flush=True)
        return result

    def _start_py_spy(self, label: str, duration_s: float) -> subprocess.Popen[bytes] | None:
        if self.py_spy_dir is None:
            return None
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise RuntimeError("--py-spy needs py-spy (pip install py-spy)")
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[self.py_spy_format]
        out = self.py_spy_dir / f"{label.replace('/', '-').replace(' ', '')}.{ext}"
        served = self.stack.targets[label.split("/")[1]]
        assert served.proc is not None
        proc = subprocess.Popen(
            [exe, "record", "-p", str(served.proc.pid), "--subprocesses", "-o", str(out),
             "-f", self.py_spy_format, "-r", "100", "-d", str(int(duration_s + SETTLE_S))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.stack.procs.append(proc)
        time.sleep(0.3)
        return proc

    def find(self, scenario: str, target: str, connections: int) -> Phase | None:
        return next((p for p in self.phases
                     if (p.scenario, p.target, p.connections) == (scenario, target, connections)), None)

    def soak(self, minutes: float, connections: int) -> dict[str, Any]:
        """Chat at *connections* through the gateway for *minutes*; RSS after warm-up vs the end."""
        served = self.stack.targets["gateway"]
        total_s = minutes * 60
        started = time.monotonic()
        samples: list[tuple[float, int]] = []
        requests = 0
        errors: dict[str, int] = {}
        warm_rss = 0
        print(f"soak: chat through the gateway at concurrency {connections} for {minutes:g} min", flush=True)
        while (elapsed := time.monotonic() - started) < total_s:
            load = self.load("chat", "gateway", connections, min(SOAK_CHUNK_S, total_s - elapsed))
            self.stack.assert_alive()
            requests += load.requests
            for name, count in load.errors.items():
                errors[name] = errors.get(name, 0) + count
            rss = served.rss_kib()["rss_kib"]
            samples.append((round(time.monotonic() - started, 1), rss))
            if not warm_rss and time.monotonic() - started >= SOAK_WARMUP_S:
                warm_rss = rss
            print(f"  {samples[-1][0]:>6.0f} s  RSS {rss / 1024:.1f} MiB  {load.rps:.0f} req/s", flush=True)
        end_rss = samples[-1][1]
        warm_rss = warm_rss or samples[0][1]
        growth = (end_rss - warm_rss) / warm_rss if warm_rss else 0.0
        return {"minutes": minutes, "requests": requests, "errors": errors, "warm_rss_kib": warm_rss,
                "end_rss_kib": end_rss, "growth": round(growth, 4), "ok": abs(growth) <= 0.10 and not errors,
                "samples": samples}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def targets_check(bench: Bench, c_lat: int, c_thr: int, workers: int) -> list[tuple[str, bool | None, str]]:
    """Issue 11's 'done when' figures from this run: (what, met or None if not measured, the numbers)."""
    checks: list[tuple[str, bool | None, str]] = []

    def phase(scenario: str, target: str, c: int) -> Phase | None:
        return bench.find(scenario, target, c)

    limits = {"chat": 0.5, "chat_stream": 0.7, "embeddings": 0.5}
    for scenario, limit in limits.items():
        gw, px = phase(scenario, "gateway", c_thr), phase(scenario, "proxy", c_thr)
        if gw is None or px is None:
            continue
        g, p = gw.cpu_ms_per_request["target"], px.cpu_ms_per_request["target"]
        checks.append((f"gateway CPU per request, {scenario} c={c_thr} <= {limit} ms", g <= limit,
                       f"{g:.3f} ms"))
        checks.append((f"  ... {scenario} within 0.2 ms of the bare proxy's", g - p <= 0.2,
                       f"{g:.3f} - {p:.3f} = {g - p:+.3f} ms"))
    gw, direct = phase("chat", "gateway", c_lat), phase("chat", "direct", c_lat)
    if gw is not None and direct is not None:
        a50, a99 = gw.load.p50_ms - direct.load.p50_ms, gw.load.p99_ms - direct.load.p99_ms
        checks.append((f"chat c={c_lat} added latency p50 <= 0.5 ms", a50 <= 0.5, f"{a50:+.3f} ms"))
        checks.append((f"chat c={c_lat} added latency p99 <= 3 ms", a99 <= 3.0, f"{a99:+.3f} ms"))
    gw, px = phase("chat", "gateway", c_thr), phase("chat", "proxy", c_thr)
    if gw is not None and px is not None and px.load.rps:
        ratio = gw.load.rps / px.load.rps
        checks.append((f"chat c={c_thr} req/s >= 75 % of the bare proxy's", ratio >= 0.75,
                       f"{gw.load.rps:.0f} / {px.load.rps:.0f} = {ratio:.0%}"))
        many = phase("chat", f"gateway x{workers}", c_thr) if workers > 1 else None
        if many is not None and gw.load.rps:
            grow = many.load.rps / gw.load.rps
            checks.append((f"chat c={c_thr} req/s with --workers {workers} >= 1.5x one worker's", grow >= 1.5,
                           f"{many.load.rps:.0f} / {gw.load.rps:.0f} = {grow:.2f}x"))
        else:
            checks.append((f"chat c={c_thr} req/s with --workers 2 >= 1.5x one worker's", None,
                           "not measured (--workers 2)"))
        backing = gw.cpu_ms_per_request["redis"] + gw.cpu_ms_per_request["postgres"]
        checks.append(("Redis + PostgreSQL CPU per chat request <= 0.12 ms", backing <= 0.12,
                       f"{backing:.3f} ms"))
    return checks


def report(bench: Bench, meta: dict[str, Any], c_lat: int, c_thr: int, soak: dict[str, Any] | None) -> str:
    workers = int(meta["workers"])
    lines = [
        "",
        "=" * 110,
        "neuronetz-gateway overhead benchmark",
        f"load generator: {meta['loadgen']};  fake Ollama: {meta['fake_flags']};  "
        f"python {meta['python']};  commit {meta['commit']}",
        "gateway: JSON logs, metrics, audit on; key with tenant+key rpm/tpm/concurrent limits and "
        "daily/monthly/total budgets (never binding)",
        "CAVEAT: " + meta["caveat"],
        "=" * 110,
        "",
        f"Latency, concurrency {c_lat}, POST /v1/chat/completions (non-streaming), "
        f"{meta['latency_duration_s']:g} s each; added = minus direct",
        f"  {'':<10}{'direct':>10}{'proxy':>10}{'gateway':>10}{'proxy +':>10}{'gateway +':>11}"
        f"{'gw - proxy':>12}",
    ]
    d, p, g = (bench.find("chat", t, c_lat) for t in ("direct", "proxy", "gateway"))
    assert d is not None and p is not None and g is not None
    for label, attr in (("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"),
                        ("mean ms", "mean_ms")):
        dv, pv, gv = (getattr(x.load, attr) for x in (d, p, g))
        lines.append(f"  {label:<10}{dv:>10.3f}{pv:>10.3f}{gv:>10.3f}{pv - dv:>+10.3f}{gv - dv:>+11.3f}"
                     f"{gv - pv:>+12.3f}")
    lines.append(f"  {'CPU ms/req':<10}{d.cpu_ms_per_request['fake']:>10.3f}"
                 f"{p.cpu_ms_per_request['target']:>10.3f}"
                 f"{g.cpu_ms_per_request['target']:>10.3f}   (direct column: the fake's own CPU)")
    lines += [
        "",
        f"Throughput, concurrency {c_thr}, {meta['throughput_duration_s']:g} s each; "
        "+p50/+p99 = minus direct; "
        "CPU in ms per request",
        f"  {'scenario':<12}{'target':<12}{'req/s':>9}{'p50':>8}{'p99':>8}{'+p50':>8}{'+p99':>8}"
        f"{'ttfb50':>8}{'ttfb99':>8}{'cpu':>8}{'%core':>7}{'redis':>7}{'pg':>7}{'fake':>7}{'RSS MiB':>9}"
        f"{'other':>7}  errors",
    ]
    for scenario in SCENARIOS:
        direct = bench.find(scenario, "direct", c_thr)
        for target in bench.stack.targets:
            ph = bench.find(scenario, target, c_thr)
            if ph is None or direct is None:
                continue
            cpu = ph.cpu_ms_per_request
            own = cpu["fake"] if target == "direct" else cpu["target"]
            util = ph.target_cpu_util if target != "direct" else 0.0
            ttfb50 = f"{ph.load.ttfb_p50_ms:.2f}" if ph.load.ttfb_p50_ms is not None else "-"
            ttfb99 = f"{ph.load.ttfb_p99_ms:.2f}" if ph.load.ttfb_p99_ms is not None else "-"
            lines.append(
                f"  {scenario:<12}{target:<12}{ph.load.rps:>9.1f}{ph.load.p50_ms:>8.2f}{ph.load.p99_ms:>8.2f}"
                f"{ph.load.p50_ms - direct.load.p50_ms:>+8.2f}{ph.load.p99_ms - direct.load.p99_ms:>+8.2f}"
                f"{ttfb50:>8}{ttfb99:>8}{own:>8.3f}{util * 100:>6.0f}%{cpu['redis']:>7.3f}"
                f"{cpu['postgres']:>7.3f}{cpu['fake']:>7.3f}"
                f"{_mib(ph.target_rss_kib) if ph.target_rss_kib else '-':>9}"
                f"{ph.foreign_busy_cores:>7.2f}  {ph.load.errors or '-'}")
    memory = meta["gateway_memory_kib"]
    lines += [
        "",
        f"Gateway memory (VmRSS): after start {_mib(memory['start']['rss_kib'])} MiB, after warm-up "
        f"{_mib(memory['warm']['rss_kib'])} MiB, after all load {_mib(memory['end']['rss_kib'])} MiB "
        f"(peak {_mib(memory['end']['peak_rss_kib'])} MiB)",
        "",
        "cpu: utime+stime of the target's process tree over the phase plus a "
        f"{SETTLE_S:g} s settle, / completed requests (direct: the fake's). redis/pg/fake: the same for "
        "those "
        "processes (pg = postmaster + backends). other: cores used by processes outside this bench.",
        "ttfb: time to the first body byte, from the python generator on "
        f"{TTFB_PROBE_CONNECTIONS} of the {c_thr} connections (wrk times whole responses).",
    ]
    if soak is not None:
        lines += ["", f"Soak: {soak['minutes']:g} min of chat at c={c_thr}, {soak['requests']} requests; "
                  "RSS after "
                  f"warm-up {_mib(soak['warm_rss_kib'])} MiB, at the end {_mib(soak['end_rss_kib'])} MiB "
                  f"({soak['growth']:+.1%}): {'OK (within 10 %)' if soak['ok'] else 'NOT OK'}"
                  + (f"; errors {soak['errors']}" if soak["errors"] else "")]
    lines += ["", "Issue 11 targets (this run):"]
    for what, met, numbers in targets_check(bench, c_lat, c_thr, workers):
        mark = "n/a " if met is None else ("MET " if met else "NOT ")
        lines.append(f"  {mark} {what}: {numbers}")
    lines.append("")
    failed = [f"{p.scenario}/{p.target}/c{p.connections}: {p.load.errors}" for p in bench.phases
              if p.load.errors]
    if failed:
        lines += ["FAILED: some requests did not succeed, so these numbers are not valid:",
                  *(f"  {item}" for item in failed), ""]
    noisy = max(p.foreign_busy_cores for p in bench.phases)
    if noisy > 0.1:
        lines += [f"WARNING: other processes used up to {noisy:.2f} cores during the measurements; "
                  "these numbers are noisy. Rerun on a quiet machine.", ""]
    return "\n".join(lines)


def markdown(bench: Bench, meta: dict[str, Any], c_lat: int, c_thr: int, soak: dict[str, Any] | None) -> str:
    """The run as a section for docs/performance.md."""
    targets = list(bench.stack.targets)
    names = {"direct": "direct", "proxy": "bare proxy"}
    noisy = max(p.foreign_busy_cores for p in bench.phases)
    out = [
        f"### {meta['date']} · commit {meta['commit']} · {meta['cores']} cores · "
        f"other load up to {noisy:.2f} cores",
        "",
        f"{meta['loadgen']}; fake Ollama {meta['fake_flags']}; "
        f"latency phases {meta['latency_duration_s']:g} s, "
        f"throughput phases {meta['throughput_duration_s']:g} s.",
        "",
        "| | " + " | ".join(names.get(t, t.replace(" x", " \N{MULTIPLICATION SIGN}"))
                            for t in targets) + " |",
        "|---" * (len(targets) + 1) + "|",
    ]

    def row(label: str, cell: Any) -> None:
        out.append(f"| {label} | " + " | ".join(cell(t) for t in targets) + " |")

    def get(scenario: str, target: str, c: int) -> Phase | None:
        return bench.find(scenario, target, c)

    def lat(t: str) -> str:
        ph, d = get("chat", t, c_lat), get("chat", "direct", c_lat)
        if ph is None or d is None:
            return "—"
        text = f"{ph.load.p50_ms:.2f} / {ph.load.p99_ms:.2f}"
        return text if t == "direct" else (
            f"{text} (+{ph.load.p50_ms - d.load.p50_ms:.2f} / +{ph.load.p99_ms - d.load.p99_ms:.2f})")

    def rps(scenario: str) -> Any:
        def cell(t: str) -> str:
            ph = get(scenario, t, c_thr)
            return "—" if ph is None else f"{ph.load.rps:,.0f}"
        return cell

    def p50p99(scenario: str) -> Any:
        def cell(t: str) -> str:
            ph = get(scenario, t, c_thr)
            return "—" if ph is None else f"{ph.load.p50_ms:.1f} / {ph.load.p99_ms:.1f}"
        return cell

    def ttfb(t: str) -> str:
        ph = get("chat_stream", t, c_thr)
        if ph is None or ph.load.ttfb_p50_ms is None:
            return "—"
        return f"{ph.load.ttfb_p50_ms:.1f} / {ph.load.ttfb_p99_ms:.1f}"

    def cpu(t: str) -> str:
        values = []
        for scenario in SCENARIOS:
            ph = get(scenario, t, c_thr)
            if ph is None:
                values.append("—")
            else:
                values.append(f"{ph.cpu_ms_per_request['fake' if t == 'direct' else 'target']:.2f}")
        return " / ".join(values)

    def backing(t: str) -> str:
        ph = get("chat", t, c_thr)
        if ph is None:
            return "—"
        return f"{ph.cpu_ms_per_request['redis'] + ph.cpu_ms_per_request['postgres']:.3f}"

    def rss(t: str) -> str:
        if t == "direct":
            return "—"
        values = [p.target_rss_kib for p in bench.phases if p.target == t]
        return f"{max(values) / 1024:.0f} MiB" if values else "—"

    row(f"chat c={c_lat} p50 / p99 ms (added)", lat)
    row(f"chat c={c_thr} req/s", rps("chat"))
    row(f"chat c={c_thr} p50 / p99 ms", p50p99("chat"))
    row(f"streaming chat c={c_thr} req/s", rps("chat_stream"))
    row(f"streaming c={c_thr} whole response p50 / p99 ms", p50p99("chat_stream"))
    row(f"streaming c={c_thr} time to first byte p50 / p99 ms", ttfb)
    row(f"embeddings c={c_thr} req/s", rps("embeddings"))
    row(f"CPU ms per request at c={c_thr}: chat / stream / embeddings (direct: the fake's)", cpu)
    row(f"Redis + PostgreSQL CPU ms per chat request (c={c_thr})", backing)
    row("RSS under load (max)", rss)
    out += ["", "Issue 11 targets in this run:", ""]
    for what, met, numbers in targets_check(bench, c_lat, c_thr, int(meta["workers"])):
        mark = "n/a" if met is None else ("met" if met else "**not met**")
        out.append(f"- {what.strip(' .')}: {numbers} — {mark}")
    if soak is not None:
        out += ["", f"Soak: {soak['minutes']:g} min of chat at c={c_thr}: "
                f"RSS {_mib(soak['warm_rss_kib'])} MiB after "
                f"warm-up, {_mib(soak['end_rss_kib'])} MiB at the end ({soak['growth']:+.1%}) — "
                f"{'within 10 %' if soak['ok'] else '**not within 10 %**'}."]
    failed = [p for p in bench.phases if p.load.errors]
    if failed:
        out += ["", "**Some requests failed in this run; its numbers are not valid.**"]
    return "\n".join(out) + "\n"


def append_to_doc(section: str) -> None:
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else "# Performance\n"
    heading = "## Bench runs (appended by `make bench`)"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n"
    DOC.write_text(text.rstrip("\n") + "\n\n" + section, encoding="utf-8")


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_gateway",
                                     description="The gateway's overhead over a bare proxy and the fake.")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--latency-duration", type=float, default=10.0,
                        help="seconds per concurrency-1 phase (default 10)")
    parser.add_argument("--throughput-duration", type=float, default=8.0,
                        help="seconds per concurrency-64 phase (default 8)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of warm-up (default 4)")
    parser.add_argument("--connections", type=int, default=64, help="throughput concurrency (default 64)")
    parser.add_argument("--workers", type=int, default=1,
                        help="also measure a gateway started with serve --workers N (default: off)")
    parser.add_argument("--soak", nargs="?", type=float, const=10.0, default=None, metavar="MINUTES",
                        help="after the phases, chat through the gateway for MINUTES (default 10) and "
                             "compare RSS after warm-up with the end (must stay within 10 %%)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="auto = wrk when installed, else the python generator")
    parser.add_argument("--no-coalesce", dest="coalesce", action="store_false",
                        help="the fake writes each streamed token separately (more fake CPU)")
    parser.add_argument("--no-doc", dest="doc", action="store_false",
                        help="do not append the results to docs/performance.md")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="profile the gateway with py-spy during each gateway phase, into DIR "
                             "(skews the numbers; py-spy must be installed)")
    parser.add_argument("--py-spy-format", choices=("flamegraph", "raw", "speedscope"), default="flamegraph")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for inspection")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    c_lat, c_thr = 1, args.connections
    # Ctrl-C must stop the bench even when it was started with SIGINT ignored (e.g. `make bench &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="nz-bench-"))
    stack = Stack(workdir=workdir, coalesce=args.coalesce, workers=args.workers)
    started = time.monotonic()
    try:
        with _sigterm_raises():
            if args.py_spy is not None:
                args.py_spy.mkdir(parents=True, exist_ok=True)
            loadgen = LoadGenerator(args.loadgen, workdir, stack.procs)
            print(f"starting Redis, PostgreSQL, fake Ollama, bare proxy and gateway (temp dir {workdir}) ...",
                  flush=True)
            stack.start()
            stack.check()
            bench = Bench(stack, loadgen, args.py_spy, args.py_spy_format)
            gateway = stack.targets["gateway"]
            memory = {"start": gateway.rss_kib()}
            print(f"ready after {time.monotonic() - started:.1f} s; load generator: {loadgen.describe()}",
                  flush=True)

            # At the throughput concurrency, so connection pools have grown before anything is measured
            # (growing them shows up as connect() CPU).
            print(f"warm-up (concurrency {c_thr}, {args.warmup:g} s per target)", flush=True)
            share = max(args.warmup / 4, 0.5)
            for target in stack.targets:
                bench.load("chat", target, c_thr, share * 2)
                bench.load("chat_stream", target, c_thr, share)
                bench.load("embeddings", target, c_thr, share)
            memory["warm"] = gateway.rss_kib()

            single = [t for t in stack.targets if t in ("direct", "proxy", "gateway")]
            print(f"latency (concurrency {c_lat})", flush=True)
            for target in single:
                bench.phase("chat", target, c_lat, args.latency_duration)
            print(f"throughput (concurrency {c_thr})", flush=True)
            for scenario in SCENARIOS:
                for target in stack.targets:
                    bench.phase(scenario, target, c_thr, args.throughput_duration)
            memory["end"] = gateway.rss_kib()
            soak = bench.soak(args.soak, c_thr) if args.soak else None

            meta = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "loadgen": loadgen.describe(),
                "fake_flags": f"--fast --completion-tokens {COMPLETION_TOKENS}"
                              + (" --coalesce" if args.coalesce else ""),
                "python": platform.python_version(),
                "commit": _commit(),
                "cores": os.cpu_count(),
                "caveat": CAVEAT.format(cores=os.cpu_count()),
                "latency_duration_s": args.latency_duration,
                "throughput_duration_s": args.throughput_duration,
                "throughput_connections": c_thr,
                "workers": args.workers,
                "py_spy": str(args.py_spy) if args.py_spy else None,
                "total_s": round(time.monotonic() - started, 1),
                "gateway_memory_kib": memory,
            }
            print(report(bench, meta, c_lat, c_thr, soak))
            if args.py_spy is not None:
                print(f"NOTE: py-spy was sampling the gateway during its phases (profiles in {args.py_spy}); "
                      "those numbers are skewed by it.\n")
            failed = any(p.load.errors for p in bench.phases)
            if args.doc and args.py_spy is None:
                append_to_doc(markdown(bench, meta, c_lat, c_thr, soak))
                print(f"appended to {DOC.relative_to(REPO)}")
            if args.json is not None:
                args.json.write_text(json.dumps(
                    {"meta": meta, "soak": soak, "phases": [asdict(p) for p in bench.phases],
                     "targets": [{"what": w.strip(" ."), "met": m, "numbers": n}
                                 for w, m, n in targets_check(bench, c_lat, c_thr, args.workers)]},
                    indent=2) + "\n", encoding="utf-8")
                print(f"JSON written to {args.json}")
            return 1 if failed or (soak is not None and not soak["ok"]) else 0
    except (KeyboardInterrupt, _Stop):
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    except Exception:
        for served in stack.targets.values():
            if served.log.is_file() and served.name != "direct":
                print(f"--- {served.name} log (tail) ---\n{tail(served.log)}", file=sys.stderr)
        raise
    finally:
        # A second Ctrl-C must not leave processes behind.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.stop()
            if args.keep:
                print(f"kept {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
