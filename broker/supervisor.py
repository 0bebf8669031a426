"""The supervisor behind `redwire serve`: one listening port, N worker processes.

It reserves the port (a socket bound with SO_REUSEPORT, never listening, so port 0 picks
a free one), starts N `python -m worker serve` processes that each listen on it with
SO_REUSEPORT, and the kernel spreads connections over them. Where SO_REUSEPORT is missing
it listens itself and the workers inherit that one socket. It owns the embedded Redis
(when no `redis_url` is given) and the prometheus multiprocess directory. A worker that
dies is restarted (the event is logged, with backoff if it keeps dying). SIGTERM/SIGINT:
workers get SIGTERM (each sends close 1001 to its clients and drains), stragglers are
killed after `drain_timeout_s`, then the embedded Redis stops and temporary files go.

Lifecycle, when the supervisor itself dies (`kill -9`, OOM): its children go with it.
Each worker gets `--parent-pid` (it sets PR_SET_PDEATHSIG and checks its parent) and
`--lifeline-fd`, the read end of a pipe whose write end only the supervisor holds (EOF =
supervisor gone, the fallback). The embedded redis-server is started with PDEATHSIG
SIGKILL. The supervisor's temporary directories (the embedded Redis' and the metrics one)
are passed as `--owned-dir`: an orphaned worker removes them before it exits. Every child
is started from the main thread, since PDEATHSIG follows the thread that forked.

The port. Before the SO_REUSEPORT socket the supervisor binds the address once WITHOUT
SO_REUSEPORT: that fails while anything else is bound there (another `redwire serve`
included, whose reuse-port sockets would otherwise silently share the traffic), and then
`redwire serve` stops with exit status 2 and says so; so does an address that is not on
this machine. The embedded redis-server is watched like the workers: when it dies it is
started again on the same socket path (logged), and the workers' buses reconnect.

Each start has a random `instance` id (`REDWIRE_INSTANCE` in the workers' environment).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import secrets
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
from broker.settings import Settings, mask_url
from broker.tls import server_context

log = logging.getLogger("redwire.supervisor")

INSTANCE_ENV = "REDWIRE_INSTANCE"  # read by worker/main.py; not a Settings field
REDIS_RESTART_DELAY_S = 0.5  # first delay before restarting a dead embedded redis-server
REDIS_RESTART_MAX_DELAY_S = 10.0


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
        self.instance = secrets.token_hex(4)
        self._lifeline_r, self._lifeline_w = os.pipe()  # both non-inheritable
        self._redis_restarts = 0
        self._redis_started_at = 0.0

    # --- setup -------------------------------------------------------------------------------

    def _open_socket(self) -> None:
        """Claim host:port, or ConfigError when it is taken or not an address of ours."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self.reuse_port:
            # Exclusive first: fails while any other socket is bound to this address.
            with self._bind(family, reuse_port=False) as probe:
                self.port = probe.getsockname()[1]  # port 0: the free one the kernel chose
            self.sock = self._bind(family, reuse_port=True)
        else:
            self.sock = self._bind(family, reuse_port=False)
            self.sock.listen(self.settings.listen_backlog)
            self.sock.set_inheritable(True)
            self.port = self.sock.getsockname()[1]

    def _bind(self, family: int, *, reuse_port: bool) -> socket.socket:
        """A socket bound to (host, port), or ConfigError saying why it cannot be."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(self._bind_error(exc)) from None
        return sock

    def _bind_error(self, exc: OSError) -> str:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, socket.gaierror):
            return f"--host {self.host}: cannot resolve it ({exc.strerror})"
        if exc.errno == errno.EADDRINUSE:
            return (
                f"{where} is already in use by another process (another redwire serve?); "
                "stop it or choose another --port"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"--host {self.host}: not an address of this machine"
        if exc.errno == errno.EACCES:
            return f"{where}: permission denied (ports below 1024 need privileges)"
        return f"cannot listen on {where}: {exc.strerror or exc}"

    def _worker_env(self) -> dict[str, str]:
        env = {**os.environ, **self.settings.to_env()}
        env["REDWIRE_REDIS_URL"] = self.redis_url or "none"
        env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir or ""
        env["PYTHONUNBUFFERED"] = "1"
        env[INSTANCE_ENV] = self.instance
        return env

    def _owned_dirs(self) -> list[str]:
        """Temporary directories of ours that an orphaned worker should remove."""
        owned = [self.redis.directory] if self.redis is not None else []
        if self._own_metrics_dir and self.metrics_dir:
            owned.append(self.metrics_dir)
        return owned

    def _spawn(self, worker: WorkerProcess) -> None:
        argv = [sys.executable, "-m", "worker", "serve", "--worker-id", worker.worker_id]
        argv += ["--parent-pid", str(os.getpid()), "--lifeline-fd", str(self._lifeline_r)]
        for directory in self._owned_dirs():
            argv += ["--owned-dir", directory]
        pass_fds: tuple[int, ...] = (self._lifeline_r,)
        if self.reuse_port:
            argv += ["--host", self.host, "--port", str(self.port), "--reuse-port"]
        else:
            assert self.sock is not None
            argv += ["--fd", str(self.sock.fileno())]
            pass_fds += (self.sock.fileno(),)
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
        server_context(self.settings)  # a bad certificate or key: exit 2 before anything runs
        self._open_socket()  # first: a taken port or a bad --host fails before anything starts
        if self.redis_url is None:
            self.redis = EmbeddedRedis(
                find_redis_server(self.settings.redis_server_path),
                start_timeout_s=self.settings.embedded_redis_start_timeout_s,
            )
            self.redis_url = self.redis.start()
            self._redis_started_at = time.monotonic()
        if self.metrics_dir is None:
            self.metrics_dir = tempfile.mkdtemp(prefix="redwire-metrics-")
            self._own_metrics_dir = True
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
        redis = mask_url(self.redis_url or "")
        where = f"embedded {redis}" if self.redis else redis
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.settings.certfile else "http"
        _announce(f"serving {scheme}://{host}:{self.port}/ with redis {where}")
        log.info(
            "redwire serving on %s:%d with %d worker(s), redis %s, instance %s",
            self.host, self.port, self.count, where, self.instance,
        )  # fmt: skip

    def _watch(self) -> None:
        """Restart what died (from the main thread: PDEATHSIG follows the forking thread)."""
        while not self._stopping.wait(0.2):
            if self.redis is not None and self.redis.exited() is not None:
                self._redis_died(self.redis)
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

    def _redis_died(self, redis: EmbeddedRedis) -> None:
        """Start the embedded redis-server again on the same socket, with backoff if it keeps
        dying; the workers' buses reconnect and resubscribe on their own (empty history:
        the epoch rules of broker/bus/redis.py apply)."""
        assert redis.process is not None
        pid, code = redis.process.pid, redis.process.returncode
        uptime = time.monotonic() - self._redis_started_at
        stable = uptime >= self.settings.worker_stable_after_s
        self._redis_restarts = 0 if stable else self._redis_restarts + 1
        delay = min(
            REDIS_RESTART_DELAY_S * 2 ** min(self._redis_restarts, 5), REDIS_RESTART_MAX_DELAY_S
        )
        log.warning(
            "embedded redis-server (pid %d) exited with %s; restarting it in %.1fs",
            pid, code, delay if self._redis_restarts else 0.0,
        )  # fmt: skip
        if self._stopping.wait(delay if self._redis_restarts else 0):
            return
        try:
            redis.restart()
        except ConfigError as exc:
            log.error("embedded redis-server did not restart: %s", exc)
            return
        self._redis_started_at = time.monotonic()
        assert redis.process is not None
        _announce(f"embedded redis-server restarted pid {redis.process.pid}")

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
        os.close(self._lifeline_w)
        os.close(self._lifeline_r)
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
