"""Faults a production broker meets: a worker killed, a client that never reads."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from support.broker_client import PubSubClient, clients_on_workers
from support.processes import ServerProcess, rss_bytes, serve, worker_pids
from support.waiting import eventually, eventually_sync

from broker import errors
from broker.connection import CloseReceived, Connection, Role
from broker.settings import Settings

KIB = 1024


@pytest.fixture
def broker(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        env={
            "REDWIRE_MAX_SEND_BUFFER_BYTES": str(256 * KIB),
            "REDWIRE_WRITE_BUFFER_HIGH_BYTES": str(64 * KIB),
            "REDWIRE_WRITE_BUFFER_LOW_BYTES": str(16 * KIB),
            "REDWIRE_CLOSE_TIMEOUT_S": "1",
            "REDWIRE_CHANNEL_PREFIX": f"faults{os.getpid()}:",
        },
    )
    yield server
    assert server.stop() == 0


async def test_killed_worker_is_restarted_and_serves_again(broker) -> None:
    before = worker_pids(broker.proc.pid)
    assert set(before) == {"0", "1"}
    os.kill(before["0"], signal.SIGKILL)
    broker.wait_for_output(r"worker 0 restarted pid \d+", timeout_s=20)
    after = eventually_sync(
        lambda: len(worker_pids(broker.proc.pid)) == 2 and worker_pids(broker.proc.pid)
    )
    assert after["0"] != before["0"] and after["1"] == before["1"]
    clients = await clients_on_workers(broker.url, 2)
    for client in clients:
        await client.subscribe("after.restart")
    await clients[0].publish("after.restart", "ok")
    for client in clients:
        assert (await client.next_message())["data"] == "ok"
        await client.close()


def _raw_subscriber(host: str, port: int, topic: str) -> socket.socket:
    """A WebSocket client that subscribes and then never reads (tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    payload = json.dumps({"op": "subscribe", "topic": topic}).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes((0x81, 0x80 | len(payload))) + mask + masked)
    return sock


async def test_slow_consumer_is_closed_1013_and_memory_stays_bounded(broker) -> None:
    fast = await PubSubClient.connect(broker.url)
    await fast.subscribe("firehose")
    slow = await asyncio.to_thread(_raw_subscriber, broker.host, broker.port, "firehose")
    pids = list(worker_pids(broker.proc.pid).values())
    # The slow client's subscribe is in flight: wait until a message reaches `fast` after it.
    publisher = await PubSubClient.connect(broker.url)

    async def subscribed() -> bool:
        _, body = await asyncio.to_thread(_get, broker, "/metrics")
        return _metric_sum(body, "redwire_subscriptions") >= 2

    await eventually(subscribed)
    rss_before = sum(rss_bytes(pid) for pid in pids)
    blob = "x" * (20 * KIB)
    count = 3000  # 60 MB through a client that reads nothing
    for seq in range(count):
        await publisher.publish("firehose", {"seq": seq, "blob": blob})
    for seq in range(count):
        assert (await fast.next_message(timeout_s=30))["data"]["seq"] == seq
    rss_after = sum(rss_bytes(pid) for pid in pids)
    assert rss_after - rss_before < 32 * 1024 * KIB, (rss_before, rss_after)

    async def slow_closed() -> bool:
        _, body = await asyncio.to_thread(_get, broker, "/metrics")
        return _metric_sum(body, "redwire_slow_consumer_closes_total") >= 1

    await eventually(slow_closed, timeout_s=15)
    slow.close()
    await fast.close()
    await publisher.close()


def _get(server: ServerProcess, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{server.host}:{server.port}{path}", timeout=10) as r:
        return r.status, r.read()


def _metric_sum(body: bytes, name: str) -> float:
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _read_until_close(sock: socket.socket, timeout_s: float) -> int | None:
    """Read a raw subscriber's socket (it starts reading now) up to the server's close
    frame; its close code, or None when the stream ended without one."""
    conn = Connection(Role.CLIENT, max_message_bytes=64 * 1024 * KIB)
    sock.settimeout(timeout_s)
    head = b""
    while b"\r\n\r\n" not in head:  # the 101 response, then frames
        chunk = sock.recv(4096)
        if not chunk:
            return None
        head += chunk
    data = head.split(b"\r\n\r\n", 1)[1]
    while True:
        for event in conn.receive_data(data) if data else ():
            if isinstance(event, CloseReceived):
                return event.code
        data = sock.recv(256 * KIB)
        if not data:
            return None


@pytest.fixture
def stall_broker(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        workers=1,
        env={
            "REDWIRE_CLOSE_TIMEOUT_S": "60",  # the stalled readers read again well before
            "REDWIRE_COMPRESSION": "false",
            "REDWIRE_CHANNEL_PREFIX": f"stall{os.getpid()}:",
        },
    )
    yield server
    assert server.stop() == 0


async def test_twenty_stalled_subscribers_under_a_50_mb_burst(stall_broker) -> None:
    broker = stall_broker
    cap = Settings().max_send_buffer_bytes  # the default
    (pid,) = worker_pids(broker.proc.pid).values()
    fast = await PubSubClient.connect(broker.url)
    await fast.subscribe("burst")
    stalled = [
        await asyncio.to_thread(_raw_subscriber, broker.host, broker.port, "burst")
        for _ in range(20)
    ]

    async def subscribed() -> bool:
        _, body = await asyncio.to_thread(_get, broker, "/metrics")
        return _metric_sum(body, "redwire_subscriptions") >= 21

    await eventually(subscribed)
    rss_before = rss_bytes(pid)
    peak = rss_before
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.02)  # sampling the worker's RSS while the burst runs

    sampler = asyncio.ensure_future(sample())
    publisher = await PubSubClient.connect(broker.url)
    blob = "x" * (100 * KIB)
    count = 500  # 50 MB
    for seq in range(count):  # each acked before the next: a burst a reader can follow
        assert (await publisher.publish("burst", {"seq": seq, "blob": blob}))["op"] == "ack"
    for seq in range(count):
        assert (await fast.next_message(timeout_s=60))["data"]["seq"] == seq
    sampling = False
    await sampler
    growth = peak - rss_before
    assert growth <= 20 * cap + 50 * 1024 * KIB, (rss_before, peak)
    codes = await asyncio.gather(*(asyncio.to_thread(_read_until_close, s, 30) for s in stalled))
    assert codes == [errors.CLOSE_TRY_AGAIN_LATER] * 20
    for sock in stalled:
        sock.close()
    await fast.close()
    await publisher.close()
