"""Fixtures shared by every suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.processes import (
    ServerProcess,
    redwire,
    running_servers,
    serve,
    stop_servers_started_since,
)
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer
from support.tls import SelfSigned, make_self_signed


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test() -> Iterator[None]:
    """Stop the servers a test started and left running (it failed, or pytest's timeout cut
    it off, before its own `stop`). Fixtures of a wider scope start theirs before this one
    runs, so those are kept."""
    before = running_servers()
    yield
    stop_servers_started_since(before)


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


# --- TLS: a self-signed certificate and a broker serving wss:// (tests/support/tls.py) --------


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> SelfSigned:
    """A certificate for 127.0.0.1 and localhost, trusted by nothing but the tests."""
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_broker(redis_server: RedisServer, tls_cert: SelfSigned) -> Iterator[ServerProcess]:
    """`redwire serve --workers 2 --certfile --keyfile`: wss:// and https:// only."""
    server = serve(
        redis_server.url,
        workers=2,
        args=("--certfile", str(tls_cert.certfile), "--keyfile", str(tls_cert.keyfile)),
        env={"REDWIRE_CHANNEL_PREFIX": "tls:"},
    )
    yield server
    server.stop()
