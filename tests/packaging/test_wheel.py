"""The check Docker would do: the built wheel, installed into a fresh venv from the lock, runs.

`pip install -e` (what every other test uses) reads files straight from the checkout and so hides
anything the wheel forgets; here nothing of the checkout is importable by the installed commands.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.services import as_url, create_database, drop_database, free_port

REPO = Path(__file__).resolve().parents[2]
PIP_QUIET = ["--quiet", "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv holding the wheel and the runtime lock, nothing else."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build/ directory keeps files deleted since the last build.
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".dev", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", *PIP_QUIET, "--no-deps", "-w", str(dist),
                    str(source)], check=True, timeout=300, cwd=root)
    wheels = list(dist.glob("neuronetz_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", *PIP_QUIET]
    subprocess.run([*pip, "--require-hashes", "-r", str(REPO / "requirements" / "base.lock")],
                   check=True, timeout=300, cwd=root)
    subprocess.run([*pip, "--no-deps", str(wheels[0])], check=True, timeout=120, cwd=root)
    return root / "venv" / "bin"


@pytest.fixture
def fresh_database() -> Iterator[str]:
    url = as_url(create_database("nz_wheel"))
    try:
        yield url
    finally:
        drop_database(url)


@pytest.fixture
def fake_ollama() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_ollama", "--host", "127.0.0.1", "--port",
                             str(port)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/api/version", 200, 20)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def _wait_http(url: str, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = _status(url)
        if last == expected:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} answered {last}, not {expected}, within {timeout_s}s")


def _env(bin_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["NEURONETZ_ACTOR"] = "wheel-test"
    return {**env, **settings}


def test_wheel_migrates_serves_and_runs_the_cli(installed: Path, fresh_database: str, redis_url: str,
                                                 fake_ollama: str, tmp_path: Path) -> None:
    cli = str(installed / "neuronetz-gateway")
    # The installed code, not the checkout: cwd is outside the repo and PYTHONPATH is dropped.
    probe = "import entrypoints; print(entrypoints.__file__)"
    where = subprocess.run([str(installed / "python"), "-c", probe], env=_env(installed), cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    assert str(installed.parent) in where.stdout, where.stdout

    port, metrics_port = free_port(), free_port()
    env = _env(installed, DATABASE_URL=fresh_database, REDIS_URL=redis_url, OLLAMA_BASE_URL=fake_ollama,
               GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port), METRICS_PORT=str(metrics_port),
               AUDIT_SPOOL_DIR=str(tmp_path / "spool"), MODEL_DISCOVERY_REFRESH_S="1")

    migrate = subprocess.run([cli, "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    with psycopg.connect(fresh_database) as conn:
        heads = conn.execute("SELECT version_num FROM gateway.alembic_version").fetchall()
    shipped = sorted(p.name.split("_")[0] for p in (REPO / "alembic" / "versions").glob("*.py"))
    assert heads == [(shipped[-1],)], (heads, shipped)

    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen([cli, "serve"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/readyz", 200, 60)
        created = subprocess.run([cli, "create-tenant", "--name", "wheel-tenant", "--rpm", "60", "--tpm",
                                  "10000", "--concurrent", "2", "--json"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["tenant"] == "wheel-tenant"
        assert _status(f"http://127.0.0.1:{port}/v1/models") == 401
    finally:
        server.terminate()
        code = server.wait(60)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
