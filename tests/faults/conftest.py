"""Fixtures of the fault tests: a Redis of a test's own, to stop, kill and restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.redis_server import RedisServer


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own (the session one is shared and must stay up)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(name="server")
def _server(own_redis: RedisServer) -> RedisServer:
    """The same, under the name the bus fault tests use."""
    return own_redis
