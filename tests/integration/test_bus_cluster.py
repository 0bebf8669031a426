"""The Redis Cluster bus (`redis+cluster://`) against a real local cluster of 3 masters
(tests/support/redis_cluster.py): the bus contract, sharded channels per shard, resubscription
after a lost shard connection, live slot migrations, a master killed, a failover to a replica
(a cluster of its own), `redwire serve --workers 2` on it, and the SDK.

The contract cases of tests/integration/test_bus_contract.py that hold for any bus run here
as they are, with this module's `harness` (a cluster bus); the few that assume one connection
(command counts, the order of two topics' messages, which may live on two shards) have cluster
versions below.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import integration.test_bus_contract as contract
import pytest
from integration.test_bus_contract import (  # noqa: F401  (collected here, with this module's harness)
    SETTINGS,
    Inbox,
    _msg,
    fence,
    test_a_closed_bus_leaves_presence,
    test_bad_history_arguments_are_refused,
    test_history_after_an_offset_is_exactly_what_followed,
    test_history_of_another_epoch_is_incomplete_and_empty,
    test_history_read_limit_makes_it_incomplete,
    test_history_that_no_longer_reaches_back_is_incomplete,
    test_history_topic_numbers_messages_in_one_epoch,
    test_join_and_leave_reach_subscribers_in_order_with_messages,
    test_position_only_and_position_before_the_first_publish,
    test_presence_add_remove_list,
    test_publish_with_no_subscriber_is_fine,
    test_stats_and_health,
    test_subscribe_then_publish_delivers_once_in_order_untouched,
    test_two_buses_on_one_bus_network_both_receive,
    test_unsubscribe_of_what_is_not_subscribed_is_harmless,
    test_unsubscribe_right_after_publish_delivers_nothing_more,
    test_unsubscribe_stops_delivery,
)
from support.broker_client import PubSubClient, clients_on_workers
from support.processes import ServerProcess, serve
from support.redis_cluster import ClusterNode, RedisCluster

from broker.bus import Bus, Published, make_bus
from broker.bus.redis_cluster import RedisClusterBus, keyslot
from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusError, BusUnavailable
from broker.settings import Settings, TopicRule

PREFIX = SETTINGS.channel_prefix


@dataclass
class ClusterHarness(contract.Harness):
    """The contract's harness, making cluster buses."""

    async def bus(self, origin: str = "w1", **overrides: Any) -> Bus:
        assert self.url is not None
        bus = make_bus(SETTINGS.replace(redis_url=self.url, **overrides), origin)
        assert isinstance(bus, RedisClusterBus)
        self.buses.append(bus)
        await bus.start()
        assert bus.healthy
        return bus


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The session cluster, emptied."""
    redis_cluster.flushall()
    return redis_cluster


@pytest.fixture
async def harness(cluster: RedisCluster) -> AsyncIterator[ClusterHarness]:
    h = ClusterHarness("cluster", cluster.url)
    yield h
    for bus in h.buses:
        await bus.close()


def topics_on_every_shard(cluster: RedisCluster, per_shard: int, stem: str) -> list[str]:
    """`per_shard` topics `stem.N` for each master, in master order."""
    chosen: dict[int, list[str]] = {node.port: [] for node in cluster.nodes}
    n = 0
    while any(len(topics) < per_shard for topics in chosen.values()):
        topic = f"{stem}.{n}"
        n += 1
        topics = chosen[cluster.owner(keyslot(topic.encode())).port]
        if len(topics) < per_shard:
            topics.append(topic)
    return [topic for node in cluster.nodes for topic in chosen[node.port]]


def shard_channels(node: ClusterNode, pattern: str) -> set[bytes]:
    return set(node.command("PUBSUB", "SHARDCHANNELS", pattern))


def topic_channel(topic: str) -> bytes:
    return f"{PREFIX}t:{{{topic}}}".encode()


# --- the cluster versions of contract cases ------------------------------------------------------


async def test_idempotency_key_publishes_once_per_topic(harness: ClusterHarness) -> None:
    a, b = await harness.bus("w1"), await harness.bus("w2")
    inbox = Inbox(b)
    await b.subscribe(["hist.k", "hist.other"])
    first = await a.publish(_msg("hist.k", 1), key="order-17")
    again = await b.publish(_msg("hist.k", 3), key="order-17")  # a retry, from any bus
    assert again == Published(1, first.epoch, duplicate=True)
    elsewhere = await a.publish(_msg("hist.other", 4), key="order-17")  # keys are per topic
    assert elsewhere.offset == 1 and not elsewhere.duplicate
    k, other = await fence(a, "hist.k", inbox), await fence(a, "hist.other", inbox)
    received = [m.payload for m in k[0] + other[0] if m.topic in ("hist.k", "hist.other")]
    assert sorted(received) == sorted([_msg("hist.k", 1).payload, _msg("hist.other", 4).payload])
    retries = await asyncio.gather(*(a.publish(_msg("hist.k", 9), key="burst") for _ in range(5)))
    assert len({p.offset for p in retries}) == 1
    assert [p.duplicate for p in retries] == [False, True, True, True, True]


async def test_keys_work_on_plain_topics_per_topic(harness: ClusterHarness) -> None:
    a, b = await harness.bus("w1"), await harness.bus("w2")
    inbox = Inbox(b)
    await b.subscribe(["plain", "plain2"])
    assert await a.publish(_msg("plain", 1), key="k") == Published()
    assert await b.publish(_msg("plain", 2), key="k") == Published(duplicate=True)
    assert await a.publish(_msg("plain2", 3), key="k") == Published()  # keys are per topic
    assert await a.publish(_msg("plain", 4)) == Published()
    [plain] = await fence(a, "plain", inbox)
    assert [m.payload for m in plain if m.topic == "plain"] == [b'{"n":1}', b'{"n":4}']
    await inbox.until(lambda: any(m.topic == "plain2" for m in inbox.messages + plain))


async def test_subscribe_many_topics_on_every_shard(
    cluster: RedisCluster, harness: ClusterHarness
) -> None:
    bus = await harness.bus(bus_resubscribe_batch=500)
    inbox = Inbox(bus)
    topics = [f"topic-{i}" for i in range(1200)]
    await bus.subscribe(topics)
    assert bus.stats()["subscribed_channels"] == 1200
    per_node = [shard_channels(node, f"{PREFIX}t:*") for node in cluster.nodes]
    assert sum(len(channels) for channels in per_node) == 1200
    assert all(len(channels) > 300 for channels in per_node)  # spread, not piled up
    sent = [BusMessage(t, t.encode(), ENCODING_JSON) for t in topics]
    await asyncio.gather(*(bus.publish(m) for m in sent))
    await inbox.until(lambda: len(inbox.messages) == len(sent))
    assert sorted(m.topic for m in inbox.messages) == sorted(topics)


async def test_concurrent_publishes_on_one_topic_are_batched(harness: ClusterHarness) -> None:
    bus = await harness.bus(bus_publish_batch=64, bus_cluster_refresh_s=60.0)  # only ours
    inbox = Inbox(bus)
    await bus.subscribe(["burst"])
    before = bus.stats()["publish_batches"]
    sent = [BusMessage("burst", b"%d" % i, ENCODING_JSON) for i in range(200)]
    await asyncio.gather(*(bus.publish(m) for m in sent))
    assert bus.stats()["publish_batches"] - before == 4  # 64 + 64 + 64 + 8, on its shard
    assert await inbox.fence(bus, "burst") == sent


async def test_calls_before_start_and_after_close_raise(cluster: RedisCluster) -> None:
    bus = RedisClusterBus(cluster.url, SETTINGS, "w1")
    for call in (
        bus.publish(_msg("t", 0)),
        bus.subscribe(["t"]),
        bus.history("hist.t", after=None, epoch=None),
        bus.presence_add("room.t", "c", {}),
    ):
        with pytest.raises(BusUnavailable):
            await call
    await bus.start()
    assert bus.healthy and bus.stats()["cluster_shards"] == 3
    await bus.close()
    assert not bus.healthy
    with pytest.raises(BusUnavailable):
        await bus.publish(_msg("t", 0))


# --- shards ------------------------------------------------------------------------------------


def test_keyslot_is_the_cluster_s(cluster: RedisCluster) -> None:
    for key in (b"chat.1", b"redwire:{chat.1}:m", b"redwire:t:{room-7}", b"{}x", b"a{b}{c}"):
        assert keyslot(key) == cluster.keyslot(key)


async def test_each_shard_carries_only_its_own_topics(
    cluster: RedisCluster, harness: ClusterHarness
) -> None:
    topics = topics_on_every_shard(cluster, 4, "chat")
    a, b = await harness.bus("w1"), await harness.bus("w2")
    inbox_a, inbox_b = Inbox(a), Inbox(b)
    for node in cluster.nodes:  # no topic yet: no subscriber connection anywhere
        assert shard_channels(node, f"{PREFIX}probe:*") == set()
    await asyncio.gather(a.subscribe(topics), b.subscribe(topics[:6]))  # b: shards 0 and 1
    for i, node in enumerate(cluster.nodes):
        own = {t for t in topics if cluster.owner(keyslot(t.encode())) is node}
        assert len(own) == 4
        assert shard_channels(node, f"{PREFIX}t:*") == {topic_channel(t) for t in own}
        for channel in shard_channels(node, f"{PREFIX}probe:*"):  # a probe per bus and shard
            assert cluster.owner(keyslot(channel)) is node
        # one subscriber (with its probe) per bus and shard that has its topics
        assert len(shard_channels(node, f"{PREFIX}probe:*")) == (2 if i < 2 else 1)
        assert node.command("PUBSUB", "CHANNELS") == []  # no classic pub/sub at all
    sent = {t: [_msg(t, i) for i in range(20)] for t in topics}
    for i in range(20):
        for t in topics:
            await b.publish(sent[t][i])
    got_a: list[BusMessage] = []
    got_b: list[BusMessage] = []
    for t in topics:  # a fence per topic: each shard's messages are in before its marker
        before_a, before_b = (
            await fence(b, t, inbox_a, inbox_b)
            if t in topics[:6]
            else (await fence(b, t, inbox_a) + [[]])
        )
        got_a += before_a
        got_b += before_b
    for t in topics:
        assert [m for m in got_a if m.topic == t] == sent[t]
        assert [m for m in got_b if m.topic == t] == (sent[t] if t in topics[:6] else [])
    await a.unsubscribe(topics)
    await b.unsubscribe(topics[:6])
    for node in cluster.nodes:
        assert shard_channels(node, f"{PREFIX}t:*") == set()


async def test_a_lost_shard_connection_resubscribes_its_topics_with_a_gap(
    cluster: RedisCluster, harness: ClusterHarness
) -> None:
    topics = topics_on_every_shard(cluster, 2, "keep")
    wanted = set(topics)
    bus = await harness.bus()
    bus.wanted_topics = lambda: sorted(wanted)
    inbox = Inbox(bus)
    await bus.subscribe(topics)
    victim = cluster.nodes[1]
    assert victim.command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
    await inbox.until(lambda: inbox.gaps and bus.healthy)
    assert inbox.gaps == [frozenset(topics[2:4])]  # only the topics of the victim's shard
    assert bus.stats()["reconnects"] == 1
    await inbox.receive(bus, *topics)
    assert shard_channels(victim, f"{PREFIX}t:*") == {topic_channel(t) for t in topics[2:4]}


async def test_presence_works_across_slots_and_dead_entries_are_swept(
    cluster: RedisCluster, harness: ClusterHarness
) -> None:
    rooms = topics_on_every_shard(cluster, 1, "room")  # room.* has join/leave events
    a, b = await harness.bus("w1", presence_ttl_s=1.0), await harness.bus("w2", presence_ttl_s=1.0)
    inbox = Inbox(b)
    await b.subscribe(rooms)
    for room in rooms:
        await a.presence_add(room, "c-" + room, {"room": room})
    for room in rooms:
        assert await b.presence(room) == {"c-" + room: {"room": room}}
        # the entry's worker key is in the room's slot: nothing spans two slots
        assert cluster.keyslot(f"{PREFIX}{{{room}}}:w:{a.instance}") == keyslot(room.encode())
    assert isinstance(a, RedisClusterBus)
    for shard in a._shards.values():  # a stops beating: its worker keys expire, b sweeps
        assert shard._presence_task is not None
        shard._presence_task.cancel()
    await inbox.until(lambda: len([p for p in inbox.presence if p[1] == "leave"]) == 3, 10.0)
    for room in rooms:
        assert await b.presence(room) == {}


# --- slot migrations -----------------------------------------------------------------------------


@dataclass
class Load:
    """Publishes on `topics` one after another, as fast as acks come back."""

    bus: Bus
    topics: list[str]
    acks: dict[str, list[Published]]
    count: int = 0
    running: bool = True

    async def run(self) -> None:
        n = 0
        while self.running:
            for topic in self.topics:
                self.acks[topic].append(await self.bus.publish(_msg(topic, n)))
            n += 1
            self.count = n

    def wait_for_more(self, more: int, loop: asyncio.AbstractEventLoop) -> None:
        """From another thread: block until `more` rounds were published (bounded)."""
        target = self.count + more
        deadline = time.monotonic() + 30
        while self.count < target:
            assert time.monotonic() < deadline, "publishing stalled"
            threading.Event().wait(0.01)  # another thread polls the load's counter


def migration_target(cluster: RedisCluster, topic: str) -> ClusterNode:
    owner = cluster.owner(keyslot(topic.encode()))
    return next(node for node in cluster.nodes if node is not owner)


async def test_a_slot_migration_loses_nothing_on_history_and_announces_a_gap_on_plain(
    cluster: RedisCluster, harness: ClusterHarness
) -> None:
    topics = ["hist.moving", "plain.moving"]
    rules = (TopicRule("hist.*", history_size=100000),)
    publisher = await harness.bus("w1", topics=rules)
    subscriber = await harness.bus("w2", topics=rules)
    wanted = set(topics)
    subscriber.wanted_topics = lambda: sorted(wanted)
    inbox = Inbox(subscriber)
    await subscriber.subscribe(topics)
    first_target = migration_target(cluster, topics[0])
    # The subscriber has no connection to where the first topic goes: it is made for it.
    assert not any(b":w2:" in ch for ch in shard_channels(first_target, f"{PREFIX}probe:*"))
    load = Load(publisher, topics, {t: [] for t in topics})
    task = asyncio.ensure_future(load.run())
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(load.wait_for_more, 20, loop)
        for topic in topics:
            slot = keyslot(topic.encode())
            await asyncio.to_thread(
                cluster.migrate_slot,
                slot,
                migration_target(cluster, topic),
                lambda step: load.wait_for_more(20, loop),  # publishes in every phase
            )
            await asyncio.to_thread(load.wait_for_more, 20, loop)
    finally:
        load.running = False
        await task
    await inbox.until(lambda: {t for gap in inbox.gaps for t in gap} == wanted)
    history_acks = load.acks["hist.moving"]
    epoch = history_acks[0].epoch
    assert [(p.offset, p.epoch) for p in history_acks] == [
        (n, epoch) for n in range(1, len(history_acks) + 1)
    ]  # every publish went through, one epoch: MIGRATE kept it
    assert publisher.stats()["cluster_redirects"] >= 1  # ASK (and MOVED) were followed
    # History holds everything; what the live subscription skipped is announced (the gap),
    # and the hub repairs it from history.
    read = await subscriber.history("hist.moving", after=0, epoch=epoch)
    assert read.complete and [m.offset for m in read.messages] == [p.offset for p in history_acks]
    before: list[BusMessage] = []
    for topic in topics:  # a fence per topic (shard); what came before all of them
        before += await inbox.fence(publisher, topic)
    for topic in topics:
        received = [m for m in before if m.topic == topic]
        payloads = [m.payload for m in received]
        assert len(set(payloads)) == len(payloads)  # no duplicate
        sent = [_msg(topic, n).payload for n in range(len(load.acks[topic]))]
        assert payloads == [p for p in sent if p in set(payloads)]  # in order
        assert payloads[-20:] == sent[-20:]  # live again after the move
    for topic in topics:
        owner = cluster.owner(keyslot(topic.encode()))
        assert topic_channel(topic) in shard_channels(owner, f"{PREFIX}t:*")
        for node in cluster.nodes:
            if node is not owner:
                assert topic_channel(topic) not in shard_channels(node, f"{PREFIX}t:*")


# --- masters killed, failed over ---------------------------------------------------------------

FAST = {
    "bus_probe_interval_s": 0.3,
    "bus_probe_timeout_s": 1.0,
    "bus_reconnect_max_s": 0.3,
}


async def publish_until_it_works(bus: Bus, topic: str, n: int) -> Published:
    """Publish, retrying refusals (`unavailable`: never published) for a while."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await bus.publish(_msg(topic, n))
        except BusError:
            assert time.monotonic() < deadline, f"publishing on {topic} did not come back"
            await asyncio.sleep(0.1)  # a publisher retrying after a refusal, as a client would


async def test_a_master_down_stops_only_its_shard_and_is_followed_when_back(
    cluster: RedisCluster, harness: ClusterHarness
) -> None:
    victim = cluster.nodes[1]
    topics = topics_on_every_shard(cluster, 1, "hist.node") + topics_on_every_shard(
        cluster, 1, "node"
    )
    on_victim = {t for t in topics if cluster.owner(keyslot(t.encode())) is victim}
    assert len(on_victim) == 2
    publisher, subscriber = await harness.bus("w1", **FAST), await harness.bus("w2", **FAST)
    subscriber.wanted_topics = lambda: sorted(topics)
    inbox = Inbox(subscriber)
    await subscriber.subscribe(topics)
    before = {t: await publisher.publish(_msg(t, 0)) for t in topics}
    await inbox.until(lambda: len(inbox.messages) == len(topics))
    await asyncio.to_thread(cluster.kill, victim)
    try:
        for t in topics:  # the other shards go on
            if t not in on_victim:
                await publisher.publish(_msg(t, 1))
        others = len(topics) - len(on_victim)
        await inbox.until(lambda: len(inbox.messages) == len(topics) + others)
    finally:
        await asyncio.to_thread(cluster.start, victim)
    await inbox.until(lambda: {t for gap in inbox.gaps for t in gap} == on_victim, 30)
    after = {t: await publish_until_it_works(publisher, t, 2) for t in topics}
    await inbox.until(lambda: len(inbox.messages) == 2 * len(topics) + others, 30)
    assert {m.topic for m in inbox.messages[-len(topics) :]} == set(topics)
    for t in topics:
        if t.startswith("hist."):  # the victim came back empty: its topic's epoch ended
            assert (after[t].epoch != before[t].epoch) == (t in on_victim)


async def test_a_master_back_from_an_older_snapshot_starts_a_new_epoch(
    cluster: RedisCluster, harness: ClusterHarness
) -> None:
    # What one Redis does after a restart without AOF (the snapshot may lack acknowledged
    # writes) holds on a Cluster too: the master's old id must not vouch for its own keys.
    victim = cluster.nodes[2]
    topic = topics_on_every_shard(cluster, 1, "hist.snap")[2]
    assert cluster.owner(keyslot(topic.encode())) is victim
    bus = await harness.bus("w1", **FAST)
    first = await bus.publish(_msg(topic, 1))
    await asyncio.to_thread(victim.command, "SAVE")  # a snapshot with offset 1 ...
    second = await bus.publish(_msg(topic, 2))  # ... and an acknowledged write after it
    assert (first.offset, second.offset) == (1, 2)
    await asyncio.to_thread(cluster.kill, victim)
    await asyncio.to_thread(cluster.start, victim)  # loads the snapshot: offset 1 only
    third = await publish_until_it_works(bus, topic, 3)
    assert third.epoch != first.epoch and third.offset == 1
    read = await bus.history(topic, after=0, epoch=first.epoch)
    assert not read.complete and read.messages == []


async def test_a_cluster_failover_is_followed() -> None:
    with RedisCluster(masters=3, replicas=1) as replicated:
        settings = SETTINGS.replace(redis_url=replicated.url, **FAST)
        publisher, subscriber = make_bus(settings, "w1"), make_bus(settings, "w2")
        topics = topics_on_every_shard(replicated, 1, "hist.fo") + topics_on_every_shard(
            replicated, 1, "fo"
        )
        subscriber.wanted_topics = lambda: sorted(topics)
        inbox = Inbox(subscriber)
        await publisher.start()
        await subscriber.start()
        try:
            await subscriber.subscribe(topics)
            before = {t: await publisher.publish(_msg(t, 0)) for t in topics}
            await inbox.until(lambda: len(inbox.messages) == len(topics))
            old = replicated.nodes[1]
            moved = {t for t in topics if replicated.owner(keyslot(t.encode())) is old}
            new = await asyncio.to_thread(replicated.failover, old)
            assert {t for t in topics if replicated.owner(keyslot(t.encode())) is new} == moved
            # The shard's topics are resubscribed on its new master, with a gap.
            await inbox.until(lambda: {t for gap in inbox.gaps for t in gap} >= moved, 30)
            after = {t: await publish_until_it_works(publisher, t, 1) for t in topics}
            await inbox.until(lambda: len(inbox.messages) == 2 * len(topics), 30)
            assert sorted(m.topic for m in inbox.messages[len(topics) :]) == sorted(topics)
            for topic in topics:
                channels = shard_channels(new, f"{PREFIX}t:*")
                assert (topic_channel(topic) in channels) == (topic in moved)
                if topic.startswith("hist."):  # a promoted replica: a new epoch, announced
                    assert (after[topic].epoch != before[topic].epoch) == (topic in moved)
        finally:
            await publisher.close()
            await subscriber.close()


# --- redwire serve on the cluster --------------------------------------------------------------

RULES = [{"pattern": "hist.*", "history_size": 1000}]


@pytest.fixture(scope="module")
def broker(redis_cluster: RedisCluster) -> Iterator[ServerProcess]:
    env = {
        "REDWIRE_TOPICS": json.dumps(RULES),
        "REDWIRE_CHANNEL_PREFIX": "clusterbroker:",
        "REDWIRE_BUS_PROBE_INTERVAL_S": "0.5",
        "REDWIRE_BUS_CLUSTER_REFRESH_S": "1",
    }
    server = serve(redis_cluster.url, workers=2, env=env)
    yield server
    assert server.stop() == 0


async def next_of(client: PubSubClient, topic: str, timeout_s: float = 10.0) -> dict[str, Any]:
    while True:
        message = await client.next_message(timeout_s)
        if message["topic"] == topic:
            return message


async def test_subscribers_on_two_workers_get_every_shard_s_topics_in_order(
    redis_cluster: RedisCluster, broker: ServerProcess
) -> None:
    plain = topics_on_every_shard(redis_cluster, 1, "feed")
    history = topics_on_every_shard(redis_cluster, 1, "hist.feed")
    topics = plain + history
    subscribers = await clients_on_workers(broker.url, 2)
    publisher = await PubSubClient.connect(broker.url)
    acks: dict[str, list[dict[str, Any]]] = {t: [] for t in topics}
    try:
        for client in subscribers:
            for topic in topics:
                await client.subscribe(topic)
        for n in range(30):
            for topic in topics:
                ack = await publisher.publish(topic, {"n": n})
                assert ack["op"] == "ack", ack
                acks[topic].append(ack)
        for client in subscribers:
            got: dict[str, list[dict[str, Any]]] = {t: [] for t in topics}
            for _ in range(30 * len(topics)):
                message = await client.next_message()
                got[message["topic"]].append(message)
            for topic in topics:
                assert [m["data"]["n"] for m in got[topic]] == list(range(30))
            for topic in history:
                assert [m["offset"] for m in got[topic]] == [a["offset"] for a in acks[topic]]
        # Recovery: a client that saw offset 10 of each history topic gets 11.. then live.
        late = await PubSubClient.connect(broker.url)
        for topic in history:
            since = {"offset": 10, "epoch": acks[topic][0]["epoch"]}
            ack = await late.request(op="subscribe", topic=topic, since=since)
            assert ack["op"] == "ack" and ack["recovered"] is True, ack
            assert [(await next_of(late, topic))["offset"] for _ in range(20)] == list(
                range(11, 31)
            )
            live = await publisher.publish(topic, "live")
            assert (await next_of(late, topic))["offset"] == live["offset"] == 31
        await late.close()
    finally:
        for client in (*subscribers, publisher):
            await client.close()


async def test_a_live_slot_migration_through_the_broker(
    redis_cluster: RedisCluster, broker: ServerProcess
) -> None:
    history, plain = "hist.migrating", "migrating"
    subscribers = await clients_on_workers(broker.url, 2)
    publisher = await PubSubClient.connect(broker.url)
    for client in subscribers:
        for topic in (history, plain):
            await client.subscribe(topic)
    acks: dict[str, list[dict[str, Any]]] = {history: [], plain: []}
    running = True

    async def publish_forever() -> None:
        n = 0
        while running:
            for topic in (history, plain):
                reply = await publisher.publish(topic, {"n": n})
                if reply["op"] == "ack":
                    acks[topic].append({**reply, "n": n})
            n += 1

    def published() -> int:
        return len(acks[history])

    def wait_for_more(more: int) -> None:
        target, deadline = published() + more, time.monotonic() + 30
        while published() < target:
            assert time.monotonic() < deadline, "publishing stalled"
            threading.Event().wait(0.01)  # another thread polls the publisher's count

    task = asyncio.ensure_future(publish_forever())
    try:
        await asyncio.to_thread(wait_for_more, 20)
        for topic in (history, plain):
            target = migration_target(redis_cluster, topic)
            slot = keyslot(topic.encode())
            await asyncio.to_thread(
                redis_cluster.migrate_slot, slot, target, lambda step: wait_for_more(20)
            )
            await asyncio.to_thread(wait_for_more, 20)
    finally:
        running = False
        await task
    marker = await publisher.publish(plain, "end")
    history_marker = await publisher.publish(history, "end")
    assert marker["op"] == history_marker["op"] == "ack"
    epoch = acks[history][0]["epoch"]
    assert {a["epoch"] for a in acks[history]} == {epoch}
    for client in subscribers:
        got: dict[str, list[dict[str, Any]]] = {history: [], plain: []}
        ended: set[str] = set()
        while ended != {history, plain}:
            message = await client.next_message()
            if message["data"] == "end":
                ended.add(message["topic"])
            else:
                got[message["topic"]].append(message)
        # History: every acked message, once, in order: the hub repaired the gap from history.
        assert [m["offset"] for m in got[history]] == [a["offset"] for a in acks[history]]
        # Plain: in order, no duplicate, and the skipped part announced with a gap frame.
        seen = [m["data"]["n"] for m in got[plain]]
        assert seen == sorted(set(seen))
        gaps = []
        while not client.others.empty():
            gaps.append(client.others.get_nowait())
        assert {"op": "gap", "topic": plain} in gaps, gaps
        assert not any(g.get("topic") == history for g in gaps), gaps
    for client in (*subscribers, publisher):
        await client.close()


async def test_the_sdk_publishes_into_the_cluster_and_consumes_from_it(
    redis_cluster: RedisCluster, broker: ServerProcess
) -> None:
    from client.publisher import AsyncPublisher
    from client.subscriber import Message, Subscriber

    settings = Settings(
        channel_prefix="clusterbroker:",  # the broker's
        topics=tuple(TopicRule(r["pattern"], history_size=r["history_size"]) for r in RULES),
    )
    topics = [*topics_on_every_shard(redis_cluster, 1, "sdk"), "hist.sdk"]
    client = await PubSubClient.connect(broker.url)
    try:
        for topic in topics:
            await client.subscribe(topic)
        async with (
            Subscriber(redis_cluster.url, topics, settings=settings) as subscriber,
            AsyncPublisher(redis_cluster.url, settings=settings) as publisher,
        ):
            for n in range(10):
                for topic in topics:
                    await publisher.publish(topic, {"n": n})
            got: dict[str, list[int]] = {t: [] for t in topics}
            while sum(map(len, got.values())) < 10 * len(topics):
                event = await subscriber.get(10)
                assert isinstance(event, Message), event  # no gap: nothing broke
                got[event.topic].append(event.data["n"])
            assert got == {t: list(range(10)) for t in topics}
        seen: dict[str, list[int]] = {t: [] for t in topics}
        for _ in range(10 * len(topics)):
            message = await client.next_message()
            seen[message["topic"]].append(message["data"]["n"])
        assert seen == {t: list(range(10)) for t in topics}
    finally:
        await client.close()
