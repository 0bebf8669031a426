"""One contract for every bus: MemoryBus, and RedisBus over TCP and over a Unix socket.

The Redis variants run against a real server (the `redis_server` fixture). A publication is
known to be delivered at most once by a *fence*: a last message on the same topic, after
which, order being kept, nothing older can still arrive.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aredis
from support.redis_server import RedisServer

from broker.bus import STATS_KEYS, Bus, make_bus
from broker.bus.memory import MemoryBus, MemoryNetwork
from broker.bus.redis import RedisBus
from broker.envelope import ENCODING_JSON, ENCODING_MSGPACK, BusMessage, msgpack_dumps, pack
from broker.settings import Settings

WAIT_S = 5.0
# No idle probes during a contract test: they would add publish batches of their own.
SETTINGS = Settings(bus_probe_interval_s=60.0, bus_connect_timeout_s=3.0)


class Inbox:
    """Collects what a bus delivers; tests wait on it with a deadline."""

    def __init__(self, bus: Bus) -> None:
        self.messages: list[BusMessage] = []
        self.batches: list[int] = []
        self._changed = asyncio.Event()
        bus.on_messages = self._on_messages

    def _on_messages(self, batch: list[BusMessage]) -> None:
        self.batches.append(len(batch))
        self.messages.extend(batch)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def fence(self, publisher: Bus, topic: str) -> list[BusMessage]:
        """Publish a marker on `topic`, wait for it, return what came before it."""
        return (await fence(publisher, topic, self))[0]

    async def until_marker(self, marker: bytes) -> list[BusMessage]:
        await self.wait_for(lambda: any(m.payload == marker for m in self.messages))
        index = next(i for i, m in enumerate(self.messages) if m.payload == marker)
        before, self.messages = self.messages[:index], self.messages[index + 1 :]
        return before


async def fence(publisher: Bus, topic: str, *inboxes: Inbox) -> list[list[BusMessage]]:
    """One marker on `topic`; for each inbox, what it received before the marker."""
    marker = uuid.uuid4().hex.encode()
    await publisher.publish(BusMessage(topic, marker, ENCODING_JSON, "fence"))
    return [await inbox.until_marker(marker) for inbox in inboxes]


@dataclass
class Harness:
    kind: str
    url: str | None
    network: MemoryNetwork = field(default_factory=MemoryNetwork)
    buses: list[Bus] = field(default_factory=list)

    @property
    def is_redis(self) -> bool:
        return self.url is not None

    async def bus(self, origin: str = "w1", **overrides: Any) -> Bus:
        settings = SETTINGS.replace(**overrides)
        if self.url is None:
            bus: Bus = MemoryBus(origin, self.network)
        else:
            bus = make_bus(settings.replace(redis_url=self.url), origin)
            assert isinstance(bus, RedisBus)
        self.buses.append(bus)
        await bus.start()
        assert bus.healthy
        return bus

    def redis(self) -> aredis.Redis:
        assert self.url is not None
        return aredis.from_url(self.url)


@pytest.fixture(scope="module")
def unix_redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A Unix-socket URL: the session server's, or (Docker mode) a private redis-server's."""
    if redis_server.unix_url is not None:
        yield redis_server.unix_url
        return
    with RedisServer(docker=False) as server:
        assert server.unix_url is not None
        yield server.unix_url


async def _harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind = request.param
    url = None
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
    elif kind == "redis-unix":
        request.getfixturevalue("redis_url")  # empties the session server
        url = request.getfixturevalue("unix_redis_url")
    h = Harness(kind, url)
    yield h
    for bus in h.buses:
        await bus.close()


@pytest.fixture(params=["memory", "redis", "redis-unix"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async for h in _harness(request):
        yield h


@pytest.fixture(params=["redis", "redis-unix"])
async def redis_harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async for h in _harness(request):
        yield h


async def _topic_channels(h: Harness) -> set[bytes]:
    async with h.redis() as r:
        return set(await r.pubsub_channels(SETTINGS.channel_prefix + "t:*"))


# --- the contract ------------------------------------------------------------------------------


async def test_subscribe_then_publish_delivers_once_in_order_untouched(harness: Harness) -> None:
    bus = await harness.bus()
    inbox = Inbox(bus)
    await bus.subscribe(["room"])
    sent = [
        BusMessage("room", b'{"n":%d}' % i, ENCODING_JSON, "w1")
        if i % 2
        else BusMessage("room", msgpack_dumps({"n": i, "raw": bytes(range(256))}), ENCODING_MSGPACK)
        for i in range(200)
    ]
    for message in sent:
        assert (await bus.publish(message)).offset is None
    received = await inbox.fence(bus, "room")
    assert received == sent
    assert all(type(m.payload) is bytes for m in received)


async def test_two_buses_on_one_bus_network_both_receive(harness: Harness) -> None:
    a, b, publisher = [await harness.bus(name) for name in ("w1", "w2", "w3")]
    inbox_a, inbox_b = Inbox(a), Inbox(b)
    await asyncio.gather(a.subscribe(["news"]), b.subscribe(["news"]))
    sent = [BusMessage("news", b"%d" % i, ENCODING_JSON, "w3") for i in range(50)]
    for message in sent:
        await publisher.publish(message)
    assert await fence(publisher, "news", inbox_a, inbox_b) == [sent, sent]
    assert a.stats()["messages_in"] == b.stats()["messages_in"] == 51


async def test_unsubscribe_stops_delivery(harness: Harness) -> None:
    bus = await harness.bus()
    inbox = Inbox(bus)
    await bus.subscribe(["x", "y"])
    await bus.publish(BusMessage("x", b"before", ENCODING_JSON))
    await inbox.wait_for(lambda: len(inbox.messages) == 1)
    await bus.unsubscribe(["x"])
    await bus.publish(BusMessage("x", b"after", ENCODING_JSON))
    assert await inbox.fence(bus, "y") == [BusMessage("x", b"before", ENCODING_JSON)]
    assert bus.stats()["subscribed_channels"] == 1


async def test_unsubscribe_right_after_publish_delivers_nothing_more(harness: Harness) -> None:
    bus = await harness.bus()
    inbox = Inbox(bus)
    await bus.subscribe(["x", "y"])
    publish = asyncio.ensure_future(bus.publish(BusMessage("x", b"racing", ENCODING_JSON)))
    await bus.unsubscribe(["x"])
    await publish
    assert await inbox.fence(bus, "y") == []


async def test_subscribe_many_topics_at_once(harness: Harness) -> None:
    bus = await harness.bus(bus_resubscribe_batch=500)
    inbox = Inbox(bus)
    topics = [f"topic-{i}" for i in range(1200)]
    before = bus.stats()["subscribe_commands"]
    await bus.subscribe(topics)
    assert bus.stats()["subscribed_channels"] == 1200
    if harness.is_redis:
        assert bus.stats()["subscribe_commands"] - before == 3  # 500 + 500 + 200 channels
        assert len(await _topic_channels(harness)) == 1200
    sent = [BusMessage(t, t.encode(), ENCODING_JSON) for t in topics]
    await asyncio.gather(*(bus.publish(m) for m in sent))
    await inbox.wait_for(lambda: len(inbox.messages) == len(sent))
    assert sorted(m.topic for m in inbox.messages) == sorted(topics)


async def test_concurrent_publishes_are_batched(harness: Harness) -> None:
    bus = await harness.bus(bus_publish_batch=64)
    inbox = Inbox(bus)
    await bus.subscribe(["burst"])
    before = bus.stats()
    sent = [BusMessage("burst", b"%d" % i, ENCODING_JSON) for i in range(200)]
    results = await asyncio.gather(*(bus.publish(m) for m in sent))
    assert len(results) == 200
    after = bus.stats()
    assert after["published"] - before["published"] == 200
    batches = after["publish_batches"] - before["publish_batches"]
    # Memory: one loop iteration. Redis: pipelines of at most 64 (200 = 64 + 64 + 64 + 8).
    assert batches == (4 if harness.is_redis else 1)
    assert await inbox.fence(bus, "burst") == sent


async def test_stats_and_health(harness: Harness) -> None:
    bus = await harness.bus()
    stats = bus.stats()
    assert set(STATS_KEYS) <= set(stats)
    assert stats["healthy"] is True and bus.healthy
    assert stats["reconnects"] == stats["gaps"] == stats["publish_errors"] == 0


async def test_publish_with_no_subscriber_is_fine(harness: Harness) -> None:
    bus = await harness.bus()
    assert await bus.publish(BusMessage("nobody", b"x", ENCODING_JSON)) is not None
    assert bus.stats()["published"] == 1


# --- Redis only ---------------------------------------------------------------------------------


async def test_concurrent_subscribes_are_one_command(redis_harness: Harness) -> None:
    bus = await redis_harness.bus()
    before = bus.stats()["subscribe_commands"]
    await asyncio.gather(*(bus.subscribe([f"t{i}"]) for i in range(50)))
    assert bus.stats()["subscribe_commands"] - before == 1
    assert len(await _topic_channels(redis_harness)) == 50


async def test_last_unsubscribe_leaves_no_topic_channels(redis_harness: Harness) -> None:
    a, b = await redis_harness.bus("w1"), await redis_harness.bus("w2")
    topics = [f"room-{i}" for i in range(5)]
    await asyncio.gather(a.subscribe(topics), b.subscribe(topics[:3]))
    assert len(await _topic_channels(redis_harness)) == 5
    await a.unsubscribe(topics)
    assert len(await _topic_channels(redis_harness)) == 3
    await b.unsubscribe(topics[:3])
    assert await _topic_channels(redis_harness) == set()


async def test_malformed_envelopes_are_counted_and_skipped(redis_harness: Harness) -> None:
    bus = await redis_harness.bus()
    assert isinstance(bus, RedisBus)
    inbox = Inbox(bus)
    await bus.subscribe(["m"])
    good = BusMessage("m", b"good", ENCODING_JSON)
    wrong_topic = pack(BusMessage("other", b"x", ENCODING_JSON))
    async with redis_harness.redis() as r:
        for data in (b"\xc1garbage", b"", pack(good)[:-1], wrong_topic, pack(good)):
            await r.publish(bus.channel("m"), data)
    assert await inbox.fence(bus, "m") == [good]
    assert bus.stats()["malformed"] == 4
    assert bus.healthy


async def test_channel_names(redis_harness: Harness) -> None:
    bus = await redis_harness.bus("worker-7", channel_prefix="app1:")
    assert isinstance(bus, RedisBus)
    await bus.subscribe(["a/b c"])
    async with redis_harness.redis() as r:
        channels = set(await r.pubsub_channels("app1:*"))
    assert channels == {b"app1:t:a/b c", b"app1:probe:worker-7"}


async def test_callback_errors_do_not_stop_the_bus(redis_harness: Harness) -> None:
    bus = await redis_harness.bus()
    calls: list[int] = []

    def broken(batch: list[BusMessage]) -> None:
        calls.append(len(batch))
        raise RuntimeError("hub bug")

    await bus.subscribe(["t"])
    bus.on_messages = broken
    await bus.publish(BusMessage("t", b"1", ENCODING_JSON))
    inbox = Inbox(bus)
    assert await inbox.fence(bus, "t") == []
    assert calls == [1]
    assert bus.healthy


async def test_publish_before_start_and_after_close_raise(redis_harness: Harness) -> None:
    from broker.errors import BusUnavailable

    assert redis_harness.url is not None
    bus = RedisBus(redis_harness.url, SETTINGS, "w1")
    with pytest.raises(BusUnavailable):
        await bus.publish(BusMessage("t", b"", ENCODING_JSON))
    with pytest.raises(BusUnavailable):
        await bus.subscribe(["t"])
    await bus.start()
    await bus.close()
    assert not bus.healthy
    with pytest.raises(BusUnavailable):
        await bus.publish(BusMessage("t", b"", ENCODING_JSON))


def test_make_bus_chooses_by_url(tmp_path: Any) -> None:
    assert isinstance(make_bus(SETTINGS.replace(redis_url="memory://"), "w"), MemoryBus)
    for url in ("redis://127.0.0.1:1/0", f"unix://{tmp_path}/redis.sock"):
        assert isinstance(make_bus(SETTINGS.replace(redis_url=url), "w"), RedisBus)
