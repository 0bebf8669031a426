"""The test suite's own hygiene: a server a test leaves running is stopped after the test
(tests/conftest.py, `_no_server_outlives_its_test`), and servers started before are kept."""

from __future__ import annotations

from support.processes import (
    ServerProcess,
    redwire,
    running_servers,
    stop_servers_started_since,
)


def test_servers_started_since_are_stopped_and_older_ones_kept() -> None:
    older = ServerProcess(redwire("echo", "--host", "127.0.0.1", "--port", "0"))
    try:
        before = running_servers()
        left = ServerProcess(redwire("echo", "--host", "127.0.0.1", "--port", "0"))
        assert left in running_servers()
        assert stop_servers_started_since(before) == [left]
        assert left.proc.poll() is not None  # it exited
        assert left not in running_servers()
        assert older.proc.poll() is None  # started before: still serving
    finally:
        older.stop()
    assert older not in running_servers()
