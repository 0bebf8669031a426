"""The Python SDK straight against a real Redis: order under retries, honest outcomes, keys,
bounded buffers, gaps after a killed subscriber connection and a Redis restart, history
topics filled from history without duplicates."""

from __future__ import annotations

import asyncio
import threading

import pytest
from support.redis_server import RedisServer

from broker.bus import Published
from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusOutcomeUnknown, BusUnavailable
from broker.settings import Settings, TopicRule
from client.publisher import AsyncPublisher, Publisher, PublisherFull
from client.subscriber import Gap, Message, Subscriber

HISTORY = Settings(
    topics=(TopicRule(pattern="sdk.*", history_size=100_000),),
    channel_prefix="sdktest:",
    bus_publish_timeout_s=0.2,
)


async def test_publish_many_keeps_order_across_a_redis_stall(redis_url: str) -> None:
    """Keyed batches that time out while Redis is paused are retried in order, once each."""
    async with AsyncPublisher(redis_url, settings=HISTORY, retry_timeout_s=10) as pub:
        first = await pub.publish("sdk.order", -1)
        items = (("sdk.order", n, f"order-{n}") for n in range(5000))
        burst = asyncio.ensure_future(pub.publish_many(items))
        await asyncio.to_thread(redis_url_command, redis_url, "CLIENT", "PAUSE", "500", "WRITE")
        results = await burst
    offsets = [r.offset for r in results]
    assert all(o is not None for o in offsets)
    assert offsets == sorted(offsets), "messages were reordered by the retries"
    assert len(set(offsets)) == 5000, "a retried publish landed twice"
    assert offsets[0] > (first.offset or 0)


def redis_url_command(url: str, *args: str) -> object:
    import redis

    with redis.Redis.from_url(url, socket_timeout=5) as client:
        return client.execute_command(*args)


async def test_outcome_unknown_is_raised_without_a_key_and_retried_with_one(
    redis_url: str,
) -> None:
    plain = HISTORY.replace(bus_connect_timeout_s=0.5)
    async with AsyncPublisher(redis_url, settings=plain, retry_timeout_s=10) as pub:
        assert await pub.publish("plain.k", 0) == Published()
        await asyncio.to_thread(redis_url_command, redis_url, "CLIENT", "PAUSE", "700", "ALL")
        with pytest.raises(BusOutcomeUnknown):
            await pub.publish("plain.k", 1)  # written, no reply in time: the caller decides
        await asyncio.to_thread(redis_url_command, redis_url, "CLIENT", "PAUSE", "700", "ALL")
        keyed = await pub.publish("plain.k", 2, key="k-2")  # retried: it lands once
        assert keyed.offset is None
        again = await pub.publish("plain.k", 2, key="k-2")
        assert again == Published(duplicate=True)
        history = await pub.publish("sdk.k", 3, key="h-3")
        assert await pub.publish("sdk.k", 3, key="h-3") == Published(
            history.offset, history.epoch, duplicate=True
        )


async def test_async_publisher_buffer_is_bounded(redis_url: str) -> None:
    async with AsyncPublisher(redis_url, settings=HISTORY, max_pending=3) as pub:
        futures = [pub.enqueue("sdk.b", n) for n in range(3)]
        with pytest.raises(PublisherFull):
            pub.enqueue("sdk.b", 3)
        waiting = asyncio.ensure_future(pub.publish("sdk.b", 4))  # waits for room
        results = await asyncio.gather(*futures, waiting)
        assert [r.offset for r in results] == [1, 2, 3, 4] and pub.pending == 0
        many = await pub.publish_many(("sdk.b", n) for n in range(10))  # 3 at a time
        assert [r.offset for r in many] == list(range(5, 15))


async def test_closing_gives_every_queued_and_in_flight_publish_an_outcome(
    redis_url: str,
) -> None:
    """Closed while Redis is paused: the chunk being sent may have run (outcome unknown),
    what was still queued was never written (unavailable); no caller waits forever."""
    settings = HISTORY.replace(bus_publish_batch=10, bus_publish_timeout_s=5.0)
    pub = AsyncPublisher(redis_url, settings=settings, retry_timeout_s=10)
    await pub.start()
    await pub.publish("sdk.close", -1)
    await asyncio.to_thread(redis_url_command, redis_url, "CLIENT", "PAUSE", "1500", "ALL")
    futures = [pub.enqueue("sdk.close", n) for n in range(30)]
    await asyncio.sleep(0.2)  # the sender has written the first chunk, no reply yet
    await asyncio.wait_for(pub.close(), 10)
    outcomes = [type(f.exception()) for f in futures]
    assert outcomes == [BusOutcomeUnknown] * 10 + [BusUnavailable] * 20
    assert pub.pending == 0


async def test_a_cancelled_publish_is_not_sent_and_frees_its_room(redis_url: str) -> None:
    settings = HISTORY.replace(bus_publish_timeout_s=5.0)
    async with AsyncPublisher(redis_url, settings=settings, max_pending=50) as pub:
        first = await pub.publish("sdk.cancel", 0)
        await asyncio.to_thread(redis_url_command, redis_url, "CLIENT", "PAUSE", "500", "WRITE")
        futures = [pub.enqueue("sdk.cancel", n) for n in range(1, 41)]
        for future in futures[::2]:
            future.cancel()  # their callers gave up while they were queued or in flight
        kept = await asyncio.gather(*futures[1::2])
        assert pub.pending == 0
        start = (first.offset or 0) + 1  # nothing cancelled took an offset: it was not sent
        assert [r.offset for r in kept] == list(range(start, start + 20))


def test_blocking_publisher_blocks_past_max_pending(redis_url: str) -> None:
    with Publisher(redis_url, settings=HISTORY, max_pending=5) as pub:
        most = 0
        futures = []
        for n in range(200):
            futures.append(pub.publish_nowait("sdk.nb", n))
            with pub._lock:
                most = max(most, len(pub._outstanding))
        pub.flush(timeout_s=30)
        assert most <= 5
        assert [f.result().offset for f in futures] == list(range(1, 201))
        assert threading.current_thread() is not pub._thread


async def test_subscriber_receives_and_reports_overflow_where_it_happened(
    redis_server: RedisServer,
) -> None:
    settings = Settings(channel_prefix="sdktest2:")
    async with Subscriber(redis_server.url, ["plain.t"], settings=settings, max_queue=3) as sub:
        assert sub._bus is not None and sub._bus.healthy
        sub._on_messages([BusMessage("plain.t", b"%d" % n, ENCODING_JSON) for n in range(5)])
        got = [await sub.get(1) for _ in range(4)]
        assert [g.data for g in got[:3] if isinstance(g, Message)] == [0, 1, 2]
        assert isinstance(got[3], Gap) and sub.dropped == 2
        async with AsyncPublisher(redis_server.url, settings=settings) as pub:
            await pub.publish("plain.t", {"live": True})
        assert (await sub.get(5)).data == {"live": True}  # type: ignore[union-attr]


def test_blocking_publisher_batches_and_flushes(redis_server: RedisServer) -> None:
    with Publisher(redis_server.url, settings=HISTORY) as pub:
        futures = [pub.publish_nowait("sdk.sync", n) for n in range(2000)]
        pub.flush(timeout_s=30)
        offsets = [f.result().offset for f in futures]
        assert offsets == list(range(offsets[0], offsets[0] + 2000))
        assert pub.publish("sdk.sync", "last").offset == offsets[-1] + 1


FAST = HISTORY.replace(
    bus_reconnect_min_s=0.3,  # a window in which the killed subscriber is away
    bus_reconnect_max_s=0.5,
    bus_connect_timeout_s=1.0,
    bus_probe_interval_s=60.0,
)


async def _drain(sub: Subscriber, count: int) -> list[Message | Gap]:
    return [await sub.get(5) for _ in range(count)]


async def test_subscriber_after_its_connection_is_killed(redis_url: str) -> None:
    """Plain topic: a Gap. History topic: what it missed, from history, in order, once."""
    async with (
        Subscriber(redis_url, ["plain.s", "sdk.s"], settings=FAST) as sub,
        AsyncPublisher(redis_url, settings=FAST) as pub,
    ):
        await pub.publish("sdk.s", 0)
        await pub.publish("plain.s", "before")
        got = await _drain(sub, 2)
        assert sorted(str(m.data) for m in got if isinstance(m, Message)) == ["0", "before"]
        assert redis_url_command(redis_url, "CLIENT", "KILL", "TYPE", "pubsub")
        for n in range(1, 21):  # while the subscriber is away (and after it is back)
            await pub.publish("sdk.s", n)
        events = []
        while not (
            any(isinstance(e, Gap) for e in events)
            and [e.data for e in events if isinstance(e, Message)] == list(range(1, 21))
        ):
            events.append(await sub.get(5))
        gaps = [e for e in events if isinstance(e, Gap)]
        assert gaps == [Gap(frozenset({"plain.s"}), "bus subscription interrupted")]
        history = [e for e in events if isinstance(e, Message)]
        assert [m.offset for m in history] == list(range(2, 22))  # no duplicate, no hole
        assert sub._bus is not None and sub._bus.stats()["history_reads"] >= 2  # start, repair
        assert sub._bus.stats()["reconnects"] == 1
        await pub.publish("plain.s", "after")
        assert (await sub.get(5)) == Message("plain.s", "after", origin=pub.origin)


async def test_subscriber_after_a_redis_restart_without_persistence() -> None:
    """History lost with Redis: a Gap ends the old epoch, the new one follows from 1."""
    with RedisServer(docker=False) as server:
        async with (
            Subscriber(server.url, ["plain.r", "sdk.r"], settings=FAST) as sub,
            AsyncPublisher(server.url, settings=FAST, retry_timeout_s=10) as pub,
        ):
            old = [await pub.publish("sdk.r", n) for n in range(3)]
            got = await _drain(sub, 3)
            assert [m.offset for m in got if isinstance(m, Message)] == [1, 2, 3]
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            events = [await sub.get(10) for _ in range(2)]
            assert Gap(frozenset({"plain.r"}), "bus subscription interrupted") in events
            ended = next(e for e in events if isinstance(e, Gap) and e.epoch is not None)
            assert (ended.topics, ended.epoch, ended.first, ended.last) == (
                frozenset({"sdk.r"}), old[0].epoch, 4, None,
            )  # fmt: skip
            new = await pub.publish("sdk.r", "new")
            message = await sub.get(5)
            assert isinstance(message, Message) and message.data == "new"
            assert (message.offset, message.epoch) == (new.offset, new.epoch) == (1, new.epoch)
            assert new.epoch != old[0].epoch
