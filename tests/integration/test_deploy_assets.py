"""The compose files, image and env template a new operator starts from (issue 12)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.demo.yaml"]
# ${NAME}, ${NAME:-default}, ${NAME:?error}; `$$` is compose's escape for a literal `$`.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
SETTING = re.compile(r"`([A-Z][A-Z0-9_]+)`")
METRICS_PORT = "9464"


def _documented() -> set[str]:
    names = set(SETTING.findall((REPO / "docs" / "settings.md").read_text()))
    for line in (REPO / ".env.example").read_text().splitlines():
        match = re.match(r"#?\s*([A-Z][A-Z0-9_]+)=", line)
        if match:
            names.add(match.group(1))
    return names


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), path
    return data


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_parses_with_docker_compose(path: Path, tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose (v1, Debian's package) is needed: apt-get install docker-compose"
    env = {**os.environ, "POSTGRES_PASSWORD": "x", "GRAFANA_ADMIN_PASSWORD": "y",
           "OLLAMA_BASE_URL": "http://ollama.invalid:11434"}
    result = subprocess.run([binary, "-f", str(path), "config", "-q"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_production_compose_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose (v1, Debian's package) is needed: apt-get install docker-compose"
    env = {k: v for k, v in os.environ.items()
           if k not in {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "OLLAMA_BASE_URL"}}
    result = subprocess.run([binary, "-f", str(COMPOSE_FILES[0]), "config", "-q"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr or "GRAFANA_ADMIN_PASSWORD" in result.stderr \
        or "OLLAMA_BASE_URL" in result.stderr, result.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_service_has_a_healthcheck_or_is_a_one_shot(path: Path) -> None:
    for name, service in _load(path)["services"].items():
        one_shot = service.get("restart") == "no"
        assert "healthcheck" in service or one_shot, f"{path.name}: {name} has neither"
        if one_shot:
            assert "healthcheck" not in service or service["healthcheck"].get("disable"), name


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_port_exposes_metrics(path: Path) -> None:
    services = _load(path)["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        assert str(env.get("METRICS_PORT", METRICS_PORT)) == METRICS_PORT, name
        for port in service.get("ports") or []:
            container_port = str(port).rsplit(":", 1)[-1].split("/")[0]
            assert container_port not in {METRICS_PORT, "9090"}, f"{path.name}: {name} publishes {port}"
        assert "expose" not in service, f"{path.name}: {name} exposes ports"
    if "prometheus" in services:
        assert services["prometheus"].get("network_mode") == "service:gateway"
        assert "ports" not in services["prometheus"]
        scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
        assert targets == [f"127.0.0.1:{METRICS_PORT}"], targets


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_variable_and_setting_is_documented(path: Path) -> None:
    documented = _documented()
    text = path.read_text()
    used = set(VARIABLE.findall(text))
    for service in _load(path)["services"].values():
        env = service.get("environment") or {}
        if service.get("image", "").startswith("neuronetz-gateway"):
            used |= set(env)
    missing = sorted(used - documented)
    assert not missing, f"{path.name} uses undocumented variables: {missing}"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_password_in_a_url(path: Path) -> None:
    for url in re.findall(r"[a-z+]+://[^\s\"']+", path.read_text()):
        assert "@" not in url or ":" not in url.split("://", 1)[1].split("@", 1)[0], url


def test_production_gateway_scales_without_fixed_ports_and_keeps_a_spool_per_replica() -> None:
    gateway = _load(COMPOSE_FILES[0])["services"]["gateway"]
    assert "container_name" not in gateway
    [published] = gateway["ports"]
    host = str(published).rsplit(":", 1)[0]
    assert "-" in host, f"one fixed host port cannot serve several replicas: {published}"
    # An anonymous volume: compose gives every replica its own and keeps it across re-creation.
    assert "/var/lib/neuronetz-gateway/spool" in gateway["volumes"]
    assert gateway["stop_grace_period"]


def test_image_is_multi_stage_pinned_non_root_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_BASE=(\S+)$", text, re.M)
    assert base and re.search(r"@sha256:[0-9a-f]{64}$", base.group(1)), "base image not pinned by digest"
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "builder and runtime stages"
    runtime = stages[-1]
    assert "--require-hashes" in stages[0] and "base.lock" in stages[0]
    assert re.search(r"^USER (?!root|0\b)\S+", runtime, re.M)
    assert "HEALTHCHECK" in runtime and "GATEWAY_PORT" in runtime
    assert not re.search(r"apt-get|gcc|build-essential", runtime)
    assert 'VOLUME ["/var/lib/neuronetz-gateway/spool"]' in runtime
    ignored = (REPO / ".dockerignore").read_text()
    assert ignored.splitlines()[1:2] == ["*"] or "\n*\n" in f"\n{ignored}"
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        if not source.startswith("--"):
            assert f"!{source.rstrip('/')}" in ignored.replace("/\n", "\n"), f".dockerignore drops {source}"


def test_every_setting_is_documented_with_its_default() -> None:
    from entrypoints.settings import DEFAULTS

    text = (REPO / "docs" / "settings.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|", text, re.M)}
    for name in [*DEFAULTS, "REDIS_CLUSTER", "TRUSTED_PROXIES", "GATEWAY_WORKERS"]:
        assert name in rows, f"docs/settings.md does not document {name}"
    for name, default in DEFAULTS.items():
        shown = "empty" if default == "" else f"`{default}`"
        assert shown in rows[name], f"docs/settings.md gives {name} a default other than {default!r}"
