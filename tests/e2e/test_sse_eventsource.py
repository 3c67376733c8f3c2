"""Our SSE streams read by a plain EventSource client (aiohttp-sse-client2), as browsers and SSE
libraries read them: every frame is a plain `data:` message event, the stream ends with [DONE], and a
failure mid-stream arrives as one event carrying the §3.3 error."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiohttp_sse_client2 import client as sse_client

from tests.e2e.harness import Gateway, audit_row

MODEL = "llama3.1:8b"


async def _events(gateway: Gateway, body: dict[str, Any], request_id: str) -> list[sse_client.MessageEvent]:
    key, _, _ = await gateway.key()
    events: list[sse_client.MessageEvent] = []
    async with aiohttp.ClientSession() as http, sse_client.EventSource(
        gateway.v1 + "/chat/completions", option={"method": "POST"}, session=http, max_connect_retry=0,
        json=body, headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id},
    ) as source:
        try:
            async for event in source:
                events.append(event)
                if event.data == "[DONE]" or "error" in event.data:
                    break
        except ConnectionError:
            pass  # the gateway closed the stream after its last frame; EventSource would reconnect
    return events


async def test_an_eventsource_client_reads_every_chunk_and_the_final_usage(gateway: Gateway) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "stream": True,
            "stream_options": {"include_usage": True}}
    events = await _events(gateway, body, "sse-eventsource-ok")
    # Plain `data:` frames: the default "message" event (this client reports it as type None).
    assert events and all(e.type in (None, "message") for e in events)
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    usage = chunks[-1]["usage"]
    assert text and usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    row = await audit_row(gateway, "sse-eventsource-ok")
    assert (row["status"], row["tokens_in"], row["tokens_out"]) == (
        200, usage["prompt_tokens"], usage["completion_tokens"])


async def test_a_failure_mid_stream_reaches_an_eventsource_client_as_an_error_event(gateway: Gateway) -> None:
    gateway.fake.fail_mode = "midstream"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "stream": True}
    events = await _events(gateway, body, "sse-eventsource-fail")
    assert events and events[-1].data != "[DONE]"
    error = json.loads(events[-1].data)["error"]
    assert error["code"] == "upstream_unavailable" and error["type"] == "server_error"
    assert all("[DONE]" != e.data for e in events)
