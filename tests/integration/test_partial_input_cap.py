"""A worker's partial input is capped: half-sent messages cannot pile up without bound.

`max_partial_input_bytes_per_worker` bounds what all of a worker's WebSockets hold for
frames and messages not complete yet. Real `redwire serve` (1 worker), a real Redis, raw
sockets sending half of a large frame and stalling, and the `websockets` library as the
unrelated client that must keep working.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import websockets
from support.processes import serve

CAP = 2 * 1024 * 1024
COUNTED = b'redwire_partial_input_closes_total{worker="0"} 1.0'
HALF = 700 * 1024  # what each stalled client sends of its 1,000,000-byte frame

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def stalled_sender(port: int) -> socket.socket:
    """A WebSocket that sends HALF bytes of a 1,000,000-byte binary frame, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    # the welcome frame may follow the 101 in the same read: it is read by close_code_of
    sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1_000_000) + os.urandom(4))
    sock.sendall(os.urandom(HALF))
    return sock


def close_code_of(sock: socket.socket, timeout_s: float) -> int | None:
    """The code of the close frame the server sends, None if the connection stays open."""
    sock.settimeout(0.5)
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    at = data.find(b"\x88")
    while at >= 0:
        length = data[at + 1] & 0x7F
        if 2 <= length <= 125 and len(data) >= at + 4:
            return struct.unpack("!H", data[at + 2 : at + 4])[0]
        at = data.find(b"\x88", at + 1)
    return None


async def test_a_worker_closes_the_connection_that_passes_its_partial_input_cap(
    redis_server,
) -> None:
    server = serve(
        redis_server.url,
        workers=1,
        env={
            "REDWIRE_MAX_PARTIAL_INPUT_BYTES_PER_WORKER": str(CAP),
            "REDWIRE_CHANNEL_PREFIX": "partial:",
        },
    )
    stalled = []
    try:
        stalled = [stalled_sender(server.port) for _ in range(2)]  # 1.4 MiB held: under
        third = stalled_sender(server.port)  # 2.1 MiB would be held: over the cap
        stalled.append(third)
        assert close_code_of(third, 15) == 1013
        for sock in stalled[:2]:  # the first two are still open (and still holding)
            assert close_code_of(sock, 1) is None
        # An unrelated client on the same worker is served as usual.
        async with websockets.connect(server.url, subprotocols=["redwire.json"]) as ws:
            assert json.loads(await ws.recv())["op"] == "welcome"
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "topic": "partial.t"}))
            assert json.loads(await ws.recv())["op"] == "ack"
        metrics = _get(server.port, "/metrics")
        assert COUNTED in metrics
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


def _get(port: int, path: str) -> bytes:
    """GET `path`; for /metrics, again until the close is counted (the metrics sync runs
    once a second), for at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if COUNTED in data or time.monotonic() > deadline:
            return data
        time.sleep(0.2)  # polling /metrics (synced once a second), within the deadline
