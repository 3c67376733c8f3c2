"""The Grafana dashboard and the Prometheus alert rules name only metrics a live gateway exports."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest_asyncio
import yaml
from aiohttp import web

from adapters.prometheus import metrics_app
from entrypoints.app import METRICS, REFRESH_GAUGES
from tests.e2e.harness import Gateway
from tests.services import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\b(gateway_[a-z0-9_]+)\b")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ", re.M)


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        assert dashboard["panels"], path
        for panel in dashboard["panels"]:
            assert panel["targets"], panel["title"]
            exprs += [target["expr"] for target in panel["targets"]]
        exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "gateway-alerts.yml").read_text())
    exprs = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["annotations"]["summary"], rule
            exprs.append(str(rule["expr"]))
    return exprs


@pytest_asyncio.fixture
async def metrics_url(gateway: Gateway) -> AsyncIterator[str]:
    """The gateway's own loopback /metrics listener, as `serve` starts it."""
    app = gateway.app
    runner = web.AppRunner(metrics_app(app[METRICS], lambda: app[REFRESH_GAUGES]()), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()


async def test_dashboard_and_alerts_use_only_exported_metrics(gateway: Gateway, metrics_url: str) -> None:
    secret, _, _ = await gateway.key()
    auth = {"Authorization": f"Bearer {secret}"}
    async with aiohttp.ClientSession() as http:
        # A success with tokens, a 403, a 401 and a 400, so that every counter has series.
        async with http.post(gateway.v1 + "/chat/completions", headers=auth, json={
                "model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200, await resp.text()
        async with http.post(gateway.v1 + "/chat/completions", headers=auth, json={
                "model": "not-installed:1b", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 403
        async with http.get(gateway.v1 + "/models", headers={"Authorization": "Bearer nz_wrong"}) as resp:
            assert resp.status == 401
        async with http.post(gateway.url + "/api/chat", headers=auth, data=b"{not json") as resp:
            assert resp.status == 400
        async with http.get(metrics_url, headers={"Accept": "text/plain"}) as resp:
            assert resp.status == 200
            exported = await resp.text()
    series = {m.group(1) for m in SAMPLE.finditer(exported)}
    labels = {name: set() for name in series}
    for m in SAMPLE.finditer(exported):
        labels[m.group(1)] |= set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))

    dashboard, alerts = dashboard_exprs(), alert_exprs()
    assert len(dashboard) >= 10 and len(alerts) >= 6
    named = {name for expr in dashboard + alerts for name in METRIC.findall(expr)}
    # Everything the issue asks the dashboard to show, and every alert it lists, has a metric behind it.
    for wanted in ("gateway_requests_total", "gateway_tokens_total",
                   "gateway_request_duration_seconds_bucket", "gateway_circuit_state",
                   "gateway_discovery_age_seconds", "gateway_writer_queue_rows",
                   "gateway_spool_bytes", "gateway_rows_rejected_total"):
        assert wanted in named, wanted
    missing = sorted(named - series)
    assert not missing, f"named by the dashboard or alerts, not exported by the gateway: {missing}"
    # Grouping labels must exist on the series they group.
    for expr in dashboard + alerts:
        for by in re.findall(r"by \(([^)]*)\)", expr):
            for label in (part.strip() for part in by.split(",")):
                owners = [n for n in METRIC.findall(expr) if label in labels[n] or label == "le"]
                assert owners, f"no metric in {expr!r} carries the label {label!r}"
