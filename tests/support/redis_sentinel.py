"""A local Sentinel setup for tests: one master, one replica, Sentinels, all on free ports.

Built from the `redis-server` binary (`--sentinel` mode for the Sentinels), each process in a
private directory, stopped by PID and the directories removed by `close()`. `start` returns
once the replica is in sync and every Sentinel knows the master and its replica. The
Sentinels decide fast (`down-after-milliseconds` 1000, quorum 1), so `kill_master()` is
followed by a failover within a few seconds; `wait_for_failover()` returns the new master.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from support.processes import free_port
from support.redis_server import ping

SERVICE = "redwire-test"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
DOWN_AFTER_MS = 1000


@dataclass
class Process:
    port: int
    dir: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ping(self.host, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {self.port} did not start:\n{self.log()}")
            time.sleep(0.02)  # polling another process until it answers (bounded)

    def command(self, *args: str | bytes | int) -> Any:
        import redis

        with redis.Redis(host=self.host, port=self.port, socket_timeout=10) as client:
            return client.execute_command(*args)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        path = os.path.join(self.dir, "redis.log")
        if not os.path.exists(path):
            return ""
        with open(path) as fh:
            return fh.read()[-2000:]


class RedisSentinel:
    """A master, a replica and `sentinels` Sentinels monitoring them as SERVICE."""

    def __init__(self, sentinels: int = 1) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: apt-get install -y redis-server"
        self._binary = binary
        self._root = tempfile.mkdtemp(prefix="redwire-sentinel-")
        self.servers: list[Process] = []
        self.sentinels: list[Process] = []
        try:
            master = self._server("master", [])
            self._server("replica", ["--replicaof", "127.0.0.1", str(master.port)])
            for i in range(sentinels):
                self._sentinel(i, master.port)
            self._wait(self._ready, "the Sentinel setup did not become ready")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def _server(self, name: str, extra: list[str]) -> Process:
        path = os.path.join(self._root, name)
        os.mkdir(path)
        port = free_port()
        argv = [
            self._binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", path,
            "--logfile", os.path.join(path, "redis.log"),
            *extra,
        ]  # fmt: skip
        server = Process(port, path, argv)
        self.servers.append(server)
        server.start()
        return server

    def _sentinel(self, i: int, master_port: int) -> Process:
        path = os.path.join(self._root, f"sentinel{i}")
        os.mkdir(path)
        port = free_port()
        conf = os.path.join(path, "sentinel.conf")
        with open(conf, "w") as fh:
            fh.write(
                f"port {port}\nbind 127.0.0.1\ndir {path}\n"
                f"logfile {os.path.join(path, 'redis.log')}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
        sentinel = Process(port, path, [self._binary, conf, "--sentinel"])
        self.sentinels.append(sentinel)
        sentinel.start()
        return sentinel

    def _ready(self) -> bool:
        replica = self.servers[1].command("INFO", "replication")
        if replica.get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            if not sentinel.command("SENTINEL", "REPLICAS", SERVICE):
                return False
        return True

    def _wait(self, condition: Callable[[], object], message: str) -> Any:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (result := condition()):
            if time.monotonic() > deadline:
                raise TimeoutError(message)
            time.sleep(0.05)  # polling other processes until they agree (bounded)
        return result

    def master_port(self, sentinel: Process | None = None) -> int:
        """The master's port, as `sentinel` (default: the first) names it."""
        asked = sentinel or self.sentinels[0]
        _, port = asked.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def master(self) -> Process:
        port = self.master_port()
        return next(server for server in self.servers if server.port == port)

    def kill_master(self) -> Process:
        """SIGKILL the current master; returns it."""
        master = self.master()
        master.kill()
        return master

    def wait_for_failover(self, old: Process) -> Process:
        """The new master, once every Sentinel names it and it accepts writes."""

        def promoted() -> Process | None:
            ports = {self.master_port(sentinel) for sentinel in self.sentinels}
            if len(ports) != 1 or ports == {old.port}:
                return None
            new = self.master()
            role = new.command("ROLE")[0]
            return new if role in (b"master", "master") else None

        return self._wait(promoted, "no failover")

    def close(self) -> None:
        for process in (*self.sentinels, *self.servers):
            process.stop()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> RedisSentinel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
