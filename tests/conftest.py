"""Fixtures shared by every suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.processes import ServerProcess, redwire


@pytest.fixture(scope="session")
def echo_server() -> Iterator[ServerProcess]:
    """`redwire echo` on a free loopback port, for the whole session."""
    server = ServerProcess(redwire("echo", "--host", "127.0.0.1", "--port", "0"))
    yield server
    server.stop()
