"""One connection's input is handled in slices (worker/protocol.py, Fairness): nothing of a
burst is lost, reordered or left behind an EOF, and other clients are served meanwhile.

Real `redwire serve` (1 worker, tiny slices so that every burst is cut many times), a real
Redis, raw sockets writing a whole burst in one `sendall`, and `websockets` as the
unrelated client.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import Iterator

import pytest
import websockets
from support.processes import ServerProcess, serve

BURST = 3000

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def masked(opcode: int, payload: bytes) -> bytes:
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    return bytes([0x80 | opcode]) + length + key + body


def read_frames(sock: socket.socket) -> Iterator[tuple[int, bytes]]:
    """Server frames (unmasked) until the connection ends."""
    buf = b""
    while True:
        while True:
            if len(buf) >= 2:
                n, at = buf[1] & 0x7F, 2
                if n == 126 and len(buf) >= 4:
                    n, at = struct.unpack("!H", buf[2:4])[0], 4
                elif n == 127 and len(buf) >= 10:
                    n, at = struct.unpack("!Q", buf[2:10])[0], 10
                if n < 126 or at > 2:
                    if len(buf) >= at + n:
                        yield buf[0] & 0x0F, buf[at : at + n]
                        buf = buf[at + n :]
                        continue
            break
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk


@pytest.fixture(scope="module")
def sliced(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        workers=1,
        env={
            "REDWIRE_READ_SLICE_BYTES": "1024",
            "REDWIRE_READ_SLICE_MESSAGES": "7",
            "REDWIRE_CHANNEL_PREFIX": "slices:",
        },
    )
    yield server
    server.stop()


def burst_connection(port: int) -> tuple[socket.socket, Iterator[tuple[int, bytes]]]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    frames = read_frames(sock)
    _, welcome = next(frames)
    assert json.loads(welcome)["op"] == "welcome"
    return sock, frames


@pytest.mark.parametrize("ending", ["close-frame", "eof"])
def test_a_burst_is_answered_whole_and_in_order_before_the_end(
    sliced: ServerProcess, ending: str
) -> None:
    sock, frames = burst_connection(sliced.port)
    burst = b"".join(masked(1, json.dumps({"op": "ping", "id": i}).encode()) for i in range(BURST))
    if ending == "close-frame":
        burst += masked(8, struct.pack("!H", 1000))
    sock.sendall(burst)
    if ending == "eof":
        sock.shutdown(socket.SHUT_WR)  # the EOF arrives behind the whole burst
    ids = []
    close_code = None
    for opcode, payload in frames:
        if opcode == 1:
            reply = json.loads(payload)
            assert reply["op"] == "pong"
            ids.append(reply["id"])
        elif opcode == 8:
            close_code = struct.unpack("!H", payload[:2])[0]
            if ending == "close-frame":
                break
    sock.close()
    # Every request before the end was handled, in order, and answered before the socket
    # closed; a close frame is answered 1000 (after an EOF there is nobody to close with).
    assert ids == list(range(BURST))
    assert close_code == (1000 if ending == "close-frame" else None)


async def test_others_are_served_while_one_connection_floods(sliced: ServerProcess) -> None:
    sock, frames = burst_connection(sliced.port)
    flood = b"".join(
        masked(1, json.dumps({"op": "publish", "id": i, "topic": "slices.flood",
                              "data": i}).encode())
        for i in range(BURST)
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    writer = loop.run_in_executor(None, sock.sendall, flood)
    try:
        async with websockets.connect(sliced.url, subprotocols=["redwire.json"]) as ws:
            assert json.loads(await ws.recv())["op"] == "welcome"
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "topic": "slices.calm"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["op"] == "ack"
            await ws.send(json.dumps({"op": "publish", "id": 2, "topic": "slices.calm",
                                      "data": "hi"}))  # fmt: skip
            seen = {json.loads(await asyncio.wait_for(ws.recv(), 30))["op"] for _ in range(2)}
            assert seen == {"ack", "message"}
        await writer
        acks = 0
        for _, payload in frames:
            reply = json.loads(payload)
            assert reply["op"] in ("ack", "error"), reply
            if reply["op"] == "error":
                assert reply["code"] == "rate_limited"
            acks += 1
            if acks == BURST:
                break
        assert acks == BURST  # every publish of the flood was answered
    finally:
        sock.close()
