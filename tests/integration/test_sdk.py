"""The Python SDK straight against a real Redis: order under retries, gaps, round trips."""

from __future__ import annotations

import asyncio

from support.redis_server import RedisServer

from broker.envelope import ENCODING_JSON, BusMessage
from broker.settings import Settings, TopicRule
from client.publisher import AsyncPublisher, Publisher
from client.subscriber import Gap, Message, Subscriber

HISTORY = Settings(
    topics=(TopicRule(pattern="sdk.*", history_size=100_000),),
    channel_prefix="sdktest:",
    bus_publish_timeout_s=0.2,
)


async def test_publish_many_keeps_order_across_a_redis_stall(redis_server: RedisServer) -> None:
    """Batches that time out while Redis is paused are retried in order, not shuffled."""
    async with AsyncPublisher(redis_server.url, settings=HISTORY, retry_timeout_s=10) as pub:
        first = await pub.publish("sdk.order", -1)
        burst = asyncio.ensure_future(pub.publish_many(("sdk.order", n) for n in range(5000)))
        await asyncio.to_thread(redis_server.command, "CLIENT", "PAUSE", "500", "WRITE")
        results = await burst
    offsets = [r.offset for r in results]
    assert all(o is not None for o in offsets)
    assert offsets == sorted(offsets), "messages were reordered by the retries"
    assert offsets[0] > (first.offset or 0)


async def test_subscriber_receives_and_reports_overflow_where_it_happened(
    redis_server: RedisServer,
) -> None:
    settings = Settings(channel_prefix="sdktest2:")
    async with Subscriber(redis_server.url, ["plain.t"], settings=settings, max_queue=3) as sub:
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
