"""Fixtures of the conformance suite: the echo servers the Autobahn-style cases run against.

Most sections use the session's `echo_server` (tests/conftest.py, default settings). Section
9 sends messages up to 16 MiB, so it gets its own `redwire echo` with a 16 MiB limit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.processes import ServerProcess, redwire

LARGE_MESSAGE_BYTES = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def large_echo_server() -> Iterator[ServerProcess]:
    """`redwire echo` that accepts messages up to 16 MiB (REDWIRE_MAX_MESSAGE_BYTES)."""
    server = ServerProcess(
        redwire("echo", "--host", "127.0.0.1", "--port", "0"),
        env={"REDWIRE_MAX_MESSAGE_BYTES": str(LARGE_MESSAGE_BYTES)},
    )
    yield server
    server.stop()
