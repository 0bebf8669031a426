"""Honest publish outcomes under faults: a publish written to Redis whose reply never came is
BusOutcomeUnknown (it may have run), what was queued behind it and never written is
BusUnavailable, and a retry with the same key after "unknown" lands once, on plain topics too.

Each test owns its redis-server; the reply is lost through a TCP proxy (tests/support).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from support.bus_watch import BusWatch
from support.redis_server import RedisServer
from support.tcp_proxy import TcpProxy, publisher_link
from support.waiting import eventually

from broker.bus import Published
from broker.bus.redis import RedisBus
from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusOutcomeUnknown, BusUnavailable
from broker.settings import Settings

FAST = Settings(
    bus_reconnect_min_s=0.02,
    bus_reconnect_max_s=0.2,
    bus_probe_interval_s=60.0,  # no probes: only what the test sends goes through the proxy
    bus_publish_timeout_s=0.5,
    bus_connect_timeout_s=1.0,
)


def _msg(payload: bytes) -> BusMessage:
    return BusMessage("plain.o", payload, ENCODING_JSON, "test")


@pytest.fixture
async def proxied(server: RedisServer) -> AsyncIterator[tuple[RedisBus, TcpProxy]]:
    async with TcpProxy(server.port) as proxy:
        bus = RedisBus(proxy.url, FAST, "w1")
        bus.wanted_topics = lambda: ["plain.o"]
        await bus.start()
        try:
            yield bus, proxy
        finally:
            await bus.close()


async def test_sent_without_reply_is_unknown_and_queued_behind_is_unavailable(
    proxied: tuple[RedisBus, TcpProxy],
) -> None:
    bus, proxy = proxied
    watch = BusWatch(bus)
    await bus.subscribe(["plain.o"])
    assert await bus.publish(_msg(b"0"), key="k0") == Published()  # EVALSHA: the link is known
    assert proxy.freeze(publisher_link) == 1
    batches = bus.stats()["publish_batches"]
    written = asyncio.ensure_future(bus.publish(_msg(b"1"), key="k1"))

    async def in_flight() -> bool:
        return bus.stats()["publish_batches"] > batches

    await eventually(in_flight, timeout_s=5, interval_s=0.005)
    behind = asyncio.ensure_future(bus.publish(_msg(b"2")))
    with pytest.raises(BusOutcomeUnknown, match="may have run"):
        await written
    with pytest.raises(BusUnavailable, match="not sent"):
        await behind
    await watch.until(lambda: [m.payload for m in watch.messages] == [b"0", b"1"])  # it ran

    retry = await bus.publish(_msg(b"1"), key="k1")  # the same key: safe, lands once
    assert retry == Published(duplicate=True)
    assert await bus.publish(_msg(b"3")) == Published()
    await watch.until(lambda: len(watch.messages) == 3)
    assert [m.payload for m in watch.messages] == [b"0", b"1", b"3"]  # b"2" never sent


async def test_redis_down_is_unavailable_never_unknown(server: RedisServer) -> None:
    bus = RedisBus(server.url, FAST, "w1")
    await bus.start()
    try:
        await asyncio.to_thread(server.stop)
        for _ in range(3):
            with pytest.raises(BusUnavailable):
                await bus.publish(_msg(b"x"), key="down")
        await asyncio.to_thread(server.start)

        async def published() -> bool:
            try:
                return await bus.publish(_msg(b"y"), key="up") == Published()
            except BusUnavailable:
                return False

        assert await eventually(published, timeout_s=5)
    finally:
        await bus.close()


async def test_redis_killed_under_the_fast_path_gives_every_publish_an_outcome(
    server: RedisServer,
) -> None:
    """Once a batch worked, batches are written from callbacks (the publisher's fast path).
    A batch written on the connection of a Redis just killed gets its outcome within the
    bound: unknown (it may have run), never success and never a hang. Once the loss is
    known, publishes are unavailable, never unknown; when Redis is back they land again,
    several queued in one loop turn together."""
    bus = RedisBus(server.url, FAST, "w1")
    await bus.start()
    try:
        for i in range(3):
            assert await bus.publish(_msg(b"%d" % i)) == Published()
        # Killed from this loop turn, not a thread: the bus has not seen the loss yet when
        # the batch is queued, so the fast path writes it on a connection Redis has left.
        server.kill()
        batches = bus.stats()["publish_batches"]
        futures = [bus.publish_nowait(_msg(b"x%d" % i)) for i in range(5)]  # one batch
        bound_s = FAST.bus_publish_timeout_s + FAST.bus_connect_timeout_s + 1
        _, pending = await asyncio.wait(futures, timeout=bound_s)
        assert not pending
        assert bus.stats()["publish_batches"] == batches + 1  # it was written
        for future in futures:
            assert isinstance(future.exception(), BusOutcomeUnknown)  # written: it may have run
        for _ in range(3):
            with pytest.raises(BusUnavailable):
                await bus.publish(_msg(b"y"))
        await asyncio.to_thread(server.start)

        async def published() -> bool:
            try:
                return await bus.publish(_msg(b"z")) == Published()
            except BusUnavailable:
                return False

        assert await eventually(published, timeout_s=5)
        batches = bus.stats()["publish_batches"]
        results = await asyncio.gather(*(bus.publish_nowait(_msg(b"w%d" % i)) for i in range(5)))
        assert results == [Published()] * 5
        assert bus.stats()["publish_batches"] > batches
    finally:
        await bus.close()
