from __future__ import annotations

import aiohttp

from tests.e2e.harness import Gateway


async def test_chat_round_trip_is_counted_and_audited(gateway: Gateway) -> None:
    secret, prefix, _ = await gateway.key()
    async with aiohttp.ClientSession() as http:
        resp = await http.post(gateway.v1 + "/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                               json={"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]})
        body = await resp.json()
    assert resp.status == 200, body
    assert body["usage"]["completion_tokens"] == 12
