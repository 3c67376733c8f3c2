"""docs/openapi.yaml is the caller contract: schemathesis drives a live gateway (the `serve` command, in
front of the fake Ollama) with a valid key. No 5xx, and every status, content type, header and body
must be the one the document promises."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import checks
from schemathesis.specs.openapi import checks as openapi_checks

from tests.services import free_port

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("neuronetz-gateway"))
MODELS = "llama3.1:8b,nomic-embed-text:latest"
CHECKS = [checks.not_a_server_error, openapi_checks.status_code_conformance,
          openapi_checks.content_type_conformance, openapi_checks.response_headers_conformance,
          openapi_checks.response_schema_conformance]

schema = schemathesis.openapi.from_path(REPO / "docs" / "openapi.yaml")


def _wait(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer 200 within {timeout_s}s")


@pytest.fixture(scope="module")
def live(database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[dict[str, str]]:
    """A served gateway and a key whose tenant may use the fake's chat and embedding model."""
    workdir = tmp_path_factory.mktemp("openapi")
    fake_port, port = free_port(), free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
           "OLLAMA_BASE_URL": f"http://127.0.0.1:{fake_port}", "GATEWAY_HOST": "127.0.0.1",
           "GATEWAY_PORT": str(port), "METRICS_PORT": str(free_port()), "LOG_FORMAT": "json",
           "AUDIT_SPOOL_DIR": str(workdir / "spool"), "MODEL_DISCOVERY_REFRESH_S": "1",
           "NEURONETZ_ACTOR": "openapi-test"}
    fake = subprocess.Popen([sys.executable, "-m", "tests.fake_ollama", "--host", "127.0.0.1", "--port",
                             str(fake_port), "--fast"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = (workdir / "gateway.log").open("wb")
    gateway = subprocess.Popen([CLI, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    try:
        _wait(f"http://127.0.0.1:{port}/readyz", 60)
        tenant = f"openapi-{port}"
        for args in (["create-tenant", "--name", tenant, "--rpm", "1000000", "--tpm", "1000000000",
                      "--concurrent", "64"], ["set-models", "--tenant", tenant, "--models", MODELS]):
            subprocess.run([CLI, *args], env=env, check=True, capture_output=True, timeout=60)
        created = subprocess.run([CLI, "create-key", "--tenant", tenant, "--name", "schemathesis"], env=env,
                                 check=True, capture_output=True, text=True, timeout=60)
        key = next(line[4:] for line in created.stdout.splitlines() if line.startswith("key="))
        yield {"base_url": f"http://127.0.0.1:{port}", "key": key}
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
        log.close()
        fake.terminate()
        fake.wait(10)


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_gateway_keeps_the_documented_contract(case: schemathesis.Case, live: dict[str, str]) -> None:
    case.call_and_validate(base_url=live["base_url"], headers={"Authorization": f"Bearer {live['key']}"},
                           checks=CHECKS, timeout=30)
