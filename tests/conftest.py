"""Fixtures shared by every suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.processes import ServerProcess, redwire
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer


@pytest.fixture(scope="session")
def echo_server() -> Iterator[ServerProcess]:
    """`redwire echo` on a free loopback port, for the whole session."""
    server = ServerProcess(redwire("echo", "--host", "127.0.0.1", "--port", "0"))
    yield server
    server.stop()


# --- a real Redis (tests/support/redis_server.py) ---------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session: a container when Docker answers, else `redis-server`."""
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis' URL, emptied (FLUSHALL) and running again if a test stopped it."""
    if not redis_server.running:
        redis_server.start()
    redis_server.flushall()
    return redis_server.url


# --- a real Redis Cluster (tests/support/redis_cluster.py) -------------------------------------


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """Three cluster-enabled `redis-server` masters on free ports, for the session."""
    cluster = RedisCluster(masters=3)
    yield cluster
    cluster.close()
