"""Where the gateway's CPU goes, by area, from py-spy raw profiles of `make bench` phases.

``python -m tests.bench.profile_areas DIR_OR_FILES...`` (profiles from ``bench_gateway --py-spy DIR
--py-spy-format raw``). Each sample is charged to the innermost frame that belongs to a known area
(so redis-py parsing called from our admission adapter counts as redis-py: "self" time by area;
samples of idle thread-pool workers are left out),
and separately every sample that passes through one of our own steps counts for that step
("inclusive" time: admission = the whole Redis call, observer = log + metrics + audit enqueue).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# py-spy counts a thread-pool worker blocked on its queue as busy; those samples are not CPU.
IDLE = re.compile(r"^_worker \(concurrent/futures/thread\.py:\d+\)$")
# A leaf in a transport write is the kernel's send() on loopback, which also delivers to the reader.
SOCKET_WRITE = re.compile(
    r"^(StreamWriter\._?writelines?|StreamWriter\._write) \((aiohttp/http_writer|asyncio/streams)")

# (area, pattern on "function (file:line)") — innermost frame first; the first match wins.
AREAS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    ("metrics (aioprometheus + adapter)", r"\(aioprometheus/|\(adapters/prometheus\.py"),
    ("logging (structlog + scrubbing)", r"\(structlog/|\(entrypoints/logging_setup\.py|\(logging/"),
    ("JSON (stdlib json / orjson)", r"\(json/|orjson"),
    ("redis-py", r"\(redis/"),
    ("psycopg (writers, listener)", r"\(psycopg(_pool)?/"),
    ("our PostgreSQL writers", r"\(adapters/postgres/"),
    ("aiohttp client (upstream)", r"\(aiohttp/(client|connector|client_reqrep|client_proto)"),
    ("aiohttp server + HTTP", r"\(aiohttp/|\(multidict/|\(yarl/"),
    ("our Redis adapters", r"\(adapters/redis/"),
    ("our HTTP handlers + relay", r"\(adapters/http/"),
    ("our upstream adapter", r"\(adapters/ollama\.py"),
    ("our observer", r"\(adapters/observer\.py"),
    ("our other adapters", r"\(adapters/"),
    ("gateway_core", r"\(gateway_core/"),
    ("event loop, sockets (asyncio/uvloop)", r"\(asyncio/|uvloop|\(selectors\.py|\(socket\.py|\(ssl\.py"),
    ("threads (argon2 pool, psycopg)", r"\(threading\.py|\(concurrent/"),
))

STEPS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    ("admission (Metering.admit, one Redis script)", r"^Metering\.admit "),
    ("settlement (Metering.settle, one Redis script)", r"^Metering\.(settle|release|finish)"),
    ("authentication (cache lookup)", r"^Authenticator\."),
    ("model policy", r"^ModelPolicy\."),
    ("upstream call (OllamaBackend)", r"^OllamaBackend\."),
    ("observer: log + metrics + audit enqueue", r"^RequestObserver\.finish "),
    ("  of which the log event (structlog)", r"\(structlog/_native\.py"),
    ("  of which metrics", r"^GatewayMetrics\.observe "),
    ("  of which uuid4 for the audit row (os.urandom)", r"^uuid4 \(uuid\.py"),
    ("batched PostgreSQL writers", r"\(adapters/postgres/batching\.py"),
))


def frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    parts = stack.split(";")
    if parts and parts[0].startswith("process "):
        parts = parts[1:]
    return parts, int(count)


def analyse(paths: list[Path]) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    by_area: Counter[str] = Counter()
    by_step: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            stack, count = frames(line)
            if stack and IDLE.search(stack[-1]):
                continue
            total += count
            if stack and SOCKET_WRITE.search(stack[-1]):
                area = "socket writes (send syscalls)"
            else:
                area = next((name for frame in reversed(stack) for name, pattern in AREAS
                             if pattern.search(frame)), "other")
            by_area[area] += count
            for name, pattern in STEPS:
                if any(pattern.search(frame) for frame in stack):
                    by_step[name] += count
    return total, by_area, by_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile_areas", description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="py-spy raw files, or directories of them")
    args = parser.parse_args(argv)
    files = [f for p in args.paths for f in (sorted(p.glob("*.txt")) if p.is_dir() else [p])]
    if not files:
        print("no profiles found", file=sys.stderr)
        return 1
    total, by_area, by_step = analyse(files)
    print(f"{total} samples from {len(files)} profile(s)\n\nself time by area")
    for name, count in by_area.most_common():
        print(f"  {count / total:>6.1%}  {name}")
    print("\ninclusive time of our steps")
    for name, _ in STEPS:
        print(f"  {by_step[name] / total:>6.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
