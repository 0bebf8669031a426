"""One contract for every bus: MemoryBus, and RedisBus over TCP and over a Unix socket.

The Redis variants run against a real server (the `redis_server` fixture). A publication is
known to be delivered at most once by a *fence*: a last message on the same topic, after
which, order being kept, nothing older can still arrive.

History, offsets, idempotency and presence use the topic rules in SETTINGS: `hist.*` keeps
100 messages, `short.*` keeps 3, `room.*` has presence with join/leave events, `quiet.*`
presence without them; every other topic is plain pub/sub.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aredis
from support.bus_watch import BusWatch
from support.redis_server import RedisServer

from broker.bus import (
    JOIN,
    LEAVE,
    NO_HISTORY,
    STATS_KEYS,
    Bus,
    HistoryRead,
    Published,
    make_bus,
)
from broker.bus.memory import MemoryBus, MemoryNetwork
from broker.bus.redis import RedisBus
from broker.envelope import ENCODING_JSON, ENCODING_MSGPACK, BusMessage, msgpack_dumps, pack
from broker.settings import Settings, TopicRule

# No idle probes during a contract test: they would add publish batches of their own.
SETTINGS = Settings(
    bus_probe_interval_s=60.0,
    bus_connect_timeout_s=3.0,
    topics=(
        TopicRule("hist.*", history_size=100),
        TopicRule("short.*", history_size=3),
        TopicRule("room.*", presence=True, join_leave=True),
        TopicRule("quiet.*", presence=True),
    ),
)


class Inbox(BusWatch):
    """A BusWatch that can also tell what arrived before a fence."""

    async def fence(self, publisher: Bus, topic: str) -> list[BusMessage]:
        """Publish a marker on `topic`, wait for it, return what came before it."""
        return (await fence(publisher, topic, self))[0]

    async def until_marker(self, marker: bytes) -> list[BusMessage]:
        await self.until(lambda: any(m.payload == marker for m in self.messages))
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
            bus: Bus = MemoryBus(origin, self.network, settings=settings)
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
    await inbox.until(lambda: len(inbox.messages) == 1)
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
    await inbox.until(lambda: len(inbox.messages) == len(sent))
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


# --- history, offsets, idempotency (topics with history) -------------------------------------


def _msg(topic: str, i: int, origin: str = "w1") -> BusMessage:
    return BusMessage(topic, b'{"n":%d}' % i, ENCODING_JSON, origin)


async def test_history_topic_numbers_messages_in_one_epoch(harness: Harness) -> None:
    bus = await harness.bus()
    inbox = Inbox(bus)
    await bus.subscribe(["hist.a"])
    sequential = [await bus.publish(_msg("hist.a", i)) for i in range(10)]
    concurrent = await asyncio.gather(*(bus.publish(_msg("hist.a", i)) for i in range(10, 60)))
    results = [*sequential, *concurrent]
    epoch = results[0].epoch
    assert epoch is not None and len(epoch) == 16 and int(epoch, 16) >= 0
    assert results == [Published(n, epoch) for n in range(1, 61)]  # in publish order
    received = await inbox.fence(bus, "hist.a")
    assert [(m.offset, m.epoch) for m in received] == [(n, epoch) for n in range(1, 61)]
    assert [m.payload for m in received] == [_msg("hist.a", i).payload for i in range(60)]


async def test_history_after_an_offset_is_exactly_what_followed(harness: Harness) -> None:
    publisher, reader = await harness.bus("w1"), await harness.bus("w2")
    inbox = Inbox(reader)
    await reader.subscribe(["hist.b"])
    for i in range(20):
        await publisher.publish(_msg("hist.b", i))
    await inbox.until(lambda: len(inbox.messages) == 20)
    epoch = inbox.messages[0].epoch
    read = await reader.history("hist.b", after=7, epoch=epoch)
    assert read.complete and read.offset == 20 and read.epoch == epoch
    assert read.messages == inbox.messages[7:]  # same payloads, origins, offsets and epoch
    assert [m.offset for m in read.messages] == list(range(8, 21))
    empty = await reader.history("hist.b", after=20, epoch=epoch)
    assert empty.messages == [] and empty.complete and empty.offset == 20
    everything = await reader.history("hist.b", after=0, epoch=epoch)
    assert everything.messages == inbox.messages and everything.complete


async def test_history_that_no_longer_reaches_back_is_incomplete(harness: Harness) -> None:
    bus = await harness.bus()
    results = [await bus.publish(_msg("short.a", i)) for i in range(10)]
    epoch = results[-1].epoch
    read = await bus.history("short.a", after=2, epoch=epoch)
    assert not read.complete and read.offset == 10
    assert [m.offset for m in read.messages] == [8, 9, 10]  # what is kept: history_size 3
    assert [m.payload for m in read.messages] == [_msg("short.a", i).payload for i in (7, 8, 9)]
    kept = await bus.history("short.a", after=7, epoch=epoch)
    assert kept.complete and [m.offset for m in kept.messages] == [8, 9, 10]


async def test_history_read_limit_makes_it_incomplete(harness: Harness) -> None:
    bus = await harness.bus(history_read_limit=5)
    published = [await bus.publish(_msg("hist.lim", i)) for i in range(12)]
    epoch = published[0].epoch
    capped = await bus.history("hist.lim", after=0, epoch=epoch)
    assert not capped.complete and [m.offset for m in capped.messages] == [1, 2, 3, 4, 5]
    explicit = await bus.history("hist.lim", after=4, epoch=epoch, limit=2)
    assert not explicit.complete and [m.offset for m in explicit.messages] == [5, 6]
    rest = await bus.history("hist.lim", after=8, epoch=epoch)
    assert rest.complete and [m.offset for m in rest.messages] == [9, 10, 11, 12]


async def test_history_of_another_epoch_is_incomplete_and_empty(harness: Harness) -> None:
    bus = await harness.bus()
    published = [await bus.publish(_msg("hist.c", i)) for i in range(5)]
    for stale in ("0123456789abcdef", None, ""):
        read = await bus.history("hist.c", after=2, epoch=stale)
        assert read == HistoryRead([], 5, published[0].epoch or "?", False)
    ahead = await bus.history("hist.c", after=9, epoch=published[0].epoch)
    assert not ahead.complete and ahead.messages == [] and ahead.offset == 5


async def test_position_only_and_position_before_the_first_publish(harness: Harness) -> None:
    a, b = await harness.bus("w1"), await harness.bus("w2")
    position = await a.history("hist.new", after=None, epoch=None)
    assert position.messages == [] and position.complete and position.offset == 0
    assert position == await b.history("hist.new", after=None, epoch="ignored")
    nothing_yet = await b.history("hist.new", after=0, epoch=position.epoch)
    assert nothing_yet.complete and nothing_yet.messages == []
    first = await b.publish(_msg("hist.new", 0))
    assert first == Published(1, position.epoch)  # the epoch given out before is kept
    after = await a.history("hist.new", after=None, epoch=None)
    assert (after.offset, after.epoch, after.messages) == (1, position.epoch, [])
    since = await a.history("hist.new", after=0, epoch=position.epoch)
    assert since.complete and [m.payload for m in since.messages] == [b'{"n":0}']


async def test_idempotency_key_publishes_once(harness: Harness) -> None:
    a, b = await harness.bus("w1"), await harness.bus("w2")
    inbox = Inbox(b)
    await b.subscribe(["hist.k", "hist.other"])
    first = await a.publish(_msg("hist.k", 1), key="order-17")
    await a.publish(_msg("hist.k", 2))
    again = await b.publish(_msg("hist.k", 3), key="order-17")  # a retry, from any bus
    assert first.offset == 1 and not first.duplicate
    assert again == Published(1, first.epoch, duplicate=True)
    elsewhere = await a.publish(_msg("hist.other", 4), key="order-17")  # keys are per topic
    assert elsewhere.offset == 1 and not elsewhere.duplicate
    received = await inbox.fence(a, "hist.k")
    assert [(m.topic, m.payload) for m in received] == [
        ("hist.k", _msg("hist.k", 1).payload),
        ("hist.k", _msg("hist.k", 2).payload),
        ("hist.other", _msg("hist.other", 4).payload),
    ]
    assert a.stats()["published"] == 4  # the duplicate published nothing
    read = await a.history("hist.k", after=0, epoch=first.epoch)
    assert [m.offset for m in read.messages] == [1, 2, 3]  # 3: the fence
    retries = (a.publish(_msg("hist.k", 9), key="burst") for _ in range(5))
    concurrent = await asyncio.gather(*retries)
    assert len({p.offset for p in concurrent}) == 1
    assert [p.duplicate for p in concurrent] == [False, True, True, True, True]


async def test_keys_work_on_plain_topics_without_offsets(harness: Harness) -> None:
    a, b = await harness.bus("w1"), await harness.bus("w2")
    inbox = Inbox(b)
    await b.subscribe(["plain", "plain2"])
    assert await a.publish(_msg("plain", 1), key="k") == Published()
    assert await b.publish(_msg("plain", 2), key="k") == Published(duplicate=True)  # any bus
    assert await a.publish(_msg("plain2", 3), key="k") == Published()  # keys are per topic
    assert await a.publish(_msg("plain", 4)) == Published()  # no key: always published
    retries = await asyncio.gather(*(a.publish(_msg("plain", 5), key="burst") for _ in range(4)))
    assert [p.duplicate for p in retries] == [False, True, True, True]
    received = await inbox.fence(a, "plain")
    assert [(m.topic, m.payload, m.offset, m.epoch) for m in received] == [
        ("plain", b'{"n":1}', None, None),
        ("plain2", b'{"n":3}', None, None),
        ("plain", b'{"n":4}', None, None),
        ("plain", b'{"n":5}', None, None),
    ]
    assert a.stats()["duplicates"] + b.stats()["duplicates"] == 4
    bus = a
    assert await bus.history("plain", after=None, epoch=None) == NO_HISTORY
    assert await bus.history("plain", after=3, epoch="x") == NO_HISTORY


async def test_bad_history_arguments_are_refused(harness: Harness) -> None:
    bus = await harness.bus()
    for key in ("", "k" * 65):
        with pytest.raises(ValueError, match="key"):
            await bus.publish(_msg("hist.z", 0), key=key)
    longest = await bus.publish(_msg("hist.z", 0), key="k" * 64)
    assert longest.offset == 1 and not longest.duplicate
    with pytest.raises(ValueError):
        await bus.history("hist.z", after=-1, epoch=None)
    with pytest.raises(ValueError):
        await bus.history("hist.z", after=0, epoch=None, limit=0)
    with pytest.raises(ValueError):
        await bus.presence_add("room.z", "c", {"bad": object()})


# --- presence ------------------------------------------------------------------------------------


async def test_presence_add_remove_list(harness: Harness) -> None:
    a, b, c = [await harness.bus(name) for name in ("w1", "w2", "w3")]
    await a.presence_add("quiet.p", "c1", {"user": "ann", "worker": "w1"})
    await b.presence_add("quiet.p", "c2", {"user": "bob", "tags": [1, 2.5, None, {}]})
    await b.presence_add("quiet.q", "c3", {})
    assert await c.presence("quiet.p") == {
        "c1": {"user": "ann", "worker": "w1"},
        "c2": {"user": "bob", "tags": [1, 2.5, None, {}]},
    }
    await a.presence_add("quiet.p", "c1", {"user": "ann", "worker": "w1", "again": True})
    assert (await c.presence("quiet.p"))["c1"]["again"] is True
    await a.presence_remove("quiet.p", "c1")
    await a.presence_remove("quiet.p", "never-there")
    assert await c.presence("quiet.p") == {"c2": {"user": "bob", "tags": [1, 2.5, None, {}]}}
    assert await c.presence("quiet.q") == {"c3": {}}
    assert await c.presence("quiet.empty") == {}


async def test_join_and_leave_reach_subscribers_in_order_with_messages(harness: Harness) -> None:
    a, b = await harness.bus("w1"), await harness.bus("w2")
    inbox = Inbox(b)
    await b.subscribe(["room.1", "quiet.1"])
    await a.publish(_msg("room.1", 1))
    await a.presence_add("room.1", "c1", {"user": "ann"})
    await a.publish(_msg("room.1", 2))
    await a.presence_add("room.1", "c1", {"user": "ann"})  # already present: no second join
    await a.presence_add("quiet.1", "c9", {"user": "zed"})  # presence without join_leave
    await a.presence_remove("quiet.1", "c9")
    await a.presence_remove("room.1", "c1")
    await a.presence_remove("room.1", "c1")  # already gone: no second leave
    await inbox.fence(a, "room.1")
    assert inbox.events[:4] == [
        _msg("room.1", 1),
        ("room.1", JOIN, "c1", {"user": "ann"}),
        _msg("room.1", 2),
        ("room.1", LEAVE, "c1", {"user": "ann"}),
    ]
    assert inbox.presence == [
        ("room.1", JOIN, "c1", {"user": "ann"}),
        ("room.1", LEAVE, "c1", {"user": "ann"}),
    ]


async def test_a_closed_bus_leaves_presence(harness: Harness) -> None:
    a, b = await harness.bus("w1"), await harness.bus("w2")
    await a.presence_add("quiet.gone", "c1", {"n": 1})
    await b.presence_add("quiet.gone", "c2", {"n": 2})
    await a.close()
    assert await b.presence("quiet.gone") == {"c2": {"n": 2}}


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
    # The probe channel is the bus instance's own: replicas never share one.
    assert channels == {b"app1:t:a/b c", b"app1:probe:worker-7:" + bus.instance.encode()}


async def test_callback_errors_do_not_stop_the_bus(redis_harness: Harness) -> None:
    bus = await redis_harness.bus()
    calls: list[int] = []
    called = asyncio.Event()

    def broken(batch: list[BusMessage]) -> None:
        calls.append(len(batch))
        called.set()
        raise RuntimeError("hub bug")

    await bus.subscribe(["t"])
    bus.on_messages = broken
    await bus.publish(BusMessage("t", b"1", ENCODING_JSON))
    # publish() returns on Redis' reply; the subscriber connection delivers it later
    await asyncio.wait_for(called.wait(), 5)
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


# --- the owner owns the topic set; honest publish outcomes ---------------------------------------


async def test_unsubscribe_of_what_is_not_subscribed_is_harmless(harness: Harness) -> None:
    bus = await harness.bus()
    inbox = Inbox(bus)
    await bus.unsubscribe(["never"])
    await bus.subscribe(["s"])
    await bus.unsubscribe(["s", "never"])
    await bus.unsubscribe(["s"])
    await bus.subscribe(["s"])
    assert await inbox.fence(bus, "s") == []
    assert bus.stats()["subscribed_channels"] == 1


async def test_wanted_topics_are_resubscribed_after_a_connection_kill(
    redis_harness: Harness,
) -> None:
    wanted = {"keep.a", "keep.b"}
    bus = await redis_harness.bus()
    assert isinstance(bus, RedisBus)
    bus.wanted_topics = lambda: sorted(wanted)
    inbox = Inbox(bus)
    await bus.subscribe(["keep.a", "keep.b", "dropped"])  # "dropped": not the owner's
    async with redis_harness.redis() as r:
        assert await r.client_kill_filter(_type="pubsub") >= 1
    await inbox.until(lambda: inbox.gaps)
    assert inbox.gaps == [frozenset(wanted)]
    assert await _topic_channels(redis_harness) == {bus.channel(t) for t in wanted}
    await inbox.receive(bus, "keep.a", "keep.b")
    inbox.messages.clear()
    await bus.publish(_msg("dropped", 0))
    assert [m.topic for m in await inbox.fence(bus, "keep.a")] == []
    assert bus.stats()["reconnects"] == 1


async def test_default_wanted_topics_resubscribe_nothing(redis_harness: Harness) -> None:
    bus = await redis_harness.bus()
    inbox = Inbox(bus)
    await bus.subscribe(["t1"])
    async with redis_harness.redis() as r:
        await r.client_kill_filter(_type="pubsub")
    await inbox.until(lambda: bus.stats()["reconnects"] == 1 and bus.healthy)
    assert inbox.gaps == [] and await _topic_channels(redis_harness) == set()


async def test_a_failed_subscribe_leaves_nothing_behind(redis_url: str) -> None:
    from support.tcp_proxy import TcpProxy, subscriber_link

    from broker.errors import BusUnavailable

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with TcpProxy(port) as proxy:
        bus = RedisBus(proxy.url, SETTINGS.replace(bus_reconnect_min_s=0.02), "w1")
        bus.wanted_topics = lambda: ["kept"]
        inbox = Inbox(bus)
        await bus.start()
        try:
            assert proxy.freeze(subscriber_link) == 1  # Redis' confirmations get lost
            subscribing = asyncio.ensure_future(bus.subscribe(["failed"]))
            proxy.cut()  # the connection goes before the confirmation came
            with pytest.raises(BusUnavailable):
                await subscribing
            await inbox.until(lambda: inbox.gaps and bus.healthy)
            assert inbox.gaps == [frozenset({"kept"})]
            async with aredis.from_url(redis_url) as r:
                channels = set(await r.pubsub_channels(SETTINGS.channel_prefix + "t:*"))
            assert channels == {bus.channel("kept")}
            async with aredis.from_url(redis_url) as r:
                await r.publish(bus.channel("failed"), pack(_msg("failed", 1)))
                await r.publish(bus.channel("kept"), pack(_msg("kept", 2)))
            await inbox.until(lambda: inbox.messages)
            assert [m.topic for m in inbox.messages] == ["kept"]
        finally:
            await bus.close()


async def test_a_publish_given_up_before_it_was_sent_is_never_sent(
    redis_harness: Harness,
) -> None:
    from support.waiting import eventually

    bus = await redis_harness.bus()
    assert isinstance(bus, RedisBus)
    inbox = Inbox(bus)
    await bus.subscribe(["c"])
    async with redis_harness.redis() as r:
        await r.execute_command("CLIENT", "PAUSE", 400, "ALL")  # the first batch waits
    batches = bus.stats()["publish_batches"]
    first = asyncio.ensure_future(bus.publish(_msg("c", 1)))

    async def in_flight() -> bool:
        return bus.stats()["publish_batches"] > batches

    await eventually(in_flight, timeout_s=5, interval_s=0.005)
    doomed = asyncio.ensure_future(bus.publish(_msg("c", 2)))  # queued behind it

    async def queued() -> bool:
        return len(bus._publisher._queue) == 1

    await eventually(queued, timeout_s=5, interval_s=0.005)
    doomed.cancel()  # its caller gave up (a client's connection closed)
    await first
    assert [m.payload for m in await inbox.fence(bus, "c")] == [_msg("c", 1).payload]
    assert doomed.cancelled() and bus.stats()["publish_dropped"] == 1


async def test_the_publisher_survives_a_bug_and_publish_is_bounded(
    redis_harness: Harness,
) -> None:
    from broker.errors import BusError, BusOutcomeUnknown, BusUnavailable

    bus = await redis_harness.bus(bus_publish_timeout_s=0.2, bus_connect_timeout_s=0.3)
    assert isinstance(bus, RedisBus)
    inbox = Inbox(bus)
    await bus.subscribe(["b"])
    publisher = bus._publisher
    encode = publisher._encode

    def broken(command: Any) -> Any:
        publisher._encode = encode  # once
        raise RuntimeError("bus bug")

    publisher._encode = broken  # type: ignore[method-assign]
    with pytest.raises(BusError) as failed:
        await bus.publish(_msg("b", 1))
    assert not isinstance(failed.value, BusUnavailable | BusOutcomeUnknown)
    assert await bus.publish(_msg("b", 2)) == Published()  # the loop goes on
    assert [m.payload for m in await inbox.fence(bus, "b")] == [_msg("b", 2).payload]
    assert bus.stats()["publish_internal_errors"] == 1

    task = publisher._task
    assert task is not None
    task.cancel()  # a publisher task that stopped working: callers still get an answer
    with pytest.raises(BusUnavailable, match="not sent"):
        await asyncio.wait_for(bus.publish(_msg("b", 3)), publisher.bound_s + 2)
