"""Real `redwire serve` processes: SIGTERM drains, the example hooks app, a bad --app.

- SIGTERM to the supervisor: every client on every worker gets close 1001 at once, a client
  that never answers the close cannot hold the exit past drain_timeout_s, the supervisor
  exits 0 and leaves the port free.
- `examples/hooks_app.py` (PYTHONPATH=examples, --app hooks_app:Hooks): JWT in `?token=`,
  admin-only `admin.*` topics, the sender's identity stamped into published data.
- `--app` naming a module that does not import stops the start with one clear line.
- The deploy files' health checks (Dockerfile HEALTHCHECK, HAProxy's HTTP/1.0 check)
  against a live broker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from support.broker_client import PubSubClient, clients_on_workers
from support.processes import REPO, ServerProcess, free_port, redwire, serve, worker_pids

DRAIN_S = 3.0
EXIT_MARGIN_S = 4.0  # process start-up and exit on a busy CI machine, well under drain + 2
START_FAIL_TIMEOUT_S = 30.0
SECRET = secrets.token_hex(32)


# --- SIGTERM: drain ---------------------------------------------------------------------------


async def open_silent_client(host: str, port: int) -> tuple[asyncio.StreamReader, Any]:
    """A WebSocket client that completes the handshake and then never sends a byte again,
    so it never answers the server's close frame (RFC 6455 section 7.1.2)."""
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of unmasked, unfragmented server frames (RFC 6455 section 5.2)."""
    frames, pos = [], 0
    while pos + 2 <= len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        frames.append((opcode, data[pos : pos + length]))
        pos += length
    return frames


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on the port (SO_REUSEADDR, as servers do, but no
    SO_REUSEPORT: a worker still listening with SO_REUSEPORT makes this bind fail)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


async def test_sigterm_closes_every_client_1001_and_exits_within_the_drain(redis_server) -> None:
    server = serve(
        redis_server.url,
        env={"REDWIRE_DRAIN_TIMEOUT_S": str(DRAIN_S), "REDWIRE_CHANNEL_PREFIX": "drain:"},
    )
    try:
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2
        clients = await clients_on_workers(server.url, 2)
        clients += [await PubSubClient.connect(server.url) for _ in range(4)]
        for client in clients:
            await client.subscribe("drain.topic")
        silent_reader, silent_writer = await open_silent_client(server.host, server.port)

        started = time.monotonic()
        server.signal(signal.SIGTERM)
        for client in clients:
            code, reason = await asyncio.wait_for(client.closed, DRAIN_S + EXIT_MARGIN_S)
            assert code == 1001, (code, reason)
        closed_s = time.monotonic() - started
        assert closed_s < DRAIN_S, "clients that answer the close should not wait for the drain"

        code = await asyncio.to_thread(server.proc.wait, DRAIN_S + EXIT_MARGIN_S)
        exit_s = time.monotonic() - started
        assert code == 0
        assert exit_s < DRAIN_S + EXIT_MARGIN_S
        output = "".join(server.output)
        assert "did not drain in time" not in output, "a worker was killed, not drained"

        received = await asyncio.wait_for(silent_reader.read(), 5)  # up to the server's FIN
        closes = [payload for opcode, payload in server_frames(received) if opcode == 0x8]
        assert closes and struct.unpack("!H", closes[0][:2])[0] == 1001
        silent_writer.close()

        assert port_is_free(server.port)
        assert not [pid for pid in workers.values() if Path(f"/proc/{pid}").exists()]
    finally:
        server.stop()


# --- the example hooks app --------------------------------------------------------------------


def hooks_env(**extra: str) -> dict[str, str]:
    """PYTHONPATH=examples (relative: workers run in the supervisor's working directory)."""
    path = os.pathsep.join(p for p in ("examples", os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "REDWIRE_CHANNEL_PREFIX": "hooks:", **extra}


@pytest.fixture(scope="module")
def hooks_broker(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        env=hooks_env(HOOKS_JWT_SECRET=SECRET),
        args=["--app", "hooks_app:Hooks"],
    )
    yield server
    assert server.stop() == 0


def token(sub: str, *, admin: bool = False, secret: str = SECRET, exp_in_s: int = 600) -> str:
    now = int(time.time())
    claims = {"sub": sub, "admin": admin, "iat": now, "exp": now + exp_in_s}
    return jwt.encode(claims, secret, algorithm="HS256")


async def connect_as(server: ServerProcess, sub: str, *, admin: bool = False) -> PubSubClient:
    return await PubSubClient.connect(f"{server.url}/ws?token={token(sub, admin=admin)}")


REFUSED = {
    "no token": "",
    "empty token": "?token=",
    "not a JWT": "?token=not.a.jwt",
    "wrong secret": "?token=" + token("alice", secret=secrets.token_hex(32)),
    "expired": "?token=" + token("alice", exp_in_s=-60),
}


@pytest.mark.parametrize("query", list(REFUSED.values()), ids=list(REFUSED))
async def test_connection_without_a_valid_token_gets_401(hooks_broker, query: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{hooks_broker.url}/ws{query}")
    assert refused.value.response.status_code == 401
    assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_published_data_carries_the_senders_identity(hooks_broker) -> None:
    alice = await connect_as(hooks_broker, "alice")
    bob = await connect_as(hooks_broker, "bob")
    for client in (alice, bob):
        await client.subscribe("chat")
    reply = await alice.publish("chat", {"text": "hi", "identity": "mallory"})
    assert reply["op"] == "ack", reply
    await alice.publish("chat", "plain")
    for client in (alice, bob):
        first, second = await client.next_message(), await client.next_message()
        assert first["data"] == {"text": "hi", "identity": "alice"}  # not forgeable
        assert second["data"] == {"identity": "alice", "value": "plain"}
    for client in (alice, bob):
        await client.close()


async def test_admin_topics_are_forbidden_to_non_admins(hooks_broker) -> None:
    admin = await connect_as(hooks_broker, "root", admin=True)
    user = await connect_as(hooks_broker, "alice")
    denied = await user.request(op="subscribe", topic="admin.x")
    assert denied["op"] == "error" and denied["code"] == "forbidden", denied
    denied = await user.request(op="publish", topic="admin.x", data="let me in")
    assert denied["op"] == "error" and denied["code"] == "forbidden", denied
    assert (await user.request(op="ping"))["op"] == "pong"  # the connection stays open

    await admin.subscribe("admin.x")
    assert (await admin.publish("admin.x", {"cmd": "reload"}))["op"] == "ack"
    message = await admin.next_message()
    assert message["data"] == {"cmd": "reload", "identity": "root"}
    # The refused publish never reached the bus: the admin's own message is the only one.
    assert (await admin.request(op="ping"))["op"] == "pong"
    assert admin.messages.empty()
    await admin.close()
    await user.close()


# --- a bad --app ------------------------------------------------------------------------------


def serve_expecting_failure(redis_url: str, *args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run `redwire serve` that should refuse to start; its exit status and all its output."""
    started = time.monotonic()
    done = subprocess.run(
        redwire(
            "serve", "--host", "127.0.0.1", "--port", str(free_port()), "--workers", "2",
            "--redis", redis_url, *args,
        ),
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=START_FAIL_TIMEOUT_S,
    )  # fmt: skip
    assert time.monotonic() - started < START_FAIL_TIMEOUT_S / 2, "it should fail fast"
    return done.returncode, done.stdout + done.stderr


def test_app_module_that_does_not_import_stops_the_start(redis_server) -> None:
    code, output = serve_expecting_failure(
        redis_server.url, "--app", "no_such_hooks_module:Hooks", env=hooks_env()
    )
    assert code == 2
    assert "cannot import app module 'no_such_hooks_module'" in output
    assert "Traceback" not in output
    assert "listening" not in output and "restarting" not in output  # no worker was run


def test_app_object_missing_from_its_module_stops_the_start(redis_server) -> None:
    code, output = serve_expecting_failure(
        redis_server.url, "--app", "hooks_app:NoSuchHooks", env=hooks_env(HOOKS_JWT_SECRET=SECRET)
    )
    assert code == 2
    assert "has no attribute 'NoSuchHooks'" in output
    assert "Traceback" not in output


def test_hooks_without_their_secret_stop_the_start_with_the_reason(redis_server) -> None:
    env = hooks_env(HOOKS_JWT_SECRET="too short")
    code, output = serve_expecting_failure(redis_server.url, "--app", "hooks_app:Hooks", env=env)
    assert code == 2
    assert "HOOKS_JWT_SECRET must be set" in output
    assert "restarting" not in output  # the start failed once; no restart loop


# --- the deploy files' health checks against a live broker -----------------------------------


def dockerfile_healthcheck() -> list[str]:
    text = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK ")]
    return json.loads(line.partition(" CMD ")[2])


def test_dockerfile_healthcheck_passes_on_a_live_broker_only(hooks_broker) -> None:
    argv = dockerfile_healthcheck()
    code = argv[2]
    assert ":8765/" in code
    live = [
        "python", "-c", code.replace(":8765/", f":{hooks_broker.port}/"),
    ]  # fmt: skip
    assert subprocess.run(live, capture_output=True, timeout=30).returncode == 0
    dead = ["python", "-c", code.replace(":8765/", f":{free_port()}/")]
    assert subprocess.run(dead, capture_output=True, timeout=30).returncode != 0


def test_haproxy_http10_health_check_gets_200(hooks_broker) -> None:
    # `option httpchk GET /healthz` sends exactly this: HTTP/1.0, no Host header.
    with socket.create_connection((hooks_broker.host, hooks_broker.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body)["status"] == "ok"
