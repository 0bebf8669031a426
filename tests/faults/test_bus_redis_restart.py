"""RedisBus under faults: Redis stopped, killed and restarted on the same port; the subscriber
connection killed; a subscription that silently stops delivering; Redis pausing clients.
The buses here have a minimal owner (`Owned`): the topic set is the owner's, as the hub's is.

Each test owns its redis-server (the session one is shared and must not be stopped).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from support.bus_watch import BusWatch, Owned
from support.redis_server import RedisServer
from support.tcp_proxy import TcpProxy, subscriber_link
from support.waiting import eventually

from broker.bus.redis import RedisBus
from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusOutcomeUnknown, BusUnavailable
from broker.settings import Settings

WAIT_S = 5.0
FAST = Settings(
    bus_reconnect_min_s=0.02,
    bus_reconnect_max_s=0.2,
    bus_probe_interval_s=0.2,
    bus_probe_timeout_s=0.5,
    bus_publish_timeout_s=0.5,
    bus_connect_timeout_s=1.0,
)


@pytest.fixture
async def make_bus() -> AsyncIterator[Callable[..., RedisBus]]:
    buses: list[RedisBus] = []

    def make(url: str, settings: Settings = FAST, origin: str = "w1") -> RedisBus:
        bus = Owned(url, settings, origin)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


def topic_channels(server: RedisServer) -> set[bytes]:
    return set(server.command("PUBSUB", "CHANNELS", FAST.channel_prefix + "t:*"))


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_redis_restart(
    server: RedisServer, make_bus: Callable[..., RedisBus], how: str
) -> None:
    bus = make_bus(server.url)
    watch = BusWatch(bus)
    await bus.start()
    assert watch.health == [True]
    await bus.subscribe(["a", "b", "c"])
    await watch.receive(bus, "a")

    await asyncio.to_thread(getattr(server, how))
    await watch.until(lambda: watch.health[-1] is False)
    assert not bus.healthy and not bus.stats()["healthy"]
    with pytest.raises(BusUnavailable):
        await bus.publish(BusMessage("a", b"lost?", ENCODING_JSON))
    with pytest.raises(BusUnavailable):
        await bus.subscribe(["d"])  # failed: left nothing behind (the owner dropped it)
    assert bus.stats()["publish_errors"] == 1

    await asyncio.to_thread(server.start)
    await watch.until(lambda: watch.gaps and watch.health[-1] is True)
    assert watch.gaps == [frozenset("abc")]
    assert watch.health == [True, False, True]
    assert topic_channels(server) == {bus.channel(t) for t in "abc"}
    await watch.receive(bus, "a", "b", "c")
    stats = bus.stats()
    assert stats["reconnects"] == 1 and stats["gaps"] == 1
    assert stats["subscribed_channels"] == 3 and stats["healthy"] is True


async def test_resubscribe_is_batched(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    bus = make_bus(server.url, FAST.replace(bus_resubscribe_batch=100))
    watch = BusWatch(bus)
    await bus.start()
    topics = [f"t{i}" for i in range(250)]
    await bus.subscribe(topics)
    before = bus.stats()["subscribe_commands"]
    server.command("CLIENT", "KILL", "TYPE", "pubsub")
    await watch.until(lambda: watch.gaps and watch.health[-1] is True)
    # the probe channel and 250 topics: 100 + 100 + 51 channels
    assert bus.stats()["subscribe_commands"] - before == 3
    assert watch.gaps == [frozenset(topics)]
    assert len(topic_channels(server)) == 250


async def test_killed_subscriber_connection_recovers(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    bus = make_bus(server.url)
    watch = BusWatch(bus)
    await bus.start()
    await bus.subscribe(["x", "y"])
    await watch.receive(bus, "x")
    assert server.command("CLIENT", "KILL", "TYPE", "pubsub") == 1
    await watch.until(lambda: watch.gaps and watch.health[-1] is True)
    assert watch.health == [True, False, True]
    assert watch.gaps == [frozenset({"x", "y"})]
    await watch.receive(bus, "x", "y")
    assert bus.stats()["reconnects"] == 1


async def test_start_while_redis_is_down(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    await asyncio.to_thread(server.stop)
    bus = make_bus(server.url)
    watch = BusWatch(bus)
    await bus.start()  # returns after the first failed attempt, keeps retrying
    assert not bus.healthy and watch.health == []
    with pytest.raises(BusUnavailable):
        await bus.subscribe(["late"])  # not connected: not subscribed, the owner drops it
    assert isinstance(bus, Owned)
    bus.owned.add("early")  # the owner's set, subscribed once Redis answers
    with pytest.raises(BusUnavailable):
        await bus.publish(BusMessage("early", b"", ENCODING_JSON))
    await asyncio.to_thread(server.start)
    await watch.until(lambda: watch.health == [True])
    assert watch.gaps == [frozenset({"early"})]
    await watch.receive(bus, "early")
    assert bus.stats()["connect_failures"] >= 1


# --- a subscription that silently stops delivering ---------------------------------------------


async def test_wedged_subscription_is_detected_and_replaced(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    async with TcpProxy(server.port) as proxy:
        bus = make_bus(proxy.url)
        watch = BusWatch(bus)
        await bus.start()
        await bus.subscribe(["w"])
        await watch.receive(bus, "w")
        assert bus.stats()["probe_timeouts"] == 0

        assert proxy.freeze(subscriber_link) == 1
        await bus.publish(BusMessage("w", b"lost", ENCODING_JSON))  # Redis took it; we never see it
        await watch.until(lambda: watch.gaps and watch.health[-1] is True)
        assert watch.health == [True, False, True]
        assert watch.gaps == [frozenset({"w"})]
        stats = bus.stats()
        assert stats["probe_timeouts"] == 1 and stats["reconnects"] == 1
        await watch.receive(bus, "w")
        assert b"lost" not in {m.payload for m in watch.messages}


async def test_probe_measures_round_trip(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    bus = make_bus(server.url)
    watch = BusWatch(bus)
    await bus.start()

    async def probed_twice() -> bool:
        return bus.stats()["probes"] >= 2

    await eventually(probed_twice, timeout_s=WAIT_S)
    rtt = float(bus.stats()["last_probe_rtt_s"])
    assert 0 < rtt < FAST.bus_probe_timeout_s
    assert watch.health == [True] and bus.stats()["probe_timeouts"] == 0


async def test_paused_redis_fails_publishes_without_dropping_the_subscription(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    bus = make_bus(server.url)
    watch = BusWatch(bus)
    await bus.start()
    await bus.subscribe(["p"])
    await watch.receive(bus, "p")
    pause_ms = 1500
    server.command("CLIENT", "PAUSE", pause_ms, "ALL")
    with pytest.raises(BusOutcomeUnknown, match="timed out"):  # sent: Redis runs it later
        await bus.publish(BusMessage("p", b"paused", ENCODING_JSON))
    await watch.until(lambda: watch.health[-1] is False)
    await watch.until(lambda: watch.health[-1] is True, timeout_s=pause_ms / 1000 + WAIT_S)
    await watch.receive(bus, "p")
    stats = bus.stats()
    assert stats["reconnects"] == 0 and stats["gaps"] == 0 and stats["probe_timeouts"] == 0
    assert watch.gaps == []
