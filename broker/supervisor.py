"""The supervisor behind `redwire serve`: one listening port, N worker processes.

It reserves the port (a socket bound with SO_REUSEPORT, never listening, so port 0 picks
a free one), starts N `python -m worker serve` processes that each listen on it with
SO_REUSEPORT, and the kernel spreads connections over them. Where SO_REUSEPORT is missing
it listens itself and the workers inherit that one socket. It owns the embedded Redis
(when no `redis_url` is given) and the prometheus multiprocess directory. A worker that
dies is restarted (the event is logged, with backoff if it keeps dying). SIGTERM/SIGINT:
workers get SIGTERM (each sends close 1001 to its clients and drains), stragglers are
killed after `drain_timeout_s`, then the embedded Redis stops and temporary files go.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from broker.embedded_redis import EmbeddedRedis, find_redis_server
from broker.errors import ConfigError
from broker.settings import Settings

log = logging.getLogger("redwire.supervisor")


@dataclass
class WorkerProcess:
    worker_id: str
    process: subprocess.Popen[str] | None = None
    started_at: float = 0.0
    restarts: int = 0
    ready: threading.Event = field(default_factory=threading.Event)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.workers or available_cpus()
        self.workers = [WorkerProcess(str(i)) for i in range(self.count)]
        self.redis: EmbeddedRedis | None = None
        self.redis_url = settings.redis_url
        self.metrics_dir = settings.metrics_dir
        self._own_metrics_dir = False
        self.sock: socket.socket | None = None
        self.reuse_port = settings.reuse_port and hasattr(socket, "SO_REUSEPORT")
        self.host = settings.host
        self.port = settings.port
        self._stopping = threading.Event()

    # --- setup -------------------------------------------------------------------------------

    def _open_socket(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.host, self.port))
        if not self.reuse_port:
            sock.listen(self.settings.listen_backlog)
            sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        self.sock = sock

    def _worker_env(self) -> dict[str, str]:
        env = {**os.environ, **self.settings.to_env()}
        env["REDWIRE_REDIS_URL"] = self.redis_url or "none"
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir or ""
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, worker: WorkerProcess) -> None:
        argv = [sys.executable, "-m", "worker", "serve", "--worker-id", worker.worker_id]
        pass_fds: tuple[int, ...] = ()
        if self.reuse_port:
            argv += ["--host", self.host, "--port", str(self.port), "--reuse-port"]
        else:
            assert self.sock is not None
            argv += ["--fd", str(self.sock.fileno())]
            pass_fds = (self.sock.fileno(),)
        worker.ready.clear()
        worker.process = subprocess.Popen(
            argv, env=self._worker_env(), stdout=subprocess.PIPE, text=True, pass_fds=pass_fds
        )
        worker.started_at = time.monotonic()
        threading.Thread(target=self._relay, args=(worker, worker.process), daemon=True).start()

    def _relay(self, worker: WorkerProcess, proc: subprocess.Popen[str]) -> None:
        """Forward a worker's stdout; notice its `listening` line."""
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("listening "):
                worker.ready.set()
                continue
            sys.stdout.write(line)
            sys.stdout.flush()

    # --- run ---------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self._start()
            self._watch()
        finally:
            self._shutdown()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping.set()

    def _start(self) -> None:
        if self.settings.app:
            check_app_importable(self.settings.app)
        if self.redis_url is None:
            self.redis = EmbeddedRedis(
                find_redis_server(self.settings.redis_server_path),
                start_timeout_s=self.settings.embedded_redis_start_timeout_s,
            )
            self.redis_url = self.redis.start()
        if self.metrics_dir is None:
            self.metrics_dir = tempfile.mkdtemp(prefix="redwire-metrics-")
            self._own_metrics_dir = True
        self._open_socket()
        for worker in self.workers:
            self._spawn(worker)
        deadline = time.monotonic() + self.settings.worker_start_timeout_s
        for worker in self.workers:
            while not worker.ready.wait(0.05):
                proc = worker.process
                if proc is not None and proc.poll() is not None:
                    raise ConfigError(
                        f"worker {worker.worker_id} exited with {proc.returncode} while "
                        "starting; its error is above"
                    )
                if time.monotonic() > deadline or self._stopping.is_set():
                    raise ConfigError(f"worker {worker.worker_id} did not start listening")
        _announce(f"listening {self.host} {self.port}")
        log.info(
            "redwire serving on %s:%d with %d worker(s), redis %s",
            self.host, self.port, self.count, "embedded" if self.redis else self.redis_url,
        )  # fmt: skip

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            for worker in self.workers:
                proc = worker.process
                if proc is None or proc.poll() is None:
                    continue
                self._worker_died(worker, proc)

    def _worker_died(self, worker: WorkerProcess, proc: subprocess.Popen[str]) -> None:
        code = proc.returncode
        log.warning(
            "worker %s (pid %d) exited with %s; restarting", worker.worker_id, proc.pid, code
        )
        self._mark_dead(proc.pid)
        uptime = time.monotonic() - worker.started_at
        s = self.settings
        worker.restarts = worker.restarts + 1 if uptime < s.worker_stable_after_s else 0
        delay = min(
            s.worker_restart_delay_s * 2 ** min(worker.restarts, 5), s.worker_restart_max_delay_s
        )
        if self._stopping.wait(delay if worker.restarts > 1 else 0):
            return
        self._spawn(worker)
        assert worker.process is not None
        if worker.ready.wait(s.worker_start_timeout_s):
            _announce(f"worker {worker.worker_id} restarted pid {worker.process.pid}")
        else:
            log.error("restarted worker %s is not listening", worker.worker_id)

    def _mark_dead(self, pid: int) -> None:
        if self.metrics_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)

    def _shutdown(self) -> None:
        procs = [w.process for w in self.workers if w.process is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_s + self.settings.kill_grace_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not drain in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self.sock is not None:
            self.sock.close()
        if self.redis is not None:
            self.redis.stop()
        if self._own_metrics_dir and self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("redwire stopped")


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota
    (a container's limit), at least 1."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count or 1, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count or 1)


def check_app_importable(spec: str) -> None:
    """Fail early, in the supervisor, on an --app whose module cannot be imported."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--app must look like module:object, got {spec!r}")
    if os.getcwd() not in sys.path:  # workers run `python -m worker`: the cwd is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import app module {module_name!r}: {exc}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"app module {module_name!r} has no attribute {attr!r}")


def run_supervisor(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s supervisor %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return Supervisor(settings).run()


def _announce(line: str) -> None:
    """One status line on stdout, written in one call so other output cannot split it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
