"""10,000 WebSocket upgrades from one address against a per-IP cap of 1,000.

A real `redwire serve` (1 worker) and Redis; the flood is raw asyncio sockets from
127.0.0.1, at most 200 handshakes in flight. The first 1,000 get 101 and stay open; every
other one gets 429 with a reason, not a reset or a hang; meanwhile and afterwards the
worker answers /healthz and serves a client from another address (127.0.0.2).
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections import Counter
from collections.abc import Iterator

import pytest
import websockets
from support.processes import ServerProcess, serve

FLOOD = 10_000
CAP = 1_000
IN_FLIGHT = 200
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def capped(redis_server) -> Iterator[ServerProcess]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 1000:  # the test holds CAP sockets open and opens FLOOD in turn
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FLOOD * 2), hard))
    server = serve(
        redis_server.url,
        workers=1,
        env={
            "REDWIRE_MAX_CONNECTIONS_PER_IP": str(CAP),
            "REDWIRE_CHANNEL_PREFIX": "flood:",
            "REDWIRE_LOG_LEVEL": "WARNING",
        },
    )
    yield server
    server.stop()


async def upgrade(port: int, kept: list[asyncio.StreamWriter]) -> int | str:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect: {exc.__class__.__name__}"
    try:
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        writer.close()
        return f"read: {exc.__class__.__name__}"
    status = int(head.split(b" ", 2)[1])
    if status == 101:
        kept.append(writer)  # held open: it keeps its slot
    else:
        writer.close()
    return status


async def healthz(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    writer.close()
    return int(head.split(b" ", 2)[1])


@pytest.mark.timeout(600)  # 10,000 handshakes on a loaded 2-core machine: minutes, not hours
async def test_ten_thousand_from_one_address_against_a_cap_of_a_thousand(
    capped: ServerProcess,
) -> None:
    port = capped.port
    kept: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> int | str:
        async with gate:
            return await upgrade(port, kept)

    try:
        flood = asyncio.gather(*(one() for _ in range(FLOOD)))
        assert await healthz(port) == 200  # answered during the flood
        statuses = Counter(await flood)
        assert statuses == {101: CAP, 429: FLOOD - CAP}, statuses
        assert await healthz(port) == 200
        # Another address is not this one's cap: it connects and is served.
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/", subprotocols=["redwire.json"], local_addr=("127.0.0.2", 0)
        ) as ws:
            assert json.loads(await ws.recv())["op"] == "welcome"
            await ws.send(json.dumps({"op": "ping", "id": 1}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["op"] == "pong"
    finally:
        for writer in kept:
            writer.close()
