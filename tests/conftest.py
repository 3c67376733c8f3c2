from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import PrivateRedis, PrivateRedisCluster, as_url, create_database, drop_database


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database migrated to head for this test run, dropped afterwards."""
    from entrypoints.migrate import upgrade_to_head

    url = as_url(create_database())
    try:
        upgrade_to_head(url)
        yield url
    finally:
        drop_database(url)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[PrivateRedis]:
    server = PrivateRedis().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: PrivateRedis) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[PrivateRedisCluster]:
    """A private 3-master Redis Cluster, started only when a test asks for it (SPEC §4.11)."""
    cluster = PrivateRedisCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
