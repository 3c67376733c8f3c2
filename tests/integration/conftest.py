from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from attrs import frozen

CLI = [str(Path(sys.executable).with_name("neuronetz-gateway"))]


@frozen
class CliResult:
    code: int
    out: str
    err: str

    def pairs(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.out.splitlines() if "=" in line)


RunCli = Callable[..., CliResult]


@pytest.fixture(scope="session")
def cli(database_url: str, redis_url: str) -> RunCli:
    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        full_env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
                    "NEURONETZ_ACTOR": "test-operator", **(env or {})}
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env, timeout=60,
                              stdin=subprocess.DEVNULL)
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def db(database_url: str) -> psycopg.Connection[tuple[object, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"
