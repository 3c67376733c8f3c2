"""What happens after every caller request (SPEC §8): one log event, one audit row, metrics, and
a prompt-log row for keys that opted in. Nothing here waits on I/O."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import structlog

from adapters.http.exchange import Exchange
from adapters.postgres.audit import AuditWriter, PromptLogWriter
from adapters.prometheus import GatewayMetrics
from gateway_core.ids import new_id

_log = structlog.get_logger("neuronetz.request")


class RequestObserver:
    def __init__(self, audit: AuditWriter, prompts: PromptLogWriter, metrics: GatewayMetrics,
                 prompt_retention_days: int) -> None:
        self._audit = audit
        self._prompts = prompts
        self._metrics = metrics
        self._retention_days = prompt_retention_days

    def finish(self, ex: Exchange) -> None:
        p = ex.principal
        latency_ms = round(ex.latency_ms, 3)
        now = datetime.now(UTC)
        self._audit.put((new_id(), ex.request_id, p.key_prefix if p else None, p.tenant_id if p else None,
                         ex.model or ex.requested_model, ex.route, ex.tokens_in, ex.tokens_out, ex.status,
                         latency_ms, ex.client_ip or None, now))
        # ex.model is set only after the model policy accepted it: no caller-chosen label values.
        self._metrics.observe(p.tenant_name if p else None, ex.model, ex.status, ex.tokens_in,
                              ex.tokens_out, latency_ms / 1000)
        if p is not None and p.prompt_log_enabled and ex.prompt_text is not None:
            days = p.prompt_log_retention_days or self._retention_days
            self._prompts.put((ex.request_id, p.key_id, ex.model, ex.prompt_text, ex.response_text or "",
                               now, now + timedelta(days=days)))
        _log.info("request", request_id=ex.request_id, tenant=p.tenant_name if p else None,
                  key_prefix=p.key_prefix if p else None, route=ex.route, model=ex.model, status=ex.status,
                  latency_ms=latency_ms, tokens_in=ex.tokens_in, tokens_out=ex.tokens_out,
                  dependency=ex.dependency)


def seconds_since(since: float | None) -> float:
    return -1.0 if since is None else time.time() - since
