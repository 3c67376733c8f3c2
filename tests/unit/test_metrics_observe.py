"""GatewayMetrics.observe writes exactly the samples aioprometheus's own inc/add/observe would."""

from __future__ import annotations

import pytest
from aioprometheus import Counter, Histogram, Registry, render

from adapters import prometheus
from adapters.prometheus import UNKNOWN, GatewayMetrics

CALLS = [
    ("acme", "llama3.1:8b", 200, 30, 16, 0.0031),
    ("acme", "llama3.1:8b", 200, 12, 0, 0.7),
    ("acme", "llama3.1:8b", 429, 0, 0, 0.0004),
    (None, None, 401, 0, 0, 0.0002),
    ("beta", "nomic-embed-text:latest", 200, 9, 0, 12.5),
    ("acme", "llama3.1:8b", 200, 0, 5, 500.0),
]


def reference(calls: list[tuple[str | None, str | None, int, int, int, float]]) -> bytes:
    """The straightforward aioprometheus calls, on metrics of the same names."""
    ours = GatewayMetrics()
    registry = Registry()
    observed = ("gateway_requests_total", "gateway_tokens_total", "gateway_request_duration_seconds")
    for name, collector in ours.registry.collectors.items():
        if name not in observed:  # gauges and writer series: not what observe() writes
            registry.register(collector)
    requests = Counter("gateway_requests_total", ours.requests.doc, registry=registry)
    tokens = Counter("gateway_tokens_total", ours.tokens.doc, registry=registry)
    duration = Histogram("gateway_request_duration_seconds", ours.duration.doc, registry=registry,
                         buckets=ours.duration.upper_bounds)
    for tenant, model, status, tokens_in, tokens_out, seconds in calls:
        labels = {"tenant": tenant or UNKNOWN, "model": model or UNKNOWN}
        requests.inc({**labels, "status": str(status)})
        if tokens_in:
            tokens.add({**labels, "direction": "in"}, tokens_in)
        if tokens_out:
            tokens.add({**labels, "direction": "out"}, tokens_out)
        duration.observe(labels, seconds)
    body, _ = render(registry, ["text/plain"])
    return bytes(body)


def test_observe_renders_the_same_samples_as_the_plain_aioprometheus_calls() -> None:
    metrics = GatewayMetrics()
    for call in CALLS:
        metrics.observe(*call)
    body, _ = metrics.render(["text/plain"])
    assert body == reference(CALLS)
    assert b'gateway_requests_total{model="llama3.1:8b",status="200",tenant="acme"} 3' in body
    assert b'gateway_tokens_total{direction="out",model="llama3.1:8b",tenant="acme"} 21' in body
    assert b'gateway_request_duration_seconds_count{model="-",tenant="-"} 1' in body


def test_the_key_cache_is_bounded_and_dropping_it_loses_no_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prometheus, "_MAX_BOUND_SERIES", 2)
    metrics = GatewayMetrics()
    calls: list[tuple[str | None, str | None, int, int, int, float]] = [
        (f"t{i % 5}", "m", 200, 1, 1, 0.01) for i in range(50)]
    for call in calls:
        metrics.observe(*call)
    assert len(metrics._series) <= 2
    body, _ = metrics.render(["text/plain"])
    assert body == reference(calls)
