"""The Sentinel bus (`redis+sentinel://`) against a real master, replica and Sentinel
(tests/support/redis_sentinel.py): the bus contract, and a failover (the master killed) that
publishers and subscribers follow, through the bus and through `redwire serve --workers 2`.

The contract cases of tests/integration/test_bus_contract.py run here as they are, with this
module's `harness` (a Sentinel bus; `redis()` talks to the current master).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import integration.test_bus_contract as contract
import pytest
import redis.asyncio as aredis
from integration.test_bus_contract import (  # noqa: F401  (collected here, with this harness)
    SETTINGS,
    Inbox,
    _msg,
    test_a_closed_bus_leaves_presence,
    test_concurrent_publishes_are_batched,
    test_history_after_an_offset_is_exactly_what_followed,
    test_history_topic_numbers_messages_in_one_epoch,
    test_idempotency_key_publishes_once,
    test_join_and_leave_reach_subscribers_in_order_with_messages,
    test_keys_work_on_plain_topics_without_offsets,
    test_presence_add_remove_list,
    test_stats_and_health,
    test_subscribe_many_topics_at_once,
    test_subscribe_then_publish_delivers_once_in_order_untouched,
    test_two_buses_on_one_bus_network_both_receive,
    test_unsubscribe_stops_delivery,
)
from support.broker_client import PubSubClient, clients_on_workers
from support.processes import ServerProcess, serve
from support.redis_sentinel import RedisSentinel
from support.waiting import eventually

from broker.bus import Bus, Published, make_bus
from broker.bus.redis_sentinel import RedisSentinelBus, parse_sentinel_url
from broker.errors import BusError, ConfigError

FAST = {  # a dead master is noticed and left within about a second
    "bus_probe_interval_s": 0.5,
    "bus_probe_timeout_s": 1.0,
    "bus_reconnect_max_s": 0.5,
}


@dataclass
class SentinelHarness(contract.Harness):
    setup: RedisSentinel | None = None

    async def bus(self, origin: str = "w1", **overrides: Any) -> Bus:
        assert self.url is not None
        bus = make_bus(SETTINGS.replace(redis_url=self.url, **overrides), origin)
        assert isinstance(bus, RedisSentinelBus)
        self.buses.append(bus)
        await bus.start()
        assert bus.healthy
        return bus

    def redis(self) -> aredis.Redis:
        assert self.setup is not None
        return aredis.Redis(host="127.0.0.1", port=self.setup.master_port())


@pytest.fixture(scope="module")
def sentinel_setup() -> Iterator[RedisSentinel]:
    with RedisSentinel() as setup:
        yield setup


@pytest.fixture
async def harness(sentinel_setup: RedisSentinel) -> AsyncIterator[SentinelHarness]:
    sentinel_setup.master().command("FLUSHALL")
    h = SentinelHarness("sentinel", sentinel_setup.url, setup=sentinel_setup)
    yield h
    for bus in h.buses:
        await bus.close()


def test_sentinel_urls() -> None:
    sentinels, service, kwargs = parse_sentinel_url(
        "redis+sentinel://:secret@10.0.0.1:26379,10.0.0.2:26380/main/2"
    )
    assert sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert service == "main" and kwargs["db"] == 2 and kwargs["password"] == "secret"
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/main", "redis+sentinel://h:1/a/b"):
        with pytest.raises(ConfigError):
            parse_sentinel_url(bad)


async def publish_until_it_works(bus: Bus, topic: str, n: int, timeout_s: float) -> Published:
    """Publish, retrying what was refused (`unavailable`: never published) until a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await bus.publish(_msg(topic, n))
        except BusError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # a publisher retrying after a refusal, as a client would


async def test_a_failover_is_followed_by_publishers_and_subscribers() -> None:
    with RedisSentinel() as setup:
        url = setup.url
        settings = SETTINGS.replace(redis_url=url, **FAST)
        publisher, subscriber = make_bus(settings, "w1"), make_bus(settings, "w2")
        wanted = ["hist.f", "plain.f"]
        subscriber.wanted_topics = lambda: wanted
        inbox = Inbox(subscriber)
        await publisher.start()
        await subscriber.start()
        try:
            await subscriber.subscribe(wanted)
            before = [await publisher.publish(_msg(t, 0)) for t in wanted]
            await inbox.until(lambda: len(inbox.messages) == 2)
            old = setup.kill_master()
            new = await asyncio.to_thread(setup.wait_for_failover, old)
            assert new is not old
            # The subscription broke: both topics are told, once it is back on the new master.
            await inbox.until(lambda: {t for gap in inbox.gaps for t in gap} == set(wanted), 30)
            after = [await publish_until_it_works(publisher, t, 1, 30.0) for t in wanted]
            await inbox.until(lambda: len(inbox.messages) == 4, 30.0)
            assert [(m.topic, m.payload) for m in inbox.messages[2:]] == [
                (t, _msg(t, 1).payload) for t in wanted
            ]
            # A promoted replica may lack writes the old master acknowledged: the history
            # topic starts a new epoch there.
            assert after[0].offset == 1 and after[0].epoch != before[0].epoch
            gone = await subscriber.history("hist.f", after=1, epoch=before[0].epoch)
            assert not gone.complete and gone.epoch == after[0].epoch

            async def both_healthy() -> bool:
                return publisher.healthy and subscriber.healthy

            await eventually(both_healthy, timeout_s=30)
        finally:
            await publisher.close()
            await subscriber.close()


@pytest.fixture
def failover_broker() -> Iterator[tuple[RedisSentinel, ServerProcess]]:
    with RedisSentinel() as setup:
        env = {
            "REDWIRE_TOPICS": json.dumps([{"pattern": "hist.*", "history_size": 100}]),
            "REDWIRE_BUS_PROBE_INTERVAL_S": "0.5",
            "REDWIRE_BUS_PROBE_TIMEOUT_S": "1",
            "REDWIRE_BUS_RECONNECT_MAX_S": "0.5",
        }
        server = serve(setup.url, workers=2, env=env)
        try:
            yield setup, server
        finally:
            assert server.stop() == 0


async def test_publishes_through_the_broker_continue_after_the_master_is_killed(
    failover_broker: tuple[RedisSentinel, ServerProcess],
) -> None:
    setup, broker = failover_broker
    subscribers = await clients_on_workers(broker.url, 2)
    publisher = await PubSubClient.connect(broker.url)
    try:
        for client in subscribers:
            await client.subscribe("news")
        assert (await publisher.publish("news", "before"))["op"] == "ack"
        for client in subscribers:
            assert (await client.next_message())["data"] == "before"
        old = setup.kill_master()
        await asyncio.to_thread(setup.wait_for_failover, old)
        for client in subscribers:  # their worker's subscription is back: it says so
            assert {"op": "gap", "topic": "news"} == await client.next_other(30)
        deadline = time.monotonic() + 30
        while True:  # refused publishes were not published: retrying them is safe
            reply = await publisher.publish("news", "after")
            if reply["op"] == "ack":
                break
            assert reply["code"] == "unavailable", reply
            assert time.monotonic() < deadline, "publishes did not come back"
            await asyncio.sleep(0.1)  # a client backing off after `unavailable`
        for client in subscribers:
            assert (await client.next_message(30))["data"] == "after"
    finally:
        for client in (*subscribers, publisher):
            await client.close()
