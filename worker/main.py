"""Entry point of one worker process: settings from the environment, uvloop, serve, drain.

    python -m worker echo  [--fd N | --host H --port P]
    python -m worker serve [--fd N | --host H --port P --reuse-port] --worker-id ID
                           [--parent-pid PID --lifeline-fd N --owned-dir DIR ...]

Settings come from `REDWIRE_*` variables (the supervisor passes its own settings that way);
`REDWIRE_INSTANCE` (not a setting) is the supervisor start's random id, shown in the log
lines. On SIGTERM or SIGINT the worker drains (close 1001 to every client) and exits 0.
Once listening it prints one line `listening <host> <port>` on stdout, for whoever started it.

Dying with the supervisor. A worker started with `--parent-pid` asks for SIGTERM when its
parent goes (PR_SET_PDEATHSIG, Linux) and then checks that its parent is still that pid
(the supervisor may have died between fork and prctl). `--lifeline-fd` is the read end of a
pipe whose only write end the supervisor holds: EOF on it means the supervisor is gone
(the fallback where prctl is missing). An orphaned worker drains within `ORPHAN_DRAIN_S`,
removes the `--owned-dir` directories (the supervisor's temporary files: nobody else is
left to), and exits; a kernel timer (SIGALRM, default action) ends it if that hangs.

At start the worker raises its RLIMIT_NOFILE soft limit to the hard limit and logs how many
connections that leaves room for; a failure there is logged and the worker goes on. A
`max_connections_per_worker` above that room is lowered to it (logged): the cap answers
503, where the kernel would refuse the accept.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import sys
from collections.abc import Callable

from broker.embedded_redis import load_libc, set_parent_death_signal
from broker.errors import ConfigError
from broker.settings import Settings
from worker.server import Server

log = logging.getLogger("redwire.worker")

INSTANCE_ENV = "REDWIRE_INSTANCE"  # the supervisor start's id (broker/supervisor.py)
ORPHAN_DRAIN_S = 1.0  # drain time left to a worker whose supervisor died
ORPHAN_HARD_EXIT_S = 1.6  # SIGALRM (default action: terminate) after the orphan is noticed
FD_RESERVE = 64  # descriptors kept for Redis, the listener, metrics files, logs
NR_OPEN = "/proc/sys/fs/nr_open"  # the ceiling when the hard limit is unlimited


def install_uvloop() -> bool:
    """Use uvloop when it is installed; the default asyncio loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("mode", choices=("echo", "serve"))
    parser.add_argument("--fd", type=int, help="inherited listening socket")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--worker-id", default="0")
    parser.add_argument("--parent-pid", type=int, help="die with this parent (the supervisor)")
    parser.add_argument("--lifeline-fd", type=int, help="pipe read end: EOF = parent gone")
    parser.add_argument(
        "--owned-dir", action="append", default=[], help="remove this directory if orphaned"
    )
    return parser.parse_args(argv)


def _make_app(mode: str, settings: Settings, worker_id: str):  # type: ignore[no-untyped-def]
    if mode == "echo":
        from worker.echo import EchoApp

        return EchoApp()
    from worker.broker_app import BrokerApp

    return BrokerApp(settings, worker_id=worker_id)


# --- dying with the supervisor ---------------------------------------------------------------


def orphaned(parent_pid: int | None) -> bool:
    """True when we were started by `parent_pid` and it is no longer our parent, or is
    exiting: its main thread (the one that forked us) is gone, a zombie while the rest of
    a killed supervisor's threads go (they may inherit us for that moment)."""
    if parent_pid is None:
        return False
    if os.getppid() != parent_pid:
        return True
    try:
        with open(f"/proc/{parent_pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # no /proc: getppid and the lifeline tell
    return state in ("Z", "X")


def die_with_parent(parent_pid: int | None) -> bool:
    """PR_SET_PDEATHSIG = SIGTERM, then the race check; False if the parent is gone already."""
    if parent_pid is None:
        return True
    load_libc()
    if not set_parent_death_signal(signal.SIGTERM):
        log.info("PR_SET_PDEATHSIG unavailable: watching the lifeline pipe only")
    return not orphaned(parent_pid)


def remove_owned_dirs(directories: list[str]) -> None:
    """Remove the supervisor's temporary directories (every orphaned worker tries)."""
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def watch_lifeline(loop: asyncio.AbstractEventLoop, fd: int, on_gone: Callable[[], None]) -> None:
    """Call `on_gone()` once the pipe's write end (held by the supervisor only) is closed."""

    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the supervisor is gone
            loop.remove_reader(fd)
            on_gone()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


# --- file descriptors ------------------------------------------------------------------------


def raise_fd_limit() -> int | None:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (an unlimited hard limit means
    fs.nr_open); log the connection capacity and return it (descriptors left for client
    connections past those open now and `FD_RESERVE`), None on failure."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard
        if hard == resource.RLIM_INFINITY:
            with open(NR_OPEN) as f:
                target = int(f.read())
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        new_soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError) as exc:
        log.warning("could not raise RLIMIT_NOFILE: %s; going on with the current limit", exc)
        return None
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 0
    capacity = max(0, new_soft - in_use - FD_RESERVE)
    log.info(
        "file descriptors: limit %d (was %d, hard %s); room for about %d connections",
        new_soft, soft, "unlimited" if hard == resource.RLIM_INFINITY else hard, capacity,
    )  # fmt: skip
    return capacity


def cap_connections(settings: Settings, room: int | None) -> Settings:
    """`max_connections_per_worker` no larger than the descriptors leave room for: past
    that the kernel would refuse the accept (the client sees a reset), where the cap
    answers 503 with `Retry-After`. Logged when it lowers the setting; None: unchanged."""
    if room is None:
        return settings
    room = max(1, room)
    wanted = settings.max_connections_per_worker
    if wanted is not None and wanted <= room:
        return settings
    log.warning(
        "max_connections_per_worker %s is more than the file descriptor limit leaves room "
        "for; capped at %d (raise the limit, `ulimit -n` or LimitNOFILE, for more)",
        "unset" if wanted is None else wanted, room,
    )  # fmt: skip
    return settings.replace(max_connections_per_worker=room)


# --- run -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    gone = False

    def parent_gone() -> None:
        """The supervisor is gone: clean up after it, and be gone within ORPHAN_HARD_EXIT_S
        whatever the drain is doing (the kernel's SIGALRM default action ends us)."""
        nonlocal gone
        if gone:
            return
        gone = True
        log.warning("worker %s: the supervisor is gone; exiting", args.worker_id)
        remove_owned_dirs(args.owned_dir)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, ORPHAN_HARD_EXIT_S)
        stop.set()

    def on_signal() -> None:
        # PDEATHSIG (SIGTERM) comes when the supervisor's main thread exits; another of its
        # threads may inherit us for a moment, so the parent's pid alone does not tell.
        if orphaned(args.parent_pid):
            parent_gone()
        stop.set()

    if args.lifeline_fd is not None:
        watch_lifeline(loop, args.lifeline_fd, parent_gone)
    app = _make_app(args.mode, settings, args.worker_id)
    starter = getattr(app, "start", None)
    if starter is not None:
        await starter()
    server = Server(app, settings)
    sock = socket.socket(fileno=args.fd) if args.fd is not None else None
    host, port = await server.start(sock=sock, reuse_port=args.reuse_port)
    # What exists now (modules, settings, the app) lives as long as the worker: move it out of
    # the cyclic collector's generations, so that no full collection walks it again.
    gc.freeze()
    _announce(f"listening {host} {port}")
    log.info("worker %s (%s) listening on %s:%d", args.worker_id, args.mode, host, port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if orphaned(args.parent_pid):  # died while we started (the signal may predate the handler)
        parent_gone()
    await stop.wait()
    if not gone:
        log.info("worker %s draining", args.worker_id)
    await server.drain(ORPHAN_DRAIN_S if gone else None)
    stopper = getattr(app, "stop", None)
    if stopper is not None:
        try:
            await stopper()
        except Exception:
            if not gone:  # orphaned: the metrics directory may be gone already
                raise
    if gone or orphaned(args.parent_pid):  # a drain with no clients ends before the EOF
        remove_owned_dirs(args.owned_dir)  # (and what the last metrics sync wrote)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides = {"host": args.host, "port": args.port}
    settings = Settings.load(overrides=overrides)
    instance = os.environ.get(INSTANCE_ENV, "")
    name = f"worker-{args.worker_id}" + (f"@{instance}" if instance else "")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not die_with_parent(args.parent_pid):
        sys.stderr.write(f"worker {args.worker_id}: the supervisor is gone; not starting\n")
        remove_owned_dirs(args.owned_dir)
        return 1
    settings = cap_connections(settings, raise_fd_limit())
    install_uvloop()
    try:
        return asyncio.run(run(args, settings))
    except ConfigError as exc:
        sys.stderr.write(f"worker {args.worker_id}: {exc}\n")
        return 2


def _announce(line: str) -> None:
    """One status line on stdout, written in one call so other output cannot split it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
