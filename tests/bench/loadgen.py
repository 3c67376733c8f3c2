"""HTTP load generator for the gateway benchmark: the fallback when `wrk` is not installed, and the
time-to-first-byte probe beside wrk in streaming phases.

Runs in a process of its own: ``python -m tests.bench.loadgen --url URL --body-file F -c 64 -d 10``.
Each of the ``-c`` workers keeps one keep-alive connection busy (send, read the whole response,
repeat) until the deadline; it also records the time to the first byte of each body. Prints one
line ``BENCH_JSON {...}`` with the fields the wrk script of :mod:`tests.bench.bench_gateway`
prints, plus ``ttfb_p50_us`` / ``ttfb_p99_us`` (times in microseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(url: str, body: bytes, headers: dict[str, str], connections: int, duration_s: float,
              timeout_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    ttfb: list[float] = []  # time to the first byte of the body (a stream's first frame)
    counts = {"bytes": 0, "connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        started = time.perf_counter()
        deadline = started + duration_s

        async def worker() -> None:
            while (t0 := time.perf_counter()) < deadline:
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        first = await resp.content.readany()
                        ttfb.append((time.perf_counter() - t0) * 1e6)
                        size = len(first)
                        while chunk := await resp.content.readany():
                            size += len(chunk)
                        status = resp.status
                except TimeoutError:
                    counts["timeout"] += 1
                    continue
                except aiohttp.ClientConnectorError:
                    counts["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
                except aiohttp.ClientError:
                    counts["read"] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1e6)
                counts["bytes"] += size
                if status > 399:
                    counts["status"] += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    ttfb.sort()
    return {
        "requests": len(latencies),
        "duration_us": elapsed * 1e6,
        **counts,
        "mean_us": sum(latencies) / len(latencies) if latencies else 0.0,
        "max_us": latencies[-1] if latencies else 0.0,
        "p50_us": percentile(latencies, 50),
        "p90_us": percentile(latencies, 90),
        "p99_us": percentile(latencies, 99),
        "p999_us": percentile(latencies, 99.9),
        "ttfb_p50_us": percentile(ttfb, 50),
        "ttfb_p99_us": percentile(ttfb, 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.loadgen", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True, type=Path)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    args = parser.parse_args(argv)
    headers = {"Content-Type": "application/json"}
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    result = asyncio.run(run(args.url, args.body_file.read_bytes(), headers, args.connections,
                             args.duration, args.timeout))
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
