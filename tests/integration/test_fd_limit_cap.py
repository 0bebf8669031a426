"""A worker whose file descriptor limit leaves less room than `max_connections_per_worker`.

A real `redwire serve` (1 worker) started under `ulimit -n 200`, so the default cap (10,000)
cannot be reached: the worker logs that it lowered the cap to the room it has, and clients
past that room get 503 with `Retry-After`, not a reset or a hang, while those admitted
stay open and the worker goes on answering /healthz.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest
from support.processes import ServerProcess, redwire

FD_LIMIT = 200
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
def limited(redis_server) -> Iterator[ServerProcess]:
    argv = redwire(
        "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "1",
        "--redis", redis_server.url,
    )  # fmt: skip
    server = ServerProcess(
        ["sh", "-c", f'ulimit -n {FD_LIMIT} && exec "$@"', "sh", *argv],
        env={"REDWIRE_CHANNEL_PREFIX": "fdcap:", "REDWIRE_LOG_LEVEL": "WARNING"},
    )
    yield server
    server.stop()


async def upgrade(port: int) -> tuple[int | str, asyncio.StreamWriter | None, bytes]:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect: {exc.__class__.__name__}", None, b""
    try:
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        writer.close()
        return f"read: {exc.__class__.__name__}", None, b""
    status = int(head.split(b" ", 2)[1])
    if status == 101:
        return status, writer, head  # kept open: it holds its slot
    writer.close()
    return status, None, head


async def healthz(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_cap_lowered_to_the_descriptors_room(limited: ServerProcess) -> None:
    line = limited.wait_for_output(r"max_connections_per_worker 10000 .* capped at \d+")
    match = re.search(r"capped at (\d+)", line)
    assert match is not None
    room = int(match.group(1))
    assert 0 < room < FD_LIMIT
    kept: list[asyncio.StreamWriter] = []
    try:
        outcomes: list[int | str] = []
        for _ in range(room + 20):  # one at a time: each admitted one holds its slot
            status, writer, head = await upgrade(limited.port)
            outcomes.append(status)
            if writer is not None:
                kept.append(writer)
            elif status == 503:
                assert b"retry-after: 1" in head.lower()
        assert outcomes[:room] == [101] * room
        assert outcomes[room:] == [503] * 20  # refused by the cap, not by the kernel
        assert (await healthz(limited.port)).startswith(b"HTTP/1.1 200")
    finally:
        for writer in kept:
            writer.close()
