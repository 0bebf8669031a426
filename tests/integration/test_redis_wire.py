"""RespWire (broker/bus/redis_wire.py): a connected redis-py connection's replies, parsed by
hiredis in our own protocol, against a real Redis; and what it does with bytes a Redis would
never send (a scripted peer on loopback), with a reply its owner cannot take, and with a
stray reply on the bus' publisher connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from broker.bus.redis import RedisBus
from broker.bus.redis_wire import RespWire
from broker.envelope import ENCODING_JSON, BusMessage
from broker.settings import Settings


class Replies:
    """Every reply a wire handed over, and the size of each hand-over."""

    def __init__(self) -> None:
        self.replies: list[Any] = []
        self.handovers: list[int] = []
        self.arrived = asyncio.Event()

    def __call__(self, replies: list[Any]) -> None:
        self.replies.extend(replies)
        self.handovers.append(len(replies))
        self.arrived.set()

    async def wait_for(self, count: int) -> list[Any]:
        async with asyncio.timeout(5.0):
            while len(self.replies) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.replies


async def connected(url: str) -> Connection:
    conn = aredis.Redis.from_url(url).connection_pool.make_connection()
    await conn.connect()
    return conn


async def test_replies_come_in_order_with_redis_errors_as_objects(redis_url: str) -> None:
    conn = await connected(redis_url)
    got = Replies()
    wire = RespWire.take(conn, got)
    wire.write(
        conn.pack_commands(
            [
                ("SET", "k", "v"),
                ("GET", "k"),
                ("EVALSHA", "0" * 40, 0),  # no such script: NOSCRIPT
                ("INCR", "k"),  # not an integer: a plain ResponseError
                ("RPUSH", "l", "a", "b"),
                ("LRANGE", "l", 0, -1),
            ]
        )
    )
    replies = await got.wait_for(6)
    assert replies[0] == b"OK"
    assert replies[1] == b"v"
    assert isinstance(replies[2], NoScriptError)
    assert type(replies[3]) is ResponseError and "not an integer" in str(replies[3])
    assert replies[4] == 2
    assert replies[5] == [b"a", b"b"]
    assert wire.is_open
    wire.close()
    assert wire.closed.done() and wire.closed.exception() is None
    await conn.disconnect(nowait=True)


async def test_a_reply_split_over_many_reads_is_handed_over_once(redis_url: str) -> None:
    big = b"x" * (3 * 1024 * 1024)  # far more than one read
    setter = aredis.Redis.from_url(redis_url)
    await setter.set("big", big)
    await setter.aclose()
    conn = await connected(redis_url)
    got = Replies()
    wire = RespWire.take(conn, got)
    wire.write(conn.pack_commands([("GET", "big"), ("PING",)]))
    replies = await got.wait_for(2)
    assert replies == [big, b"PONG"]
    wire.close()
    await conn.disconnect(nowait=True)


async def test_redis_closing_the_connection_fails_closed(redis_url: str) -> None:
    conn = await connected(redis_url)
    got = Replies()
    wire = RespWire.take(conn, got)
    wire.write(conn.pack_commands([("CLIENT", "ID")]))
    (client_id,) = await got.wait_for(1)
    killer = aredis.Redis.from_url(redis_url)
    await killer.client_kill_filter(_id=client_id)
    await killer.aclose()
    async with asyncio.timeout(5):
        with pytest.raises(RedisConnectionError):
            await wire.closed
    with pytest.raises(RedisConnectionError):
        wire.write(conn.pack_commands([("PING",)]))  # a closed wire takes no more
    await conn.disconnect(nowait=True)


async def test_an_owner_that_cannot_take_a_reply_aborts_the_connection(redis_url: str) -> None:
    conn = await connected(redis_url)

    def broken(replies: list[Any]) -> None:
        raise ValueError("owner bug")

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        wire = RespWire.take(conn, broken)
        wire.write(conn.pack_commands([("PING",)]))
        async with asyncio.timeout(5):
            with pytest.raises(RedisConnectionError, match="owner bug"):
                await wire.closed
    finally:
        loop.set_exception_handler(None)
    assert any(isinstance(c.get("exception"), ValueError) for c in errors)  # logged, not lost
    await conn.disconnect(nowait=True)


async def test_bytes_that_are_not_resp_close_the_wire() -> None:
    """A peer answering garbage (a wrong port, a proxy's HTML page): the wire fails with
    RedisConnectionError instead of handing anything over."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # +OK to what redis-py sends as it connects (CLIENT SETINFO ...), garbage to PING.
        while chunk := await reader.read(65536):
            if b"PING" in chunk:
                writer.write(b"!not resp at all\r\n")
            else:
                commands = chunk.count(b"\r\n*") + chunk.startswith(b"*")
                writer.write(b"+OK\r\n" * commands)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = Connection(host="127.0.0.1", port=port, protocol=2)
    await conn.connect()
    got = Replies()
    wire = RespWire.take(conn, got)
    wire.write(conn.pack_commands([("PING",)]))
    async with asyncio.timeout(5):
        with pytest.raises(RedisConnectionError, match="not RESP"):
            await wire.closed
    assert got.replies == []
    await conn.disconnect(nowait=True)
    server.close()
    await server.wait_closed()


async def test_a_stray_reply_on_the_publisher_connection_reconnects_and_loses_nothing(
    redis_url: str,
) -> None:
    """A reply when no batch waits for one means the connection is not what we think (here a
    reply injected by hand): the publisher drops it, and the next publish reconnects."""
    bus = RedisBus(redis_url, Settings(bus_probe_interval_s=3600.0), origin="wire-test")
    await bus.start()
    try:
        message = BusMessage("t.wire", b'"one"', ENCODING_JSON, "wire-test")
        await bus.publish(message)
        publisher = bus._publisher
        first = publisher._wire
        assert first is not None and first.is_open
        first.data_received(b"+OK\r\n")  # as if Redis sent a reply nobody asked for
        assert not first.is_open
        await bus.publish(BusMessage("t.wire", b'"two"', ENCODING_JSON, "wire-test"))
        assert publisher._wire is not None and publisher._wire is not first
        assert publisher._wire.is_open
    finally:
        await bus.close()


async def test_settled_is_told_as_the_reply_is_read_before_any_done_callback(
    redis_url: str,
) -> None:
    """`publish_nowait(settled=...)`: the Redis bus calls it from the reply's read, with the
    future already done, one loop turn before the future's done callbacks."""
    bus = RedisBus(redis_url, Settings(bus_probe_interval_s=3600.0), origin="wire-test")
    await bus.start()
    try:
        order: list[tuple[str, bool]] = []
        future = bus.publish_nowait(
            BusMessage("t.wire", b'"x"', ENCODING_JSON, "wire-test"),
            settled=lambda done: order.append(("settled", done.done())),
        )
        future.add_done_callback(lambda done: order.append(("callback", done.done())))
        await future
        assert order == [("settled", True), ("callback", True)]
    finally:
        await bus.close()
