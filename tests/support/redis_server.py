"""A real Redis for tests: a testcontainers container when Docker answers, else `redis-server`.

Never the machine's own Redis: the binary runs on a free loopback port (and a Unix socket in
a private directory), keeps nothing on disk, and can be stopped, killed and started again on
the same port, which is what the fault tests need.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from support.processes import free_port

DOCKER_CHECK_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
IMAGE = "redis:7-alpine"


def docker_available(timeout_s: float = DOCKER_CHECK_TIMEOUT_S) -> bool:
    """True when a Docker engine answers a ping within `timeout_s`."""
    try:
        import docker

        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def ping(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when a Redis answers PING (inline command) on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One Redis server for tests. `url` (TCP), `unix_url` (binary mode only), `port`."""

    def __init__(self, *, docker: bool | None = None) -> None:
        self.use_docker = docker_available() if docker is None else docker
        self.port = free_port()
        self.host = "127.0.0.1"
        self._dir = tempfile.mkdtemp(prefix="redwire-redis-")
        self.unix_path: str | None = None if self.use_docker else f"{self._dir}/redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self._container: Any = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def unix_url(self) -> str | None:
        return None if self.unix_path is None else f"unix://{self.unix_path}"

    @property
    def running(self) -> bool:
        if self.use_docker:
            return self._container is not None and ping(self.host, self.port)
        return self.proc is not None and self.proc.poll() is None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start (again) on the same port; returns once it answers PING."""
        if self.use_docker:
            self._start_container()
        else:
            self._start_binary()
        self._wait_ready()

    def stop(self) -> None:
        """SIGTERM (docker: `docker stop`), then wait for the exit."""
        if self.use_docker:
            if self._container is not None:
                self._container.get_wrapped_container().stop(timeout=int(STOP_TIMEOUT_S))
            return
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL, then wait for the exit."""
        if self.use_docker:
            if self._container is not None:
                self._container.get_wrapped_container().kill()
            return
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop for good and remove what was made for it."""
        if self.use_docker:
            if self._container is not None:
                self._container.stop()
                self._container = None
        else:
            self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- a blocking client for assertions --------------------------------------------------

    def command(self, *args: str | bytes | int) -> Any:
        """Run one command on a fresh connection and return redis-py's parsed reply."""
        import redis

        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            return client.execute_command(*args)

    def flushall(self) -> None:
        self.command("FLUSHALL")

    # --- internals -------------------------------------------------------------------------

    def _start_binary(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: apt-get install -y redis-server"
        if self.proc is not None and self.proc.poll() is None:
            return
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--unixsocket", str(self.unix_path),
            "--unixsocketperm", "700",
            "--logfile", f"{self._dir}/redis.log",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )

    def _start_container(self) -> None:
        if self._container is None:
            from testcontainers.community.redis import RedisContainer

            container = RedisContainer(IMAGE).with_bind_ports(6379, self.port)
            container.with_command("redis-server --save '' --appendonly no")
            self._container = container.start()
            self.host = container.get_container_host_ip()
        else:
            self._container.get_wrapped_container().start()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            if ping(self.host, self.port):
                return
            time.sleep(0.02)  # polling another process until it answers (bounded)
        log = ""
        if not self.use_docker and os.path.exists(f"{self._dir}/redis.log"):
            with open(f"{self._dir}/redis.log") as fh:
                log = fh.read()[-2000:]
        raise RuntimeError(f"Redis did not answer PING on port {self.port}\n{log}")
