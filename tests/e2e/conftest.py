from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.e2e.harness import Gateway, gateway_settings, running_gateway
from tests.fake_ollama import FakeOllama

MODELS = ["llama3.1:8b", "qwen3:8b", "nomic-embed-text:latest", "gpt-oss:20b-cloud"]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=list(MODELS)) as server:
        yield server


@pytest_asyncio.fixture
async def gateway(database_url: str, redis_url: str, fake: FakeOllama, tmp_path: Path
                  ) -> AsyncIterator[Gateway]:
    settings = gateway_settings(database_url, redis_url, fake.url, tmp_path)
    async with running_gateway(settings, fake) as gw:
        yield gw
