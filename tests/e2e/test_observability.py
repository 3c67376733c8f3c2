"""Observability end to end (SPEC §8.1 to §8.3): metrics on a loopback-only listener with bounded labels,
one JSON log event per request and no secrets in any log line, and the opt-in prompt log with its
retention sweep. Metrics and logs are checked on a real `neuronetz-gateway serve` subprocess."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import psycopg
import pytest
import redis
from psycopg_pool import AsyncConnectionPool

from adapters.postgres.audit import sweep_prompt_log
from entrypoints.app import open_admin
from entrypoints.settings import Settings
from gateway_core.limits import Limits
from gateway_core.models import ALL_SCOPES
from tests.e2e.harness import Gateway, gateway_settings, running_gateway
from tests.fake_ollama import FakeOllama, completion_text
from tests.services import free_port

CLI = str(Path(sys.executable).with_name("neuronetz-gateway"))
REPO = Path(__file__).resolve().parents[2]
FAKE_MODELS = ("llama3.1:8b", "qwen3:8b", "nomic-embed-text:latest")
CHAT_MODEL = "llama3.1:8b"
EMBED_MODEL = "nomic-embed-text:latest"
KEY_ALPHABET = string.ascii_letters + string.digits + "-_"
FULL_KEY_RE = re.compile(r"nz_[A-Za-z0-9_-]{43}")
# `table` labels the writer series (gateway_rows_rejected_total, …): a fixed set of table names.
# `backend` (an index in OLLAMA_BASE_URL, never a URL) and `outcome` label upstream series only.
ALLOWED_LABELS = {"tenant", "model", "status", "direction", "le", "table", "backend", "outcome"}


# ------------------------------------------------------------------------------------------------
# A gateway as the operator runs it: `neuronetz-gateway serve`, stdout and stderr into one file
# ------------------------------------------------------------------------------------------------


@attrs.define
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    metrics_url: str
    metrics_port: int
    log_path: Path
    settings: Settings  # the same DATABASE_URL / REDIS_URL, for open_admin in the test

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict):
                    out.append(parsed)
        return out


def launch_gateway(database_url: str, redis_url: str, ollama_url: str, workdir: Path,
                   **extra_env: str) -> Served:
    """Start `neuronetz-gateway serve` and wait until its public port answers /healthz."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    log_path = workdir / "gateway.log"
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "OLLAMA_BASE_URL": ollama_url,
           "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "METRICS_PORT": str(metrics_port),
           "AUDIT_SPOOL_DIR": str(workdir / "spool"), "LOG_FORMAT": "json", "LOG_LEVEL": "info",
           "MODEL_DISCOVERY_REFRESH_S": "1", **extra_env}
    with log_path.open("wb") as sink:
        proc = subprocess.Popen([CLI, "serve"], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    settings = gateway_settings(database_url, redis_url, ollama_url, workdir)
    served = Served(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics",
                    metrics_port, log_path, settings)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited early ({proc.returncode}):\n{log_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return served
        except OSError:
            time.sleep(0.05)
    stop_gateway(served)
    raise AssertionError("gateway did not start listening within 20 s")


def stop_gateway(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(20)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait(5)


def flush_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


async def new_key(settings: Settings, *, models: tuple[str, ...] = (CHAT_MODEL, EMBED_MODEL),
                  prompt_log: bool = False, retention_days: int | None = None) -> tuple[str, str, str, int]:
    """A fresh tenant and key; returns (secret, prefix, tenant name, key id)."""
    tenant = f"obs-{uuid.uuid4().hex[:10]}"
    async with open_admin(settings, "e2e-observability") as admin:
        await admin.create_tenant(tenant, Limits(100_000, 100_000_000, 1000))
        await admin.set_models(tenant, models, False)
        new, record = await admin.create_key(tenant, f"k-{uuid.uuid4().hex[:6]}", ALL_SCOPES, None)
        if prompt_log:
            await admin.set_prompt_log(new.prefix, True, retention_days)
    return new.secret, new.prefix, tenant, int(record.id)


def bearer(secret: str, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {secret}"}
    if request_id:
        headers["X-Request-Id"] = request_id
    return headers


def unknown_key() -> str:
    return "nz_" + "".join(secrets.choice(KEY_ALPHABET) for _ in range(43))


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], **extra}


async def call(http: aiohttp.ClientSession, base: str, path: str, body: dict[str, Any] | None,
               headers: dict[str, str]) -> tuple[int, bytes]:
    method = http.post if body is not None else http.get
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    async with method(base + path, **kwargs) as resp:
        return resp.status, await resp.read()


async def wait_until_models_resolve(http: aiohttp.ClientSession, base: str, secret: str) -> None:
    deadline = time.monotonic() + 15
    status = 0
    while time.monotonic() < deadline:
        status, _ = await call(http, base, "/v1/chat/completions", chat_body("warm up"), bearer(secret))
        if status == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"discovery never made {CHAT_MODEL} callable (last status {status})")


# ------------------------------------------------------------------------------------------------
# Prometheus text format
# ------------------------------------------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@attrs.frozen
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


def parse_metrics(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = tuple(sorted(_LABEL_RE.findall(match.group(2) or "")))
        samples.append(Sample(match.group(1), labels, float(match.group(3))))
    return samples


async def scrape(http: aiohttp.ClientSession, served: Served) -> tuple[str, list[Sample]]:
    """The metrics once the requests answered so far are all in them: a complete answer goes out
    before its settlement ends, and the request is counted just after that (docs/performance.md)."""
    async def once() -> tuple[str, list[Sample]]:
        async with http.get(served.metrics_url, headers={"Accept": "text/plain"}) as resp:
            assert resp.status == 200
            text = await resp.text()
        return text, parse_metrics(text)

    def counted(samples: list[Sample]) -> list[tuple[Any, float]]:
        return sorted((s.labels, s.value) for s in samples if s.name == "gateway_requests_total")

    text, samples = await once()
    for _ in range(40):
        await asyncio.sleep(0.05)
        again_text, again = await once()
        if counted(again) == counted(samples):
            break
        text, samples = again_text, again
    return text, samples


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples of *name* whose labels include *labels*."""
    return sum(s.value for s in samples
               if s.name == name and all(s.label(k) == v for k, v in labels.items()))


def label_values(samples: list[Sample]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for sample in samples:
        if sample.name.startswith("gateway_"):
            for name, val in sample.labels:
                out.setdefault(name, set()).add(val)
    return out


# ------------------------------------------------------------------------------------------------
# One gateway subprocess (and a fake Ollama subprocess) for the metrics and request-log tests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def served(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("observed-gateway")
    fake_port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_ollama", "--port", str(fake_port), "--fast",
         "--models", ",".join(FAKE_MODELS)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    gateway: Served | None = None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", fake_port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and fake.poll() is None, "fake Ollama did not start"
                time.sleep(0.05)
        flush_redis(redis_url)  # no discovery cache or counters left over from other tests
        gateway = launch_gateway(database_url, redis_url, f"http://127.0.0.1:{fake_port}", workdir)
        yield gateway
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        fake.terminate()
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
            fake.wait(5)


def _host_addresses() -> list[str]:
    """This machine's non-loopback addresses (`hostname -I`), if it has any."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    found = set(out.split())
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    return sorted(a for a in found if not a.startswith("127.") and a not in ("::1", "0.0.0.0", "::"))


def _connects(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect((address, port))
            return True
        except OSError:
            return False


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of the sockets listening on *port* (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].rsplit(":", 1)
                if int(hex_port, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                    found.append(address)
    return found


class TestMetrics:
    async def test_requests_tokens_and_durations_are_labelled_by_tenant_and_model_never_by_key(
        self, served: Served
    ) -> None:
        secret, prefix, tenant, key_id = await new_key(served.settings)
        tokens_in = tokens_out = 0
        async with aiohttp.ClientSession() as http:
            await wait_until_models_resolve(http, served.url, secret)
            _, before = await scrape(http, served)
            chats = [("/v1/chat/completions", chat_body("count me", max_tokens=5)),
                     ("/api/chat", {**chat_body("count me too"), "stream": False}),
                     ("/api/generate", {"model": CHAT_MODEL, "prompt": "and me", "stream": False})]
            for path, body in chats:
                status, raw = await call(http, served.url, path, body, bearer(secret))
                assert status == 200, raw
                got = json.loads(raw)
                usage = got.get("usage")
                tokens_in += usage["prompt_tokens"] if usage else got["prompt_eval_count"]
                tokens_out += usage["completion_tokens"] if usage else got["eval_count"]
            embed = {"model": "nomic-embed-text", "input": ["one two three"]}
            status, raw = await call(http, served.url, "/v1/embeddings", embed, bearer(secret))
            assert status == 200, raw
            embed_in = json.loads(raw)["usage"]["prompt_tokens"]
            status, _ = await call(http, served.url, "/v1/chat/completions",
                                   {**chat_body("x"), "model": "qwen3:8b"}, bearer(secret))
            assert status == 403  # outside this tenant's set
            text, after = await scrape(http, served)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        # The warm-up request also landed in this tenant's series: count from the first scrape.
        chat = {"tenant": tenant, "model": CHAT_MODEL}
        assert delta("gateway_requests_total", status="200", **chat) == 3
        assert delta("gateway_requests_total", tenant=tenant, model=EMBED_MODEL, status="200") == 1
        assert delta("gateway_requests_total", tenant=tenant, status="403") == 1
        assert delta("gateway_tokens_total", direction="in", **chat) == tokens_in
        assert delta("gateway_tokens_total", direction="out", **chat) == tokens_out
        assert delta("gateway_tokens_total", direction="in", tenant=tenant, model=EMBED_MODEL) == embed_in
        assert delta("gateway_request_duration_seconds_count", **chat) == 3
        assert value(after, "gateway_request_duration_seconds_sum", **chat) > 0
        assert any(s.name == "gateway_request_duration_seconds_bucket" and s.label("le") == "+Inf"
                   and s.label("tenant") == tenant for s in after)
        mine = [s for s in after if s.label("tenant") == tenant]
        assert {s.label("model") for s in mine} == {CHAT_MODEL, EMBED_MODEL, "-"}
        # Never labelled by key: no key label, no prefix, no key id, no secret anywhere.
        names = {n for s in after if s.name.startswith("gateway_") for n, _ in s.labels}
        assert names <= ALLOWED_LABELS, names
        assert prefix not in text and secret not in text and secret[3:12] not in text
        assert all(v != str(key_id) for s in mine for n, v in s.labels if n != "le" and n != "status")

    async def test_the_public_port_has_no_metrics(self, served: Served) -> None:
        async with aiohttp.ClientSession() as http:
            for method in ("GET", "HEAD", "POST"):
                async with http.request(method, served.url + "/metrics") as resp:
                    assert resp.status == 404, method
                    body = await resp.read()
                    if method != "HEAD":
                        error = json.loads(body)["error"]
                        assert set(error) == {"message", "type", "param", "code"}, error
                        assert error["code"] == "not_found" and error["param"] is None
                        assert isinstance(error["message"], str) and isinstance(error["type"], str)
                        assert b"gateway_requests_total" not in body
            async with http.get(served.metrics_url) as resp:
                assert resp.status == 200 and "gateway_requests_total" in await resp.text()

    def test_the_metrics_listener_accepts_on_loopback_only(self, served: Served) -> None:
        assert _connects("127.0.0.1", served.metrics_port)
        listening = _listening_addresses(served.metrics_port)
        # /proc/net/tcp writes 127.0.0.1 as 0100007F; 0.0.0.0 or :: would mean every interface.
        assert listening == ["0100007F"], listening
        addresses = _host_addresses()
        checked = []
        for address in addresses:
            # Control: something bound to all interfaces is reachable at this address, so a refusal
            # below means the metrics listener is not bound to it, not that the address is dead.
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as control:
                control.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                control.listen(1)
                if not _connects(address, control.getsockname()[1]):
                    continue
            assert not _connects(address, served.metrics_port), f"/metrics answers on {address}"
            checked.append(address)
        print(f"\nhost addresses={addresses} checked={checked} listening={listening}")

    async def test_a_thousand_random_model_names_add_no_label_values(self, served: Served) -> None:
        secret, _, tenant, _ = await new_key(served.settings)
        routes = [("/v1/chat/completions", "chat"), ("/api/chat", "chat"), ("/api/generate", "gen"),
                  ("/v1/embeddings", "embed"), ("/api/embed", "embed"), ("/v1/completions", "gen"),
                  ("/v1/models/", "get")]

        def request_for(i: int) -> tuple[str, dict[str, Any] | None]:
            name = f"rnd-{uuid.uuid4().hex}:{uuid.uuid4().hex[:8]}"
            path, kind = routes[i % len(routes)]
            if kind == "chat":
                return path, {**chat_body("hi"), "model": name}
            if kind == "gen":
                return path, {"model": name, "prompt": "hi"}
            if kind == "embed":
                return path, {"model": name, "input": "hi"}
            return path + name, None

        sent: list[str] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
            await wait_until_models_resolve(http, served.url, secret)
            for i in range(len(routes)):  # every kind of refusal once, so its series exists
                path, body = request_for(i)
                status, _ = await call(http, served.url, path, body, bearer(secret))
                assert status in (403, 404)
            _, before = await scrape(http, served)
            gate = asyncio.Semaphore(32)

            async def one(i: int) -> int:
                path, body = request_for(i)
                sent.append(path.rsplit("/", 1)[-1] if body is None else body["model"])
                async with gate:
                    return (await call(http, served.url, path, body, bearer(secret)))[0]

            statuses = await asyncio.gather(*(one(i) for i in range(1000)))
            text, after = await scrape(http, served)
        assert set(statuses) <= {403, 404}, set(statuses)
        assert value(after, "gateway_requests_total", tenant=tenant, model="-") - value(
            before, "gateway_requests_total", tenant=tenant, model="-") == 1000
        assert label_values(after) == label_values(before)
        series = {(s.name, s.labels) for s in after if s.name.startswith("gateway_")}
        assert series == {(s.name, s.labels) for s in before if s.name.startswith("gateway_")}
        assert not any(name in text for name in sent)
        assert "rnd-" not in text
        assert label_values(after)["model"] <= {*FAKE_MODELS, "-"}

    async def test_circuit_state_and_discovery_freshness_are_gauges(self, served: Served) -> None:
        secret, _, _, _ = await new_key(served.settings)
        async with aiohttp.ClientSession() as http:
            await wait_until_models_resolve(http, served.url, secret)
            text, samples = await scrape(http, served)
        for name in ("gateway_circuit_state", "gateway_discovery_age_seconds", "gateway_discovered_models"):
            assert f"# TYPE {name} gauge" in text
        assert value(samples, "gateway_circuit_state") == 0  # closed
        # Upstream series name a backend by its index in OLLAMA_BASE_URL, never by its URL.
        assert {s.label("backend") for s in samples if s.name == "gateway_circuit_state"} == {"0"}
        assert value(samples, "gateway_upstream_requests_total", backend="0", outcome="ok") >= 1
        assert all(s.label("backend") is None for s in samples
                   if s.name.startswith(("gateway_requests", "gateway_tokens")))
        assert value(samples, "gateway_discovered_models") == len(FAKE_MODELS)
        age = [s.value for s in samples if s.name == "gateway_discovery_age_seconds"]
        assert len(age) == 1 and 0 <= age[0] < 10, age  # refreshed every second


class TestRequestLog:
    async def test_one_json_event_per_request_with_the_documented_fields(self, served: Served) -> None:
        secret, prefix, tenant, _ = await new_key(served.settings)
        run = uuid.uuid4().hex[:12]
        async with aiohttp.ClientSession() as http:
            await wait_until_models_resolve(http, served.url, secret)
            cases = [
                ("chat", "/v1/chat/completions", chat_body("hello"), secret),
                ("sse", "/v1/chat/completions",
                 chat_body("hello", stream=True, stream_options={"include_usage": True}), secret),
                ("ndjson", "/api/chat", chat_body("hello"), secret),
                ("generate", "/api/generate", {"model": CHAT_MODEL, "prompt": "hello", "stream": False},
                 secret),
                ("embed", "/api/embed", {"model": "nomic-embed-text", "input": "hello"}, secret),
                ("denied", "/v1/chat/completions", {**chat_body("hello"), "model": "qwen3:8b"}, secret),
                ("unauth", "/v1/chat/completions", chat_body("hello"), unknown_key()),
            ]
            replies: dict[str, tuple[int, bytes]] = {}
            for name, path, body, key in cases:
                replies[name] = await call(http, served.url, path, body, bearer(key, f"obs-{run}-{name}"))
        assert {n: s for n, (s, _) in replies.items()} == {"chat": 200, "sse": 200, "ndjson": 200,
                                                           "generate": 200, "embed": 200, "denied": 403,
                                                           "unauth": 401}
        wanted = {f"obs-{run}-{name}" for name, *_ in cases}
        deadline = time.monotonic() + 5
        while True:
            events = [e for e in served.events() if e.get("request_id") in wanted]
            if {e["request_id"] for e in events} == wanted or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        by_id: dict[str, list[dict[str, Any]]] = {}
        for entry in events:
            by_id.setdefault(entry["request_id"], []).append(entry)
        assert set(by_id) == wanted
        assert all(len(v) == 1 for v in by_id.values()), by_id  # one event per request, not per stage

        def event(name: str) -> dict[str, Any]:
            return by_id[f"obs-{run}-{name}"][0]

        for name in ("chat", "sse", "ndjson", "generate", "embed", "denied", "unauth"):
            got = event(name)
            assert {"request_id", "tenant", "key_prefix", "model", "status", "latency_ms", "tokens_in",
                    "tokens_out"} <= set(got), got
            assert got["status"] == replies[name][0]
            assert isinstance(got["latency_ms"], int | float) and got["latency_ms"] >= 0
            assert isinstance(got["tokens_in"], int) and isinstance(got["tokens_out"], int)
            assert got.get("level") == "info" and "timestamp" in got
        for name in ("chat", "sse", "ndjson", "generate", "embed", "denied"):
            assert event(name)["tenant"] == tenant and event(name)["key_prefix"] == prefix
        assert event("unauth")["key_prefix"] is None and event("unauth")["tenant"] is None
        assert event("chat")["model"] == CHAT_MODEL and event("embed")["model"] == EMBED_MODEL
        usage = json.loads(replies["chat"][1])["usage"]
        assert (event("chat")["tokens_in"], event("chat")["tokens_out"]) == (
            usage["prompt_tokens"], usage["completion_tokens"])
        generated = json.loads(replies["generate"][1])
        assert (event("generate")["tokens_in"], event("generate")["tokens_out"]) == (
            generated["prompt_eval_count"], generated["eval_count"])
        last = json.loads(replies["ndjson"][1].splitlines()[-1])
        assert (event("ndjson")["tokens_in"], event("ndjson")["tokens_out"]) == (
            last["prompt_eval_count"], last["eval_count"])
        assert event("sse")["tokens_out"] > 0 and event("embed")["tokens_in"] > 0
        assert event("denied")["tokens_in"] == event("denied")["tokens_out"] == 0


    async def test_with_log_format_json_every_output_line_is_a_json_object(self, served: Served) -> None:
        secret, _, _, _ = await new_key(served.settings)
        async with aiohttp.ClientSession() as http:
            await wait_until_models_resolve(http, served.url, secret)
        lines = served.log_lines()
        assert lines
        not_json = []
        for line in lines:
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                not_json.append(line)
        # A log shipper parsing JSON lines chokes on anything else (SPEC §8.1: JSON in production).
        assert not not_json, not_json[:5]


# ------------------------------------------------------------------------------------------------
# Secrets never logged
# ------------------------------------------------------------------------------------------------


async def raw_request(port: int, head: str, body: bytes = b"") -> bytes:
    """Bytes no HTTP client library would send: malformed header lines."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
async def observed(database_url: str, redis_url: str, fake: FakeOllama, tmp_path: Path
                   ) -> AsyncIterator[Served]:
    flush_redis(redis_url)
    # In a thread: the starting gateway asks the fake (which runs on this loop) for its models.
    gateway = await asyncio.to_thread(launch_gateway, database_url, redis_url, fake.url, tmp_path / "gw",
                                      UPSTREAM_TIMEOUT_S="5", CIRCUIT_RESET_S="2")
    try:
        yield gateway
    finally:
        await asyncio.to_thread(stop_gateway, gateway)


class TestSecretsNeverLogged:
    async def test_no_key_authorization_value_hash_or_prompt_text_reaches_the_log(
        self, observed: Served, fake: FakeOllama
    ) -> None:
        marker = f"PROMPT-MARKER-{uuid.uuid4().hex}"
        secret, prefix, _, _ = await new_key(observed.settings)
        logged, logged_prefix, _, _ = await new_key(observed.settings, prompt_log=True)
        wrong = unknown_key()
        forged = prefix + "".join(secrets.choice(KEY_ALPHABET) for _ in range(34))
        basic = base64.b64encode(f"user:{secret}".encode()).decode()
        authorizations = [f"Bearer {wrong}", f"Bearer {forged}", "Bearer", "Bearer ", f"bearer {secret}x",
                          secret, f"Token {secret}", f"Basic {basic}", f"Bearer {secret} {secret}",
                          f"Bearer  {secret[:-1]}"]
        port = int(observed.url.rsplit(":", 1)[1])
        bodies = [
            ("/v1/chat/completions", chat_body(marker)),
            ("/v1/chat/completions", chat_body(marker, stream=True)),
            ("/v1/completions", {"model": CHAT_MODEL, "prompt": marker}),
            ("/api/chat", chat_body(marker)),
            ("/api/generate", {"model": CHAT_MODEL, "prompt": marker, "stream": False}),
            ("/api/generate", {"model": CHAT_MODEL, "prompt": marker}),
            ("/v1/embeddings", {"model": EMBED_MODEL, "input": [marker]}),
            ("/api/embed", {"model": EMBED_MODEL, "input": marker}),
            ("/api/embeddings", {"model": EMBED_MODEL, "prompt": marker}),
        ]
        async with aiohttp.ClientSession() as http:
            await wait_until_models_resolve(http, observed.url, secret)
            for key in (secret, logged):
                for path, body in bodies:
                    status, raw = await call(http, observed.url, path, body, bearer(key))
                    assert status == 200, (path, raw)
            for authorization in authorizations:
                status, _ = await call(http, observed.url, "/v1/chat/completions", chat_body(marker),
                                       {"Authorization": authorization})
                assert status in (401, 429), authorization
            # Header lines the HTTP parser itself rejects: aiohttp logs those with the bad line quoted.
            payload = json.dumps(chat_body(marker)).encode()
            tail = f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            start = "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            for head in (f"{start}Authorization: Bearer {secret}\x01\r\n{tail}",
                         f"{start}Authorization : Bearer {secret}\r\n{tail}",
                         f"{start}Authorization: Bearer {secret}\n x\r\n{tail}",
                         f"{start}Authorization: Basic {basic}\x7f\r\n{tail}",
                         f"{start}Authorization: Bearer {secret}{'A' * 20000}\r\n{tail}"):
                reply = await raw_request(port, head, payload)
                assert reply.startswith(b"HTTP/1.") and b" 200 " not in reply.split(b"\r\n", 1)[0]
            # A failing upstream, before and during a stream, with both keys.
            fake.fail_mode = "500"
            for key in (secret, logged):
                status, _ = await call(http, observed.url, "/v1/chat/completions", chat_body(marker),
                                       bearer(key))
                assert status == 502
            fake.fail_mode = "midstream"
            for key in (secret, logged):
                for path in ("/v1/chat/completions", "/api/chat"):
                    status, raw = await call(http, observed.url, path, chat_body(marker, stream=True),
                                             bearer(key))
                    assert status == 200 and b"error" in raw, raw
            # Ollama gone: discovery and upstream calls fail, and the gateway logs warnings about it.
            fake.fail_mode = "refuse"
            for key in (secret, logged):
                status, _ = await call(http, observed.url, "/api/generate",
                                       {"model": CHAT_MODEL, "prompt": marker}, bearer(key))
                assert status == 502
            deadline = time.monotonic() + 10
            while not any(e.get("level") == "warning" and str(e.get("logger")).startswith("neuronetz.")
                          for e in observed.events()):
                assert time.monotonic() < deadline, "the gateway logged no warning while Ollama was down"
                await asyncio.sleep(0.2)
            fake.fail_mode = None
        await asyncio.to_thread(stop_gateway, observed)  # shutdown lines belong to the log as well

        text = observed.log_path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        events = observed.events()
        warnings = [e for e in events if e.get("level") == "warning"]
        errors = [e for e in events if e.get("level") == "error"]
        requests = [e for e in events if e.get("event") == "request"]
        print(f"\nlog lines={len(lines)} request events={len(requests)} warnings={len(warnings)}"
              f" errors={len(errors)}")
        assert len(requests) >= 2 * len(bodies) + len(authorizations) and warnings and errors
        assert logged_prefix in text and prefix in text  # prefixes are logged; that is what they are for
        assert not FULL_KEY_RE.search(text), FULL_KEY_RE.search(text)
        for key in (secret, logged, wrong, forged):
            assert key[12:24] not in text, f"part of a key's secret part was logged: {key[:12]}…"
        assert not re.search(r"(?i)bearer", text), [ln for ln in lines if "earer" in ln][:3]
        assert basic not in text and basic[:16] not in text
        for authorization in authorizations:
            if len(authorization) > 12:
                assert authorization not in text
        assert marker not in text and marker[len("PROMPT-MARKER-"):] not in text
        assert "$argon2" not in text and "argon2id$" not in text
        # A parser error may still say that the Authorization line was bad, but never what was in it.
        assert not re.search(r"(?i)authorization['\"]?\s*[:=]\s*(?!\[redacted\])\S", text), [
            ln for ln in lines if "uthoriz" in ln][:3]


class TestGaugesFollowOllama:
    async def test_circuit_and_discovery_gauges_show_ollama_going_away_and_coming_back(
        self, observed: Served, fake: FakeOllama
    ) -> None:
        secret, _, _, _ = await new_key(observed.settings)

        async def gauges(http: aiohttp.ClientSession) -> tuple[float, float, float, float]:
            _, samples = await scrape(http, observed)
            return (value(samples, "gateway_circuit_state"), value(samples, "gateway_discovery_age_seconds"),
                    value(samples, "gateway_discovered_models"),
                    value(samples, "gateway_model_circuits_open", backend="0"))

        async with aiohttp.ClientSession() as http:
            await wait_until_models_resolve(http, observed.url, secret)
            circuit, age, discovered, models_open = await gauges(http)
            assert circuit == 0 and 0 <= age < 3 and discovered == len(fake.models) and models_open == 0
            fake.fail_mode = "500"
            for _ in range(observed.settings.circuit_failure_threshold):
                status, _ = await call(http, observed.url, "/v1/chat/completions", chat_body("x"),
                                       bearer(secret))
                assert status == 502
            # 500s about one model open that model's circuit (CIRCUIT_RESET_S=2 has not passed yet);
            # the backend itself answered, so its circuit stays closed (SPEC §4.10).
            assert (await gauges(http))[::3] == (0, 1)
            fake.fail_mode = "refuse"
            deadline = time.monotonic() + 10
            while (age := (await gauges(http))[1]) < 3:
                assert time.monotonic() < deadline, f"discovery age stayed at {age} while Ollama was down"
                await asyncio.sleep(0.2)
            fake.fail_mode = None
            deadline = time.monotonic() + 10
            while True:
                status, _ = await call(http, observed.url, "/v1/chat/completions", chat_body("x"),
                                       bearer(secret))
                circuit, age, discovered, models_open = await gauges(http)
                if status == 200 and circuit == 0 and models_open == 0 and age < 3:
                    break
                assert time.monotonic() < deadline, (status, circuit, age)
                await asyncio.sleep(0.2)
            assert discovered == len(fake.models)


# ------------------------------------------------------------------------------------------------
# Prompt log (in-process gateway)
# ------------------------------------------------------------------------------------------------


async def _rows(database_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return list(await cur.fetchall())


async def _wait_for_audit(database_url: str, request_ids: list[str]) -> None:
    """Until the observer's rows for *request_ids* are written (the prompt log flushes alongside)."""
    deadline = time.monotonic() + 10
    while True:
        rows = await _rows(database_url, "SELECT DISTINCT request_id FROM gateway.audit_log"
                                         " WHERE request_id = ANY(%s)", request_ids)
        if len(rows) == len(set(request_ids)):
            break
        assert time.monotonic() < deadline, "audit rows never arrived"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.6)  # another flush period of the prompt-log writer


async def _prompt_rows(database_url: str, request_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    rows = await _rows(database_url, "SELECT request_id, key_id, model, prompt, response, created_at,"
                                     " expires_at, now() FROM gateway.prompt_log WHERE request_id = ANY(%s)",
                       request_ids)
    assert len(rows) == len({r[0] for r in rows}), "a request was logged twice"
    return {r[0]: r for r in rows}


PROMPT_CASES = [
    ("chat", "/v1/chat/completions", False),
    ("sse", "/v1/chat/completions", True),
    ("generate", "/api/generate", False),
    ("ndjson-generate", "/api/generate", True),
    ("ndjson-chat", "/api/chat", True),
]


async def _prompt_traffic(http: aiohttp.ClientSession, gateway: Gateway, secret: str
                          ) -> dict[str, tuple[str, str]]:
    """One request per PROMPT_CASES entry; returns {case: (request_id, prompt text)}."""
    sent = {}
    for name, path, stream in PROMPT_CASES:
        text = f"remember {name} {uuid.uuid4().hex}"
        request_id = f"pl-{uuid.uuid4().hex}"
        body = (chat_body(text, stream=stream) if "chat" in path or name in ("chat", "sse")
                else {"model": CHAT_MODEL, "prompt": text, "stream": stream})
        status, raw = await call(http, gateway.url, path, body, bearer(secret, request_id))
        assert status == 200, raw
        sent[name] = (request_id, text)
    return sent


class TestPromptLog:
    async def test_opted_in_keys_get_rows_with_prompt_response_and_expiry_others_get_none(
        self, gateway: Gateway
    ) -> None:
        db = gateway.settings.database_url
        on, _, _, on_id = await new_key(gateway.settings, prompt_log=True)
        kept, _, _, kept_id = await new_key(gateway.settings, prompt_log=True, retention_days=2)
        off, _, _, off_id = await new_key(gateway.settings)
        generated = completion_text(gateway.fake.completion_tokens).strip()
        async with aiohttp.ClientSession() as http:
            sent_on = await _prompt_traffic(http, gateway, on)
            sent_kept = await _prompt_traffic(http, gateway, kept)
            sent_off = await _prompt_traffic(http, gateway, off)
        ids = [rid for sent in (sent_on, sent_kept, sent_off) for rid, _ in sent.values()]
        await _wait_for_audit(db, ids)
        rows = await _prompt_rows(db, ids)
        default_days = gateway.settings.prompt_log_default_retention_days
        assert default_days == 7
        for sent, key_id, days in ((sent_on, on_id, default_days), (sent_kept, kept_id, 2)):
            for name, (request_id, text) in sent.items():
                assert request_id in rows, f"no prompt-log row for {name}"
                _, row_key, model, prompt, response, created, expires, now = rows[request_id]
                assert (row_key, model) == (key_id, CHAT_MODEL), name
                assert text in prompt, (name, prompt)
                assert generated in response, (name, response)
                assert abs((now - created).total_seconds()) < 30
                assert abs((expires - (now + timedelta(days=days))).total_seconds()) < 30, (name, expires)
        assert not any(rid in rows for rid, _ in sent_off.values())
        assert await _rows(db, "SELECT 1 FROM gateway.prompt_log WHERE key_id = %s", off_id) == []

    async def test_one_sweep_deletes_exactly_the_expired_rows(self, gateway: Gateway) -> None:
        db = gateway.settings.database_url
        secret, _, _, key_id = await new_key(gateway.settings, prompt_log=True)
        async with aiohttp.ClientSession() as http:
            sent = await _prompt_traffic(http, gateway, secret)
        ids = [rid for rid, _ in sent.values()]
        await _wait_for_audit(db, ids)
        assert set(await _prompt_rows(db, ids)) == set(ids)
        expired, kept = ids[:3], ids[3:]
        await _rows(db, "UPDATE gateway.prompt_log SET expires_at = now() - interval '1 second'"
                        " WHERE request_id = ANY(%s) RETURNING 1", expired)
        due = (await _rows(db, "SELECT count(*) FROM gateway.prompt_log WHERE expires_at <= now()"))[0][0]
        assert due >= len(expired)
        pool = AsyncConnectionPool(db, min_size=1, max_size=2, open=False)
        await pool.open(wait=True, timeout=10)
        try:
            deleted = await sweep_prompt_log(pool, batch=2)  # more than one batch
            again = await sweep_prompt_log(pool)
        finally:
            await pool.close()
        assert deleted == due and again == 0
        assert set(await _prompt_rows(db, ids)) == set(kept)
        left = await _rows(db, "SELECT count(*) FROM gateway.prompt_log WHERE expires_at <= now()")
        assert left[0][0] == 0
        assert len(await _rows(db, "SELECT 1 FROM gateway.prompt_log WHERE key_id = %s", key_id)) == len(kept)

    async def test_the_running_gateway_sweeps_expired_rows_on_its_own(
        self, database_url: str, redis_url: str, fake: FakeOllama, tmp_path: Path
    ) -> None:
        settings = gateway_settings(database_url, redis_url, fake.url, tmp_path,
                                    prompt_log_sweep_interval_s=1.0)
        async with running_gateway(settings, fake) as gateway:
            secret, _, _, _ = await new_key(settings, prompt_log=True)
            async with aiohttp.ClientSession() as http:
                await wait_until_models_resolve(http, gateway.url, secret)
                sent = await _prompt_traffic(http, gateway, secret)
            ids = [rid for rid, _ in sent.values()]
            await _wait_for_audit(database_url, ids)
            assert set(await _prompt_rows(database_url, ids)) == set(ids)
            expired, kept = ids[:2], ids[2:]
            await _rows(database_url, "UPDATE gateway.prompt_log SET expires_at = now() - interval '1 second'"
                                      " WHERE request_id = ANY(%s) RETURNING 1", expired)
            deadline = time.monotonic() + 5  # PROMPT_LOG_SWEEP_INTERVAL_S=1
            while set(left := await _prompt_rows(database_url, ids)) != set(kept):
                assert time.monotonic() < deadline, f"the sweeper left {sorted(set(left) - set(kept))}"
                await asyncio.sleep(0.2)

    async def test_a_prompt_is_stored_as_the_caller_wrote_it(self, gateway: Gateway) -> None:
        # An operator searching the prompt log for "Köln" must find the request that asked about it.
        secret, _, _, _ = await new_key(gateway.settings, prompt_log=True)
        text = f"Grüße aus Köln, 東京 {uuid.uuid4().hex[:8]}"
        request_ids = [f"pl-{uuid.uuid4().hex}", f"pl-{uuid.uuid4().hex}"]
        async with aiohttp.ClientSession() as http:
            for request_id, (path, body) in zip(request_ids, [
                ("/v1/chat/completions", chat_body(text)),
                ("/api/generate", {"model": CHAT_MODEL, "prompt": text, "stream": False}),
            ], strict=True):
                status, raw = await call(http, gateway.url, path, body, bearer(secret, request_id))
                assert status == 200, raw
        await _wait_for_audit(gateway.settings.database_url, request_ids)
        rows = await _prompt_rows(gateway.settings.database_url, request_ids)
        assert set(rows) == set(request_ids)
        stored = {rows[r][3] for r in request_ids}
        assert all(text in prompt for prompt in stored), stored

    async def test_disabling_with_the_cli_stops_new_rows_within_a_second(self, gateway: Gateway) -> None:
        db = gateway.settings.database_url
        secret, prefix, _, key_id = await new_key(gateway.settings, prompt_log=True)
        async with aiohttp.ClientSession() as http:
            first = f"pl-{uuid.uuid4().hex}"
            status, _ = await call(http, gateway.url, "/v1/chat/completions", chat_body("before"),
                                   bearer(secret, first))
            assert status == 200
            await _wait_for_audit(db, [first])
            assert first in await _prompt_rows(db, [first])
            env = {**os.environ, "DATABASE_URL": db, "REDIS_URL": gateway.settings.redis_url,
                   "NEURONETZ_ACTOR": "e2e-operator"}
            proc = await asyncio.create_subprocess_exec(
                CLI, "set-prompt-log", "--key", prefix, "--disable", env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            committed = time.monotonic()  # the CLI exits after its transaction committed
            assert proc.returncode == 0, err
            assert "prompt_log=false" in out.decode().split()
            sent: list[tuple[float, str]] = []
            while (elapsed := time.monotonic() - committed) < 1.6:
                request_id = f"pl-{uuid.uuid4().hex}"
                status, _ = await call(http, gateway.url, "/v1/chat/completions", chat_body("after"),
                                       bearer(secret, request_id))
                assert status == 200
                sent.append((elapsed, request_id))
                await asyncio.sleep(0.05)
        await _wait_for_audit(db, [rid for _, rid in sent])
        rows = await _prompt_rows(db, [rid for _, rid in sent])
        late = [(round(t, 2), rid) for t, rid in sent if t >= 1.0 and rid in rows]
        assert not late, f"prompt-log rows written more than 1 s after --disable: {late}"
        assert any(t >= 1.0 for t, _ in sent)
        total = await _rows(db, "SELECT count(*) FROM gateway.prompt_log WHERE key_id = %s", key_id)
        assert total[0][0] == 1 + sum(1 for _, rid in sent if rid in rows)
