"""Start a server process, wait until it says where it listens, stop it by PID."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Every ServerProcess started and not stopped yet: tests/conftest.py stops those a test
# leaves behind (a test that failed, or was cut off by pytest's timeout, before its own
# `stop`), so they cannot load the machine under the tests that follow.
_RUNNING: set[ServerProcess] = set()


def running_servers() -> frozenset[ServerProcess]:
    return frozenset(_RUNNING)


def stop_servers_started_since(before: frozenset[ServerProcess]) -> list[ServerProcess]:
    """Stop every server still running that is not in `before`; returns them."""
    left = [server for server in running_servers() if server not in before]
    for server in left:
        server.stop()
    return left


class ServerProcess:
    """A child process whose stdout announces `listening <host> <port>`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        ready: str = r"^listening (\S+) (\d+)$",
        timeout_s: float = 30.0,
        cwd: str | Path = REPO,
        inherit_env: bool = True,
    ) -> None:
        base = dict(os.environ) if inherit_env else {}
        full_env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            text=True,
            start_new_session=True,
        )
        _RUNNING.add(self)
        self.output: list[str] = []
        self._ready_re = re.compile(ready)
        self._ready = threading.Event()
        self._lines_cond = threading.Condition()
        self.host = ""
        self.port = 0
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"{argv} did not start:\n" + "".join(self.output[-50:]))

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lines_cond:
                self.output.append(line)
                self._lines_cond.notify_all()
            match = self._ready_re.search(line)
            if match and not self._ready.is_set():
                if match.re.groups >= 2:
                    self.host, self.port = match.group(1), int(match.group(2))
                self._ready.set()
        with self._lines_cond:
            self._lines_cond.notify_all()

    def wait_for_output(self, pattern: str, timeout_s: float = 30.0, start: int = 0) -> str:
        """Wait until a line (from index `start`) matches `pattern`; return it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._lines_cond:
            while True:
                for line in self.output[start:]:
                    if rx.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no line matching {pattern!r}:\n" + "".join(self.output))
                self._lines_cond.wait(remaining)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM the process we started, then SIGKILL it if it does not exit in time."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout_s)
        _RUNNING.discard(self)
        return self.proc.returncode


def redwire(*args: str) -> list[str]:
    """argv running the `redwire` CLI from this checkout's interpreter."""
    return [sys.executable, "-m", "broker", *args]


def serve(
    redis_url: str | None,
    *,
    workers: int = 2,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> ServerProcess:
    """`redwire serve` on a free loopback port, against `redis_url` (None: the embedded Redis),
    run from the checkout (REPO) and listening; `args` go after the usual ones, `env` over
    the inherited environment."""
    redis = () if redis_url is None else ("--redis", redis_url)
    argv = redwire(
        "serve", "--host", "127.0.0.1", "--port", "0", "--workers", str(workers), *redis, *args
    )
    return ServerProcess(argv, env=env)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    return children


def worker_pids(supervisor_pid: int) -> dict[str, int]:
    """worker id → pid of a `redwire serve` supervisor's live workers."""
    workers: dict[str, int] = {}
    for pid in child_pids(supervisor_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--worker-id" in argv:
            workers[argv[argv.index(b"--worker-id") + 1].decode()] = pid
    return workers


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
