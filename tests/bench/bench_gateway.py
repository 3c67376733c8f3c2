"""Gateway overhead benchmark (`make bench`): the same load straight to the fake Ollama and through
the gateway, so the difference is what the gateway adds.

Not a test (pytest does not collect it). Run: ``.venv/bin/python -m tests.bench.bench_gateway
[--json out.json]``. Everything runs on this machine, on loopback only, and is torn down at the end
(also on Ctrl-C / SIGTERM):

* a private Redis and a private PostgreSQL cluster (initdb + pg_ctl) on free ports, migrated to head;
* one tenant (allow_all_models) and one key with rpm/tpm/concurrency limits at tenant AND key level
  and daily/monthly/total budgets, all far too high to bind, so every admission check still runs;
* the fake Ollama in its own process (``--fast``: no latency, no token delay; ``--coalesce`` by
  default: each stream is sent in one write, which keeps the fake's share of the 2 cores small);
* the gateway in its own process (``neuronetz-gateway serve``, JSON logs to a temp file);
* the load generator in its own process: ``wrk`` with a Lua script, else :mod:`tests.bench.loadgen`.

Phases (each scenario first direct to the fake, then through the gateway, same body, same load):
warm-up; concurrency 1 non-streaming chat for latency; concurrency 64 for requests/s of chat,
streaming chat and embeddings. Gateway CPU per request comes from utime+stime in /proc/<pid>/stat
(all threads) over each gateway phase plus a short settle for its batched audit/ledger writes; RSS
from /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.services import PrivatePostgres, PrivateRedis, free_port

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
CAVEAT = ("All processes share this machine's {cores} core(s): the load generator, the fake Ollama, Redis, "
          "PostgreSQL and the gateway compete for CPU, so requests/s are lower and latencies higher than on "
          "dedicated hardware. Compare gateway vs direct, and runs on one machine, not absolute numbers.")

CHAT_MODEL = "llama3.1:8b"
EMBED_MODEL = "nomic-embed-text:latest"
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
SETTLE_S = 1.0                # after each gateway phase: its batched writers flush (every 0.2 s)

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
# Processes
# --------------------------------------------------------------------------------------------------


class _Stop(Exception):  # noqa: N818 (SIGTERM, turned into an exception so `finally` runs)
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Stop()


def proc_cpu_s(pid: int, children_too: bool = False) -> float:
    """utime+stime of *pid* (all its threads) in seconds; with *children_too*, plus reaped children."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    if children_too:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from the `cpu` line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK  # guest time is already counted in user


def reaped_children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_status_kib(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def tree_cpu_s(pid: int) -> float:
    """CPU of a process and its live children (plus the reaped ones): the postmaster and its backends."""
    total = proc_cpu_s(pid, children_too=True)
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            total += proc_cpu_s(child)
    return total


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout_s: float, what: str) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} does not listen on 127.0.0.1:{port} after {timeout_s}s")


def http_call(port: int, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, timeout_s: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


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
            return first[0].split(" [")[0].strip() if first else "wrk (unknown version)"
        why = "wrk not installed" if self.wrk is None else "--loadgen python"
        return f"python aiohttp load generator (tests.bench.loadgen; {why})"

    def run(self, port: int, path: str, body: dict[str, Any], auth: str | None, connections: int,
            duration_s: float) -> LoadResult:
        payload = json.dumps(body, separators=(",", ":"))
        url = f"http://127.0.0.1:{port}{path}"
        name = uuid.uuid4().hex[:8]
        if self.kind == "wrk":
            script = self.workdir / f"wrk-{name}.lua"
            auth_line = f'wrk.headers["Authorization"] = "Bearer {auth}"' if auth else ""
            script.write_text(WRK_SCRIPT.format(body=payload, auth=auth_line), encoding="utf-8")
            cmd = [str(self.wrk), "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s",
                   "-s", str(script), url]
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
        try:
            out, err = proc.communicate(timeout=duration_s + 60)
        finally:
            stop_process(proc, 5)
            self.procs.remove(proc)
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("BENCH_JSON "):
                return LoadResult.from_raw(json.loads(line[len("BENCH_JSON "):]))
        raise RuntimeError(f"load generator printed no result (exit {proc.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}")


# --------------------------------------------------------------------------------------------------
# The stack under test
# --------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    workdir: Path
    coalesce: bool
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis: SessionRedis | None = None
    postgres: PrivatePostgres | None = None
    fake: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    fake_port: int = 0
    gateway_port: int = 0
    metrics_port: int = 0
    secret: str = ""
    gateway_log: Path = Path()
    fake_log: Path = Path()

    def start(self) -> None:
        self.redis = SessionRedis()
        self.redis.start()
        self.postgres = PrivatePostgres()
        self.postgres.init()
        self.postgres.start()
        _migrate(self.postgres.url)
        self.secret = asyncio.run(_provision(self.postgres.url, self.redis.url))

        self.fake_port = free_port()
        self.fake_log = self.workdir / "fake-ollama.log"
        cmd = [sys.executable, "-m", "tests.fake_ollama", "--port", str(self.fake_port), "--fast",
               "--max-log", "1000"]
        if self.coalesce:
            cmd.append("--coalesce")
        with self.fake_log.open("wb") as log:
            self.fake = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.procs.append(self.fake)
        wait_port(self.fake_port, self.fake, 20, "fake Ollama")

        self.gateway_port, self.metrics_port = free_port(), free_port()
        spool = self.workdir / "spool"
        spool.mkdir()
        self.gateway_log = self.workdir / "gateway.log"
        env = {**os.environ, "DATABASE_URL": self.postgres.url, "REDIS_URL": self.redis.url,
               "OLLAMA_BASE_URL": f"http://127.0.0.1:{self.fake_port}", "GATEWAY_HOST": "127.0.0.1",
               "GATEWAY_PORT": str(self.gateway_port), "METRICS_PORT": str(self.metrics_port),
               "AUDIT_SPOOL_DIR": str(spool), "LOG_FORMAT": "json"}
        with self.gateway_log.open("wb") as log:
            self.gateway = subprocess.Popen(
                [str(Path(sys.executable).with_name("neuronetz-gateway")), "serve"], cwd=REPO, env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(self.gateway)
        self._wait_ready(60)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            assert self.gateway is not None
            if self.gateway.poll() is not None:
                raise RuntimeError(f"the gateway exited with code {self.gateway.returncode}:\n"
                                   f"{tail(self.gateway_log)}")
            try:
                status, body = http_call(self.gateway_port, "GET", "/readyz", timeout_s=3)
                if status == 200:
                    return
                last = f"{status} {body[:200]!r}"
            except OSError as exc:
                last = type(exc).__name__
            time.sleep(0.1)
        raise RuntimeError(f"the gateway is not ready after {timeout_s}s ({last}):\n{tail(self.gateway_log)}")

    def check(self) -> None:
        """One request of each scenario through the gateway must succeed with the expected shape."""
        headers = {"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"}
        for name, (path, body) in SCENARIOS.items():
            deadline = time.monotonic() + 20
            while True:
                status, raw = http_call(self.gateway_port, "POST", path, json.dumps(body).encode(), headers)
                if status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)  # model discovery may not have filled yet
            if status != 200:
                raise RuntimeError(f"{name}: the gateway answered {status}: {raw[:300]!r}")
            if name == "chat_stream":
                ok = raw.rstrip().endswith(b"data: [DONE]")
            elif name == "chat":
                ok = bool(json.loads(raw)["choices"][0]["message"]["content"])
            else:
                ok = len(json.loads(raw)["data"][0]["embedding"]) > 0
            if not ok:
                raise RuntimeError(f"{name}: unexpected answer through the gateway: {raw[:300]!r}")

    def assert_alive(self) -> None:
        """A service that died mid-run makes every later number meaningless: stop with its name."""
        for name, proc in (("gateway", self.gateway), ("fake Ollama", self.fake),
                           ("redis-server", self.redis.proc if self.redis else None)):
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
        assert self.gateway is not None and self.fake is not None
        assert self.redis is not None and self.redis.proc is not None
        return {"gateway": proc_cpu_s(self.gateway.pid), "fake": proc_cpu_s(self.fake.pid),
                "redis": proc_cpu_s(self.redis.proc.pid), "postgres": tree_cpu_s(self.postgres_pid()),
                "loadgen": reaped_children_cpu_s(), "machine_busy": machine_busy_s()}

    def memory(self) -> dict[str, int]:
        assert self.gateway is not None
        return {"rss_kib": proc_status_kib(self.gateway.pid, "VmRSS"),
                "peak_rss_kib": proc_status_kib(self.gateway.pid, "VmHWM")}

    def stop(self) -> None:
        for proc in list(reversed(self.procs)):
            with contextlib.suppress(Exception):
                stop_process(proc)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                self.postgres.destroy()


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
# Phases and report
# --------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    scenario: str
    target: str            # "direct" (fake Ollama) or "gateway"
    connections: int
    load: LoadResult
    cpu_ms_per_request: dict[str, float]   # per process, over the phase (+ settle for gateway phases)
    gateway_cpu_util: float                # gateway CPU seconds / wall seconds (1.0 = one core busy)
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

    def _port(self, target: str) -> int:
        return self.stack.gateway_port if target == "gateway" else self.stack.fake_port

    def load(self, scenario: str, target: str, connections: int, duration_s: float) -> LoadResult:
        path, body = SCENARIOS[scenario]
        auth = self.stack.secret if target == "gateway" else None
        return self.loadgen.run(self._port(target), path, body, auth, connections, duration_s)

    def phase(self, scenario: str, target: str, connections: int, duration_s: float) -> Phase:
        label = f"{scenario}/{target}/c{connections}"
        print(f"  {label:<32} {duration_s:g} s ...", end="", flush=True)
        spy = self._start_py_spy(label, duration_s) if target == "gateway" else None
        before, t0 = self.stack.cpu_snapshot(), time.monotonic()
        load = self.load(scenario, target, connections, duration_s)
        if target == "gateway":
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
        ours = sum(delta[name] for name in ("gateway", "fake", "redis", "postgres", "loadgen"))
        cpu = {name: round(delta[name] * 1000 / n, 3)
               for name in ("gateway", "fake", "redis", "postgres", "loadgen")}
        result = Phase(scenario, target, connections, load, cpu,
                       gateway_cpu_util=round(delta["gateway"] / wall, 3),
                       machine_busy_cores=round(delta["machine_busy"] / wall, 3),
                       foreign_busy_cores=round(max(0.0, delta["machine_busy"] - ours) / wall, 3))
        self.phases.append(result)
        errors = f"  errors={load.errors}" if load.errors else ""
        print(f" {load.requests:>7} req  {load.rps:>8.1f} req/s  p50 {load.p50_ms:.3f} ms  "
              f"p99 {load.p99_ms:.3f} ms  (other load {result.foreign_busy_cores:.2f} cores){errors}",
              flush=True)
        return result

    def _start_py_spy(self, label: str, duration_s: float) -> subprocess.Popen[bytes] | None:
        if self.py_spy_dir is None:
            return None
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise RuntimeError("--py-spy needs py-spy (pip install py-spy)")
        ext = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[self.py_spy_format]
        out = self.py_spy_dir / f"{label.replace('/', '-')}.{ext}"
        assert self.stack.gateway is not None
        proc = subprocess.Popen(
            [exe, "record", "-p", str(self.stack.gateway.pid), "-o", str(out), "-f", self.py_spy_format,
             "-r", "100", "-d", str(int(duration_s + SETTLE_S))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.stack.procs.append(proc)
        time.sleep(0.3)
        return proc

    def find(self, scenario: str, target: str, connections: int) -> Phase:
        return next(p for p in self.phases
                    if (p.scenario, p.target, p.connections) == (scenario, target, connections))


def _fmt_kib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def report(bench: Bench, meta: dict[str, Any], memory: dict[str, dict[str, int]], c_lat: int,
           c_thr: int) -> str:
    lines = [
        "",
        "=" * 100,
        "neuronetz-gateway overhead benchmark",
        f"load generator: {meta['loadgen']};  fake Ollama: {meta['fake_flags']};  "
        f"python {meta['python']};  commit {meta['commit']}",
        "key: tenant+key rpm/tpm/concurrent limits and daily/monthly/total budgets set (never binding); "
        "prompt log off",
        "CAVEAT: " + meta["caveat"],
        "=" * 100,
        "",
        f"Added latency, concurrency {c_lat}, POST /v1/chat/completions (non-streaming), "
        f"{meta['latency_duration_s']:g} s each",
        f"  {'':<10}{'direct':>12}{'gateway':>12}{'added':>12}",
    ]
    direct, gw = bench.find("chat", "direct", c_lat), bench.find("chat", "gateway", c_lat)
    for label, attr in (("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"),
                        ("mean ms", "mean_ms")):
        d, g = getattr(direct.load, attr), getattr(gw.load, attr)
        lines.append(f"  {label:<10}{d:>12.3f}{g:>12.3f}{g - d:>+12.3f}")
    lines.append(f"  {'requests':<10}{direct.load.requests:>12}{gw.load.requests:>12}")
    lines.append(f"  {'other load':<10}{direct.foreign_busy_cores:>12.2f}{gw.foreign_busy_cores:>12.2f}"
                 "   (cores used by processes outside this bench)")
    lines.append(f"  gateway CPU {gw.cpu_ms_per_request['gateway']:.3f} ms/request at concurrency {c_lat}")
    lines += [
        "",
        f"Throughput, concurrency {c_thr}, {meta['throughput_duration_s']:g} s each",
        f"  {'scenario':<13}{'direct rps':>11}{'gw rps':>9}{'gw/dir':>8}{'gw p50':>9}{'gw p99':>9}"
        f"{'gw CPU':>9}{'gw CPU':>8}{'redis':>8}{'pg':>8}{'fake':>8}{'other':>7}  errors",
        f"  {'':<13}{'':>11}{'':>9}{'':>8}{'ms':>9}{'ms':>9}{'ms/req':>9}{'%core':>8}"
        f"{'ms/req':>8}{'ms/req':>8}{'ms/req':>8}{'cores':>7}",
    ]
    for scenario in SCENARIOS:
        d, g = bench.find(scenario, "direct", c_thr), bench.find(scenario, "gateway", c_thr)
        ratio = g.load.rps / d.load.rps if d.load.rps else 0.0
        cpu = g.cpu_ms_per_request
        errors = {k: v for k, v in {"direct": d.load.errors, "gateway": g.load.errors}.items() if v}
        lines.append(
            f"  {scenario:<13}{d.load.rps:>11.1f}{g.load.rps:>9.1f}{ratio:>8.2f}{g.load.p50_ms:>9.2f}"
            f"{g.load.p99_ms:>9.2f}{cpu['gateway']:>9.3f}{g.gateway_cpu_util * 100:>7.0f}%"
            f"{cpu['redis']:>8.3f}{cpu['postgres']:>8.3f}{cpu['fake']:>8.3f}"
            f"{max(d.foreign_busy_cores, g.foreign_busy_cores):>7.2f}  {errors or '-'}")
    lines.append("  (direct-phase fake CPU ms/req: " + ", ".join(
        f"{s} {bench.find(s, 'direct', c_thr).cpu_ms_per_request['fake']:.3f}" for s in SCENARIOS) + ")")
    lines += [
        "",
        "Gateway memory (VmRSS; peak = VmHWM)",
        f"  after start {_fmt_kib(memory['start']['rss_kib'])},  after warm-up "
        f"{_fmt_kib(memory['warm']['rss_kib'])},  after all load {_fmt_kib(memory['end']['rss_kib'])}"
        f"  (peak {_fmt_kib(memory['end']['peak_rss_kib'])})",
        "",
        "gw CPU ms/req: gateway process utime+stime (all threads) over the phase plus a "
        f"{SETTLE_S:g} s settle, / completed requests.",
        "redis/pg/fake ms/req: the same for those processes during the gateway phase "
        "(pg = postmaster + backends).",
        "other cores: CPU used on the machine by processes outside this bench (max of the two phases).",
        "",
    ]
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
                                     description="Measure the gateway's overhead over the fake Ollama.")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--latency-duration", type=float, default=10.0,
                        help="seconds per concurrency-1 phase (default 10)")
    parser.add_argument("--throughput-duration", type=float, default=8.0,
                        help="seconds per concurrency-64 phase (default 8)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of warm-up (default 4)")
    parser.add_argument("--connections", type=int, default=64, help="throughput concurrency (default 64)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="auto = wrk when installed, else the python generator")
    parser.add_argument("--no-coalesce", dest="coalesce", action="store_false",
                        help="the fake writes each streamed token separately (more fake CPU)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="profile the gateway with py-spy during each gateway phase, into DIR "
                             "(skews the numbers; py-spy must be installed)")
    parser.add_argument("--py-spy-format", choices=("flamegraph", "raw", "speedscope"), default="flamegraph")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for inspection")
    args = parser.parse_args(argv)

    c_lat, c_thr = 1, args.connections
    # Ctrl-C must stop the bench even when it was started with SIGINT ignored (e.g. `make bench &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="nz-bench-"))
    stack = Stack(workdir=workdir, coalesce=args.coalesce)
    started = time.monotonic()
    try:
        with _sigterm_raises():
            if args.py_spy is not None:
                args.py_spy.mkdir(parents=True, exist_ok=True)
            loadgen = LoadGenerator(args.loadgen, workdir, stack.procs)
            print(f"starting Redis, PostgreSQL, fake Ollama and the gateway (temp dir {workdir}) ...",
                  flush=True)
            stack.start()
            stack.check()
            bench = Bench(stack, loadgen, args.py_spy, args.py_spy_format)
            memory = {"start": stack.memory()}
            print(f"ready after {time.monotonic() - started:.1f} s; load generator: {loadgen.describe()}",
                  flush=True)

            # At the throughput concurrency, so the gateway's upstream, Redis and PostgreSQL connection
            # pools have grown before anything is measured (growing them shows up as connect() CPU).
            print(f"warm-up (concurrency {c_thr}, {args.warmup:g} s)", flush=True)
            share = max(args.warmup / 4, 0.5)
            bench.load("chat", "gateway", c_thr, share * 2)
            bench.load("chat_stream", "gateway", c_thr, share)
            bench.load("embeddings", "gateway", c_thr, share)
            bench.load("chat", "direct", c_thr, share)
            memory["warm"] = stack.memory()

            print(f"latency (concurrency {c_lat})", flush=True)
            for target in ("direct", "gateway"):
                bench.phase("chat", target, c_lat, args.latency_duration)
            print(f"throughput (concurrency {c_thr})", flush=True)
            for scenario in SCENARIOS:
                for target in ("direct", "gateway"):
                    bench.phase(scenario, target, c_thr, args.throughput_duration)
            memory["end"] = stack.memory()

            meta = {
                "loadgen": loadgen.describe(),
                "fake_flags": "--fast" + (" --coalesce" if args.coalesce else ""),
                "python": platform.python_version(),
                "commit": _commit(),
                "cores": os.cpu_count(),
                "caveat": CAVEAT.format(cores=os.cpu_count()),
                "latency_duration_s": args.latency_duration,
                "throughput_duration_s": args.throughput_duration,
                "throughput_connections": c_thr,
                "py_spy": str(args.py_spy) if args.py_spy else None,
                "total_s": round(time.monotonic() - started, 1),
            }
            print(report(bench, meta, memory, c_lat, c_thr))
            if args.py_spy is not None:
                print(f"NOTE: py-spy was sampling the gateway during its phases (profiles in {args.py_spy}); "
                      "those numbers are skewed by it.\n")
            gw, direct = bench.find("chat", "gateway", c_lat).load, bench.find("chat", "direct", c_lat).load
            summary = {
                "added_latency_ms": {"p50": round(gw.p50_ms - direct.p50_ms, 3),
                                     "p99": round(gw.p99_ms - direct.p99_ms, 3)},
                "rps": {s: {t: bench.find(s, t, c_thr).load.rps for t in ("direct", "gateway")}
                        for s in SCENARIOS},
                "gateway_cpu_ms_per_request": {
                    f"{p.scenario}/c{p.connections}": p.cpu_ms_per_request["gateway"]
                    for p in bench.phases if p.target == "gateway"},
                "gateway_memory_kib": memory,
            }
            failed = any(p.load.errors for p in bench.phases)
            if args.json is not None:
                args.json.write_text(json.dumps(
                    {"meta": meta, "summary": summary, "phases": [asdict(p) for p in bench.phases]},
                    indent=2) + "\n", encoding="utf-8")
                print(f"JSON written to {args.json}")
            return 1 if failed else 0
    except (KeyboardInterrupt, _Stop):
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    except Exception:
        if stack.gateway_log.is_file():
            print(f"--- gateway log (tail) ---\n{tail(stack.gateway_log)}", file=sys.stderr)
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
