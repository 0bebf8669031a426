"""`redwire publish` / `redwire subscribe` as processes against `redwire serve` (2 workers,
real Redis): JSON lines out, exit codes, --since on a history topic, clean stops on signals.

A subscriber is ready when it says so on stderr (`redwire: subscribed to ...`); the test
waits for that line, never for a while.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from support.processes import ServerProcess, redwire, serve

WAIT_S = 30.0
TOPICS = [{"pattern": "h.*", "history_size": 100}]


@pytest.fixture(scope="module")
def broker(redis_server: Any) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        workers=2,
        env={"REDWIRE_TOPICS": json.dumps(TOPICS), "REDWIRE_CHANNEL_PREFIX": "cli:"},
    )
    yield server
    assert server.stop() == 0


def url(broker: ServerProcess) -> str:
    return f"{broker.url}/"


def publish(broker: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = redwire("publish", *args, "--url", url(broker))
    return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S)


def publish_ok(broker: ServerProcess, *args: str) -> dict[str, Any]:
    done = publish(broker, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Subscriber:
    """A `redwire subscribe` process; `ready()` waits for its stderr line."""

    def __init__(self, broker: ServerProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            redwire("subscribe", *args, "--url", url(broker)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: queue.Queue[str] = queue.Queue()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.put(line)
        self.stderr.put("")  # EOF

    def ready(self) -> None:
        while True:
            line = self.stderr.get(timeout=WAIT_S)
            self.stderr_lines.append(line)
            assert line, f"exited before subscribing: {''.join(self.stderr_lines)}"
            if line.startswith("redwire: subscribed to"):
                return

    def finish(self) -> tuple[int, list[dict[str, Any]]]:
        """Wait for the exit; the exit code and the JSON lines it printed (its stderr is in
        `stderr_lines` then). Its output is a few lines: the pipe never fills."""
        try:
            self.proc.wait(timeout=WAIT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.stdout.close()
        while line := self.stderr.get(timeout=WAIT_S):
            self.stderr_lines.append(line)
        return self.proc.returncode, [json.loads(line) for line in out.splitlines()]


def test_version() -> None:
    done = subprocess.run(redwire("--version"), capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0
    assert done.stdout.startswith("redwire ") and done.stdout.split()[1][0].isdigit()


def test_subscribe_prints_what_publish_sends(broker: ServerProcess) -> None:
    sub = Subscriber(broker, "cli.a", "cli.b", "--count", "3")
    sub.ready()
    assert publish_ok(broker, "cli.a", '{"n": 1, "s": "x"}') == {}
    assert publish_ok(broker, "cli.b", "not json", "--key", "k-1") == {}
    assert publish_ok(broker, "cli.a", "[1, 2]", "--msgpack") == {}
    code, lines = sub.finish()
    assert code == 0
    got = sorted(lines, key=lambda line: json.dumps(line["data"]))
    assert got == [
        {"topic": "cli.b", "offset": None, "epoch": None, "data": "not json"},
        {"topic": "cli.a", "offset": None, "epoch": None, "data": [1, 2]},
        {"topic": "cli.a", "offset": None, "epoch": None, "data": {"n": 1, "s": "x"}},
    ]
    assert [line["data"] for line in lines if line["topic"] == "cli.a"] == [
        {"n": 1, "s": "x"},
        [1, 2],
    ]


def test_since_reads_history_after_a_position(broker: ServerProcess) -> None:
    acks = [publish_ok(broker, "h.since", str(n)) for n in range(1, 4)]
    assert [a["offset"] for a in acks] == [1, 2, 3]
    epoch = acks[0]["epoch"]
    code, lines = Subscriber(broker, "h.since", "--since", f"1:{epoch}", "--count", "2").finish()
    assert code == 0
    assert lines == [
        {"topic": "h.since", "offset": 2, "epoch": epoch, "data": 2},
        {"topic": "h.since", "offset": 3, "epoch": epoch, "data": 3},
    ]


def test_since_in_another_epoch_reports_a_gap_then_replays(broker: ServerProcess) -> None:
    acks = [publish_ok(broker, "h.epoch", str(n)) for n in range(1, 3)]
    code, lines = Subscriber(
        broker, "h.epoch", "--since", "5:not-this-one", "--count", "2"
    ).finish()
    assert code == 0
    gaps = [line for line in lines if "gap" in line]
    messages = [line for line in lines if "gap" not in line]
    assert gaps and lines[0] in gaps and all(g["gap"]["topic"] == "h.epoch" for g in gaps)
    assert [(m["offset"], m["epoch"]) for m in messages] == [
        (1, acks[0]["epoch"]),
        (2, acks[0]["epoch"]),
    ]


def test_a_refused_publish_exits_1_with_the_code(broker: ServerProcess) -> None:
    done = publish(broker, "no spaces allowed", "1")
    assert done.returncode == 1 and done.stdout == ""
    assert "publish failed: bad_topic:" in done.stderr


def test_no_broker_exits_1() -> None:
    argv = redwire("publish", "t", "1", "--url", "ws://127.0.0.1:1/")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 1 and "cannot connect" in done.stderr


def test_usage_errors_exit_2() -> None:
    for args in (("publish", "t"), ("subscribe", "t", "--since", "x"), ("serve", "--port", "x")):
        done = subprocess.run(redwire(*args), capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode == 2, (args, done.stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_subscribe_stops_cleanly_on_a_signal(broker: ServerProcess, sig: signal.Signals) -> None:
    sub = Subscriber(broker, "cli.signal")
    sub.ready()
    publish_ok(broker, "cli.signal", '"before"')
    sub.proc.send_signal(sig)
    code, lines = sub.finish()
    assert code == 0
    assert all(line["data"] == "before" for line in lines)  # it may have stopped before it
    assert not any("Traceback" in line for line in sub.stderr_lines)
