"""Benchmarks (not tests): run them as modules, e.g. `python -m tests.bench.bench_gateway`."""

from __future__ import annotations
