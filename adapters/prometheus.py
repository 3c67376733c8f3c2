"""Metrics (SPEC §8.2) with aioprometheus, served only on a loopback listener of their own.

Labels are tenant and model, never a key; a model label is only ever a name from the caller's
effective set (anything else is `-`), so random model names cannot mint new series.
"""

from __future__ import annotations

from aiohttp import web
from aioprometheus import Counter, Gauge, Histogram, Registry, render
from attrs import frozen

from gateway_core.routing import Outcome

UNKNOWN = "-"
# The tables the batched writers fill; their series exist from the start, so alerts see a 0.
WRITER_TABLES = ("audit_log", "budget_usage", "prompt_log")
# Label combinations are few (tenants x models in their effective sets x statuses); the cap only
# bounds the key cache if that ever stops being true.
_MAX_BOUND_SERIES = 10_000


@frozen
class _Series:
    """One label combination's sample keys in aioprometheus's stores, computed once."""

    labels: dict[str, str]
    requests: bytes
    tokens_in: bytes
    tokens_out: bytes
    duration: bytes


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = Registry()
        self.requests = Counter("gateway_requests_total", "Caller requests by outcome.",
                                registry=self.registry)
        self.tokens = Counter("gateway_tokens_total", "Tokens charged, by direction (in/out).",
                              registry=self.registry)
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Time from request to the end of the response.",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        # Upstream series carry a `backend` label: the index in OLLAMA_BASE_URL, never a URL.
        self.circuit_open = Gauge("gateway_circuit_state",
                                  "Backend circuit: 0 closed, 1 half-open, 2 open.", registry=self.registry)
        self.model_circuits_open = Gauge("gateway_model_circuits_open",
                                         "Models whose own circuit (5xx answers) is open or half-open.",
                                         registry=self.registry)
        self.upstream_requests = Counter("gateway_upstream_requests_total",
                                         "Upstream calls by backend and outcome.", registry=self.registry)
        self.discovery_age = Gauge("gateway_discovery_age_seconds",
                                   "Seconds since model discovery last succeeded (-1: never).",
                                   registry=self.registry)
        self.discovered_models = Gauge("gateway_discovered_models", "Models in the discovery cache.",
                                       registry=self.registry)
        # Writers (SPEC §8.3), labelled by table: audit_log, budget_usage, prompt_log.
        self.rows_rejected = Counter("gateway_rows_rejected_total",
                                     "Rows PostgreSQL refused that were set aside in the reject file.",
                                     registry=self.registry)
        self.writer_queue = Gauge("gateway_writer_queue_rows", "Rows queued in memory for a writer.",
                                  registry=self.registry)
        self.spool_bytes = Gauge("gateway_spool_bytes", "Bytes waiting in a writer's spool file.",
                                 registry=self.registry)
        self._upstream_keys: dict[tuple[int, Outcome], bytes] = {}
        for table in WRITER_TABLES:
            self.observe_writer(table, 0, 0, 0)

    def observe_writer(self, table: str, queued: int, rejected: int, spool_bytes: int) -> None:
        """Refresh one writer's series before /metrics renders (the writer keeps the counts)."""
        labels = {"table": table}
        self.writer_queue.set(labels, float(queued))
        self.spool_bytes.set(labels, float(spool_bytes))
        self.rows_rejected.set(labels, float(rejected))
        self._series: dict[tuple[str | None, str | None, int], _Series] = {}

    def observe_upstream(self, backend: int, outcome: Outcome) -> None:
        """One upstream call ended; on every request, so its sample key is computed once (as observe)."""
        key = self._upstream_keys.get((backend, outcome))
        if key is None:
            labels = {"backend": str(backend), "outcome": outcome.value}
            self.upstream_requests._check_labels(labels)
            key = self.upstream_requests.values.__keytransform__(labels)
            self._upstream_keys[(backend, outcome)] = key
        store = self.upstream_requests.values.store
        store[key] = store.get(key, 0) + 1

    def observe(self, tenant: str | None, model: str | None, status: int, tokens_in: int, tokens_out: int,
                seconds: float) -> None:
        series = self._series.get((tenant, model, status))
        if series is None:
            series = self._bind(tenant, model, status)
        # The same sample stores aioprometheus's own inc/add/observe update, without turning the label
        # dicts into JSON keys twice per call (that was ~20 µs of every request).
        requests = self.requests.values.store
        requests[series.requests] = requests.get(series.requests, 0) + 1
        if tokens_in:
            tokens = self.tokens.values.store
            tokens[series.tokens_in] = tokens.get(series.tokens_in, 0) + tokens_in
        if tokens_out:
            tokens = self.tokens.values.store
            tokens[series.tokens_out] = tokens.get(series.tokens_out, 0) + tokens_out
        histogram = self.duration.values.store.get(series.duration)
        if histogram is None:
            self.duration.observe(series.labels, seconds)
        else:
            histogram.observe(seconds)

    def _bind(self, tenant: str | None, model: str | None, status: int) -> _Series:
        if len(self._series) >= _MAX_BOUND_SERIES:
            self._series.clear()  # only a cache of keys: the samples stay in the collectors
        labels = {"tenant": tenant or UNKNOWN, "model": model or UNKNOWN}
        key = self.requests.values.__keytransform__
        for collector, extra in ((self.requests, {"status": str(status)}), (self.tokens, {"direction": "in"}),
                                 (self.tokens, {"direction": "out"})):
            collector._check_labels({**labels, **extra})
        series = _Series(labels=labels, requests=key({**labels, "status": str(status)}),
                         tokens_in=key({**labels, "direction": "in"}),
                         tokens_out=key({**labels, "direction": "out"}), duration=key(labels))
        self._series[(tenant, model, status)] = series
        return series

    def render(self, accept: list[str]) -> tuple[bytes, dict[str, str]]:
        body, headers = render(self.registry, accept)
        return body, dict(headers)


def metrics_app(metrics: GatewayMetrics, before_render: object = None) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if callable(before_render):
            before_render()
        body, headers = metrics.render(request.headers.getall("Accept", []))
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app
