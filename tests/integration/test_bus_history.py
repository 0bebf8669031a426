"""RedisBus history, offsets and presence against a real Redis: what the contract suite cannot
show with MemoryBus. Age-bounded history, Redis emptied under a running bus, a recovery
read racing a publisher at full speed, a flushed script cache, dead buses leaving presence,
and the key layout of broker/bus/redis.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aredis
from support.bus_watch import BusWatch
from support.waiting import eventually

from broker.bus import JOIN, LEAVE, meta_ttl_s
from broker.bus.redis import RedisBus
from broker.envelope import ENCODING_JSON, BusMessage, pack
from broker.settings import Settings, TopicRule

TTL_S = 0.5  # history_ttl_s of the `ttl.*` topics
PRESENCE_TTL_S = 1.0
SETTINGS = Settings(
    bus_probe_interval_s=60.0,
    bus_connect_timeout_s=3.0,
    presence_ttl_s=PRESENCE_TTL_S,
    topics=(
        TopicRule("hist.*", history_size=10_000),
        TopicRule("ttl.*", history_size=100, history_ttl_s=TTL_S),
        TopicRule("room.*", presence=True, join_leave=True),
    ),
)

Event = BusMessage | tuple[str, str, str, dict[str, Any]]


@pytest.fixture
async def make_bus(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    buses: list[RedisBus] = []

    async def make(origin: str = "w1", **overrides: Any) -> RedisBus:
        bus = RedisBus(redis_url, SETTINGS.replace(**overrides), origin)
        buses.append(bus)
        await bus.start()
        assert bus.healthy
        return bus

    yield make
    for bus in buses:
        await bus.close()


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aredis.Redis]:
    async with aredis.from_url(redis_url) as client:
        yield client


def _msg(topic: str, i: int) -> BusMessage:
    return BusMessage(topic, b"%d" % i, ENCODING_JSON, "test")


# --- layout ----------------------------------------------------------------------------------


async def test_key_layout_and_payloads(make_bus: Callable[..., Any], r: aredis.Redis) -> None:
    bus = await make_bus()
    sent = _msg("hist.layout", 7)
    published = await bus.publish(sent, key="once")
    await bus.presence_add("room.layout", "c1", {"user": "ann"})
    keys = set(await r.keys("redwire:*"))
    assert keys == {
        b"redwire:{hist.layout}:m",
        b"redwire:{hist.layout}:h",
        b"redwire:{hist.layout}:k:once",
        b"redwire:{room.layout}:p",
        b"redwire:w:" + bus.instance.encode(),
    }
    meta = await r.hgetall("redwire:{hist.layout}:m")
    info = await r.info("replication")
    assert meta == {
        b"o": b"1",
        b"e": published.epoch.encode(),
        b"r": info["master_replid"].encode(),
    }
    [(entry_id, fields)] = await r.xrange("redwire:{hist.layout}:h")
    header = b"H1:" + published.epoch.encode() + b":"
    assert entry_id == b"1-0" and fields[b"d"] == header + pack(sent)
    assert int(fields[b"t"]) > 0
    assert await r.get("redwire:{hist.layout}:k:once") == b"1:" + published.epoch.encode()
    assert 0 < await r.pttl("redwire:{hist.layout}:k:once") <= 300_000
    assert await r.pttl("redwire:{hist.layout}:m") == -1  # no age bound: no expiry
    value = await r.hget("redwire:{room.layout}:p", "c1")
    assert value == b'{"w":"' + bus.instance.encode() + b'","i":{"user":"ann"}}'
    assert 0 < await r.pttl(b"redwire:w:" + bus.instance.encode()) <= 1000


# --- age-bounded history ---------------------------------------------------------------------


async def test_history_older_than_its_ttl_is_gone(
    make_bus: Callable[..., Any], r: aredis.Redis
) -> None:
    bus = await make_bus()
    first = await bus.publish(_msg("ttl.a", 1))
    epoch = first.epoch
    read = await bus.history("ttl.a", after=0, epoch=epoch)
    assert read.complete and [m.payload for m in read.messages] == [b"1"]
    assert 0 < await r.pttl("redwire:{ttl.a}:h") <= TTL_S * 1000
    rule = SETTINGS.rule_for("ttl.a")
    assert rule is not None
    assert await r.pttl("redwire:{ttl.a}:m") > (meta_ttl_s(rule) - 60) * 1000

    await asyncio.sleep(TTL_S * 0.7)  # the passage of time is what this test is about
    await bus.publish(_msg("ttl.a", 2))
    await asyncio.sleep(TTL_S * 0.6)  # message 1 is now older than TTL_S, message 2 is not
    aged = await bus.history("ttl.a", after=0, epoch=epoch)
    assert not aged.complete and [m.offset for m in aged.messages] == [2]
    assert (aged.offset, aged.epoch) == (2, epoch)  # the position outlives the history
    assert (await bus.history("ttl.a", after=1, epoch=epoch)).complete

    await bus.publish(_msg("ttl.a", 3))  # trims the expired head
    assert [e[0] for e in await r.xrange("redwire:{ttl.a}:h")] == [b"2-0", b"3-0"]

    await asyncio.sleep(TTL_S * 1.2)  # an idle topic's stream expires as a whole
    assert await r.exists("redwire:{ttl.a}:h") == 0
    idle = await bus.history("ttl.a", after=1, epoch=epoch)
    assert (idle.messages, idle.complete, idle.offset, idle.epoch) == ([], False, 3, epoch)
    fourth = await bus.publish(_msg("ttl.a", 4))
    assert (fourth.offset, fourth.epoch) == (4, epoch)
    assert [m.offset for m in (await bus.history("ttl.a", after=3, epoch=epoch)).messages] == [4]


# --- Redis emptied under a running bus ---------------------------------------------------------


async def test_flushall_starts_a_new_epoch(make_bus: Callable[..., Any], r: aredis.Redis) -> None:
    publisher, subscriber = await make_bus("w1"), await make_bus("w2")
    recorder = BusWatch(subscriber)
    await subscriber.subscribe(["hist.f"])
    old = [await publisher.publish(_msg("hist.f", i)) for i in range(5)]
    await r.flushall()
    new = await publisher.publish(_msg("hist.f", 5))
    assert new.offset == 1 and new.epoch != old[0].epoch and not new.duplicate
    stale = await subscriber.history("hist.f", after=5, epoch=old[0].epoch)
    assert (stale.messages, stale.complete, stale.offset) == ([], False, 1)
    await recorder.until(lambda: len(recorder.messages) == 6)
    assert [(m.offset, m.epoch) for m in recorder.messages] == [
        *((n, old[0].epoch) for n in range(1, 6)),
        (1, new.epoch),
    ]


# --- recovery racing a publisher -----------------------------------------------------------------


async def test_subscribe_then_read_history_recovers_without_gap_or_duplicate(
    make_bus: Callable[..., Any],
) -> None:
    total, chunk, lookback = 5000, 250, 100
    publisher, reader = await make_bus("w1"), await make_bus("w2")
    recorder = BusWatch(reader)
    published: list[int] = []
    halfway = asyncio.Event()

    async def publish_all() -> None:
        for start in range(0, total, chunk):
            batch = [publisher.publish(_msg("hist.race", i)) for i in range(start, start + chunk)]
            published.extend(p.offset for p in await asyncio.gather(*batch))
            if len(published) >= 1000:
                halfway.set()

    publishing = asyncio.create_task(publish_all())
    await halfway.wait()
    await reader.subscribe(["hist.race"])
    await recorder.until(lambda: bool(recorder.messages))
    first = recorder.messages[0]
    assert first.offset is not None and first.offset > lookback
    read = await reader.history("hist.race", after=first.offset - lookback, epoch=first.epoch)
    assert read.offset < total, "the read should race the publisher"
    await publishing
    await recorder.until(lambda: recorder.messages[-1].offset == total)

    assert read.complete and read.epoch == first.epoch
    assert published == list(range(1, total + 1))  # one bus: offsets in publish order
    merged: dict[int, BusMessage] = {}
    for m in [*read.messages, *recorder.messages]:
        assert m.offset is not None and m.epoch == first.epoch
        assert merged.setdefault(m.offset, m) == m  # overlap: the very same message
        assert m.payload == b"%d" % (m.offset - 1)
    assert sorted(merged) == list(range(first.offset - lookback + 1, total + 1))
    live = [m.offset for m in recorder.messages]
    assert live == list(range(first.offset, total + 1))  # live: no gap, no duplicate


# --- the script cache ----------------------------------------------------------------------------


async def test_flushed_script_cache_is_reloaded(
    make_bus: Callable[..., Any], r: aredis.Redis
) -> None:
    bus = await make_bus()
    recorder = BusWatch(bus)
    await bus.subscribe(["hist.s", "room.s"])
    assert [(await bus.publish(_msg("hist.s", i))).offset for i in range(3)] == [1, 2, 3]
    loads = bus.stats()["script_loads"]
    await r.script_flush()
    # One pipeline of refused EVALSHAs: sent again after SCRIPT LOAD, in the same order.
    results = await asyncio.gather(*(bus.publish(_msg("hist.s", i)) for i in range(3, 53)))
    assert [p.offset for p in results] == list(range(4, 54))
    assert bus.stats()["script_loads"] == loads + 1
    await r.script_flush()
    read = await bus.history("hist.s", after=50, epoch=results[0].epoch)
    assert read.complete and [m.offset for m in read.messages] == [51, 52, 53]
    await r.script_flush()
    await bus.presence_add("room.s", "c1", {})
    assert await bus.presence("room.s") == {"c1": {}}
    await recorder.until(lambda: len(recorder.messages) == 53 and bool(recorder.presence))
    assert [m.offset for m in recorder.messages] == list(range(1, 54))
    assert recorder.presence == [("room.s", JOIN, "c1", {})]
    assert bus.stats()["publish_errors"] == 0


# --- presence of dead buses ----------------------------------------------------------------------


async def test_entries_of_a_closed_bus_vanish_and_one_leave_is_announced(
    make_bus: Callable[..., Any],
) -> None:
    dying = await make_bus("dying")
    survivors = [await make_bus("w2"), await make_bus("w3")]
    recorders = [BusWatch(bus) for bus in survivors]
    await asyncio.gather(*(bus.subscribe(["room.d"]) for bus in survivors))
    await dying.presence_add("room.d", "c1", {"user": "ann"})
    await dying.presence_add("room.d", "c2", {"user": "bob"})
    await survivors[0].presence_add("room.d", "c3", {"user": "cid"})
    for recorder in recorders:
        await recorder.until(lambda rec=recorder: len(rec.presence) == 3)

    await dying.close()  # without removing its entries
    for recorder in recorders:  # a sweep announces them: within 2 x presence_ttl_s
        await recorder.until(lambda rec=recorder: len(rec.presence) == 5, 2 * PRESENCE_TTL_S)
        assert sorted(recorder.presence[3:]) == [
            ("room.d", LEAVE, "c1", {"user": "ann"}),
            ("room.d", LEAVE, "c2", {"user": "bob"}),
        ]
    for bus in survivors:  # also a round trip behind any sweep each bus has sent
        assert await bus.presence("room.d") == {"c3": {"user": "cid"}}
    # Each entry was removed, and announced, by exactly one of the two sweeping buses.
    assert sum(int(bus.stats()["presence_swept"]) for bus in survivors) == 2


async def test_entries_lost_by_redis_are_written_again(
    make_bus: Callable[..., Any], r: aredis.Redis
) -> None:
    bus = await make_bus()
    watcher = await make_bus("w2")
    recorder = BusWatch(watcher)
    await watcher.subscribe(["room.l"])
    await bus.presence_add("room.l", "c1", {"user": "ann"})
    await recorder.until(lambda: len(recorder.presence) == 1)
    await r.flushall()
    assert await watcher.presence("room.l") == {}

    async def back() -> bool:
        return await watcher.presence("room.l") == {"c1": {"user": "ann"}}

    await eventually(back, timeout_s=PRESENCE_TTL_S)  # the next heartbeat rewrites it
    await recorder.until(lambda: len(recorder.presence) == 2)
    assert recorder.presence[1] == ("room.l", JOIN, "c1", {"user": "ann"})
