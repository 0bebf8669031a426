"""`redwire serve` with no Redis configured: the supervisor runs a private one.

One test uses this checkout; the other installs the project into a fresh virtualenv with
`pip install .` first, exactly as the README's first command does on a new machine.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import urllib.request
import venv
from pathlib import Path

from support.broker_client import clients_on_workers
from support.processes import REPO, ServerProcess, redwire, worker_pids


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
        socket_path = Path(line.split("unix://", 1)[1].strip())
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
