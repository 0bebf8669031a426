"""worker.hub over the in-memory bus: positions, replays, repairs, gaps, fan-out, poison.

Each session here is a stand-in with a real `Outbox`; what it received is parsed back from
the bytes written, as a client would. The bus is the real `MemoryBus`; a lost stretch of
pub/sub is made by taking the worker's bus off the topic in the network for a while.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from broker.bus.memory import MemoryBus, MemoryNetwork
from broker.connection import Connection, Role, TextMessage
from broker.envelope import ENCODING_JSON, ENCODING_MSGPACK, BusMessage
from broker.frames import Opcode, serialize_frame
from broker.settings import Settings, TopicRule
from worker.hub import Hub
from worker.outbox import Outbox
from worker.stats import WorkerStats

RULES = (TopicRule("hist.*", history_size=1000), TopicRule("short.*", history_size=10))


class FakeWS:
    def __init__(self) -> None:
        self.data = bytearray()
        self.write_paused = False
        self.closed: tuple[int, str] | None = None

    def buffered_bytes(self) -> int:
        return 0

    def write_frame(self, data: bytes) -> None:
        self.data += data

    def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.closed = (1006, "")


class FakeSession:
    """What the hub needs of worker.session.ClientSession."""

    def __init__(self, hub: Hub, *, max_bytes: int = 4 << 20, binary: bool = False) -> None:
        self.ws = FakeWS()
        self.live = True
        self.failed = False
        self.variant = (binary, None)
        self.outbox = Outbox(
            self.ws, hub.flusher, max_bytes=max_bytes, high_water=64 << 10,
            on_overflow=self._overflow, variant=self.variant,
        )  # fmt: skip
        self._parser = Connection(Role.CLIENT, max_message_bytes=16 << 20)
        self.frames: list[dict[str, Any]] = []

    def _overflow(self) -> None:
        self.live = False

    def send_control(self, obj: dict[str, Any]) -> None:
        if self.live:
            self.outbox.push(serialize_frame(Opcode.TEXT, json.dumps(obj).encode()))

    def fail(self) -> None:
        self.failed = True
        self.live = False

    def received(self) -> list[dict[str, Any]]:
        """Every frame written so far, decoded (JSON sessions)."""
        data, self.ws.data = bytes(self.ws.data), bytearray()
        if not data:
            return self.frames
        for event in self._parser.receive_data(data):
            assert isinstance(event, TextMessage)
            self.frames.append(json.loads(event.data))
        return self.frames

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.received() if f["op"] == "message"]

    def gaps(self) -> list[dict[str, Any]]:
        return [f for f in self.received() if f["op"] == "gap"]


@pytest.fixture
async def world() -> Any:
    network = MemoryNetwork()
    settings = Settings(topics=RULES, history_page_size=7, coalesce_window_s=0.0)
    bus = MemoryBus("w0", network, settings=settings)
    publisher = MemoryBus("pub", network, settings=settings)
    hub = Hub(bus, settings, WorkerStats())
    await bus.start()
    await publisher.start()
    yield hub, bus, publisher, network
    await bus.close()
    await publisher.close()


async def settle(hub: Hub, turns: int = 30) -> None:
    """Let the hub's tasks, the memory network and the flusher run (no timers involved)."""
    for _ in range(turns):
        await asyncio.sleep(0)  # one loop turn: no time passes, ready callbacks run
    hub.flusher.flush()


async def publish(bus: MemoryBus, topic: str, n: int, start: int = 0) -> list[int]:
    offsets = []
    for i in range(start, start + n):
        published = await bus.publish(BusMessage(topic, b'{"n":%d}' % i, ENCODING_JSON, "p"))
        offsets.append(published.offset)
    return offsets


def acked(session: FakeSession, fields: dict[str, Any] | None) -> None:
    """Queue the ack as the session does: right after hub.subscribe returns."""
    assert fields is not None
    session.send_control({"op": "ack", **fields})


async def test_plain_topic_one_encoding_shared_by_every_subscriber(world: Any) -> None:
    hub, _, publisher, _ = world
    a, b = FakeSession(hub), FakeSession(hub)
    assert await hub.subscribe(a, "plain", None) == {}
    assert await hub.subscribe(b, "plain", None) == {}
    await publisher.publish(BusMessage("plain", b'"hi"', ENCODING_JSON, "p"))
    await settle(hub)
    assert a.outbox.frames == [] and a.ws.data == b.ws.data  # the same bytes
    assert [f["data"] for f in a.received()] == ["hi"]
    assert "plain" in hub.topic_names()
    hub.unsubscribe(a, "plain")
    hub.unsubscribe(b, "plain")
    await settle(hub)
    assert hub.topic_names() == []


async def test_subscribe_without_since_starts_at_the_top(world: Any) -> None:
    hub, _, publisher, _ = world
    await publish(publisher, "hist.a", 5)
    s = FakeSession(hub)
    fields = await hub.subscribe(s, "hist.a", None)
    assert fields is not None and fields["offset"] == 5 and "recovered" not in fields
    acked(s, fields)
    await publish(publisher, "hist.a", 3, start=5)
    await settle(hub)
    assert s.offsets() == [6, 7, 8]
    assert s.frames[0]["op"] == "ack"


async def test_recovery_with_since_pages_history_then_goes_live(world: Any) -> None:
    hub, _, publisher, _ = world
    live = FakeSession(hub)
    acked(live, await hub.subscribe(live, "hist.b", None))
    await publish(publisher, "hist.b", 40)
    await settle(hub)
    epoch = hub.topics["hist.b"].epoch
    late = FakeSession(hub)
    fields = await hub.subscribe(late, "hist.b", (3, epoch))
    assert fields == {"offset": 3, "epoch": epoch, "recovered": True}
    acked(late, fields)
    # Publishing goes on while it replays in pages of 7.
    for i in range(40, 60):
        await publish(publisher, "hist.b", 1, start=i)
        await asyncio.sleep(0)  # one loop turn between publishes: the replay runs meanwhile
    await settle(hub)
    assert late.offsets() == list(range(4, 61))
    assert live.offsets() == list(range(1, 61))
    assert late.frames[0]["op"] == "ack" and late.gaps() == []


async def test_many_joins_while_live_get_no_duplicate_and_no_hole(world: Any) -> None:
    hub, _, publisher, _ = world
    first = FakeSession(hub)
    acked(first, await hub.subscribe(first, "hist.c", None))
    joined: list[tuple[FakeSession, int]] = []
    for i in range(60):
        await publish(publisher, "hist.c", 1, start=i)
        if i % 3 == 0:
            s = FakeSession(hub)
            state = hub.topics["hist.c"]
            since = (max(0, i - 5), state.epoch) if i % 2 else None
            fields = await hub.subscribe(s, "hist.c", since)
            acked(s, fields)
            assert fields is not None
            joined.append((s, fields["offset"]))
        await asyncio.sleep(0)  # one loop turn: deliveries and replays interleave
    await settle(hub)
    top = 60
    for s, start in joined:
        assert s.offsets() == list(range(start + 1, top + 1)), start
        assert s.gaps() == []
    assert not hub.topics["hist.c"].replays  # every replay merged


async def test_a_stretch_the_bus_missed_is_repaired_from_history(world: Any) -> None:
    hub, bus, publisher, network = world
    s = FakeSession(hub)
    acked(s, await hub.subscribe(s, "hist.d", None))
    await publish(publisher, "hist.d", 3)
    await settle(hub)
    network.topics["hist.d"].discard(bus)  # the worker's subscription is gone a while
    await publish(publisher, "hist.d", 4, start=3)
    network.topics["hist.d"].add(bus)
    await publish(publisher, "hist.d", 2, start=7)  # 8 arrives after 3: a hole 4..7
    await settle(hub)
    assert s.offsets() == list(range(1, 10)) and s.gaps() == []
    assert hub.stats.gap_repairs == 1


async def test_a_bus_interruption_repairs_an_idle_history_topic(world: Any) -> None:
    hub, bus, publisher, network = world
    s = FakeSession(hub)
    acked(s, await hub.subscribe(s, "hist.e", None))
    network.topics["hist.e"].discard(bus)
    await publish(publisher, "hist.e", 3)
    network.topics["hist.e"].add(bus)
    bus.on_gap(frozenset({"hist.e"}))  # the bus resubscribed: nothing else will arrive
    await settle(hub)
    assert s.offsets() == [1, 2, 3] and s.gaps() == []


async def test_what_history_lacks_is_announced_exactly(world: Any) -> None:
    hub, bus, publisher, network = world
    s = FakeSession(hub)
    acked(s, await hub.subscribe(s, "short.a", None))
    await publish(publisher, "short.a", 2)
    await settle(hub)
    epoch = hub.topics["short.a"].epoch
    network.topics["short.a"].discard(bus)
    await publish(publisher, "short.a", 15, start=2)  # history keeps 10: 8..17
    network.topics["short.a"].add(bus)
    await publish(publisher, "short.a", 1, start=17)
    await settle(hub)
    assert s.gaps() == [{"op": "gap", "topic": "short.a", "epoch": epoch, "from": 3, "to": 8}]
    assert s.offsets() == [1, 2, *range(9, 19)]
    ops = [f["op"] for f in s.frames]
    assert ops.index("gap") == 3  # after the ack and messages 1, 2: in order


async def test_a_recovery_from_too_far_back_announces_the_hole_then_replays(world: Any) -> None:
    hub, _, publisher, _ = world
    await publish(publisher, "short.b", 25)  # kept: 16..25
    s = FakeSession(hub)
    epoch = hub.bus.network.histories["short.b"].epoch
    fields = await hub.subscribe(s, "short.b", (4, epoch))
    assert fields == {"offset": 4, "epoch": epoch, "recovered": False}
    acked(s, fields)
    await settle(hub)
    assert s.gaps() == [{"op": "gap", "topic": "short.b", "epoch": epoch, "from": 5, "to": 15}]
    assert s.offsets() == list(range(16, 26))


async def test_a_new_epoch_is_announced_then_replayed_from_its_start(world: Any) -> None:
    hub, _, publisher, network = world
    s = FakeSession(hub)
    acked(s, await hub.subscribe(s, "hist.f", None))
    await publish(publisher, "hist.f", 3)
    await settle(hub)
    old = hub.topics["hist.f"].epoch
    network.forget()  # Redis came back empty
    await publish(publisher, "hist.f", 4)
    await settle(hub)
    new = network.histories["hist.f"].epoch
    assert new != old
    assert s.gaps() == [{"op": "gap", "topic": "hist.f", "epoch": old, "from": 4}]
    messages = [f for f in s.frames if f["op"] == "message"]
    assert [(m["epoch"], m["offset"]) for m in messages] == [
        *((old, n) for n in (1, 2, 3)),
        *((new, n) for n in (1, 2, 3, 4)),
    ]


async def test_since_in_an_ended_epoch_replays_the_new_one(world: Any) -> None:
    hub, _, publisher, _ = world
    await publish(publisher, "hist.g", 3)
    s = FakeSession(hub)
    epoch = hub.bus.network.histories["hist.g"].epoch
    fields = await hub.subscribe(s, "hist.g", (7, "gone-epoch"))
    assert fields == {"offset": 0, "epoch": epoch, "recovered": False}
    acked(s, fields)
    await settle(hub)
    assert s.gaps() == [{"op": "gap", "topic": "hist.g", "epoch": "gone-epoch", "from": 8}]
    assert s.offsets() == [1, 2, 3]


async def test_plain_topic_gap_comes_after_the_messages_queued_before_it(world: Any) -> None:
    hub, bus, publisher, _ = world
    s = FakeSession(hub)
    acked(s, await hub.subscribe(s, "plain.g", None))
    await settle(hub)
    s.ws.write_paused = True  # what is queued now waits in the outbox
    await publisher.publish(BusMessage("plain.g", b"1", ENCODING_JSON, "p"))
    await settle(hub)
    assert s.outbox.frames
    bus.on_gap(frozenset({"plain.g"}))
    await publisher.publish(BusMessage("plain.g", b"2", ENCODING_JSON, "p"))
    await settle(hub)
    s.ws.write_paused = False
    s.outbox.writable()
    await settle(hub)
    assert [(f["op"], f.get("data")) for f in s.received()[1:]] == [
        ("message", 1),
        ("gap", None),
        ("message", 2),
    ]


async def test_a_poisoned_message_costs_only_itself(world: Any) -> None:
    hub = world[0]
    json_sub, msgpack_sub, other = FakeSession(hub), FakeSession(hub, binary=True), FakeSession(hub)
    await hub.subscribe(json_sub, "plain.p", None)
    await hub.subscribe(msgpack_sub, "plain.p", None)
    await hub.subscribe(other, "plain.q", None)
    deep = b"\x91" * 3000 + b"\x01"  # [[[...1...]]] 3000 deep: no JSON conversion survives it
    poison = BusMessage("plain.p", deep, ENCODING_MSGPACK, "sdk")
    hub.deliver([poison, BusMessage("plain.q", b'"fine"', ENCODING_JSON, "p")])
    await settle(hub)
    assert [f["data"] for f in other.received()] == ["fine"]
    assert json_sub.ws.data == b""  # skipped for JSON only
    assert msgpack_sub.ws.data != b""  # msgpack needs no conversion
    assert hub.stats.undeliverable == 1


async def test_a_slow_consumer_is_closed_1013_and_the_others_lose_nothing(world: Any) -> None:
    hub, _, publisher, _ = world
    slow = FakeSession(hub, max_bytes=100 << 10)
    fast = FakeSession(hub)
    acked(slow, await hub.subscribe(slow, "hist.s", None))
    acked(fast, await hub.subscribe(fast, "hist.s", None))
    slow.ws.write_paused = True  # it reads nothing
    big = b'"' + b"x" * 4000 + b'"'
    for _ in range(100):
        await publisher.publish(BusMessage("hist.s", big, ENCODING_JSON, "p"))
    await settle(hub)
    assert slow.ws.closed == (1013, "slow consumer")
    assert slow.outbox.bytes == 0  # its backlog was dropped
    assert fast.offsets() == list(range(1, 101))


async def test_a_replay_goes_as_fast_as_the_client_reads(world: Any) -> None:
    hub, _, publisher, _ = world
    await publish(publisher, "hist.r", 500)
    s = FakeSession(hub, max_bytes=64 << 10)  # far less than the replay
    s.ws.write_paused = True
    epoch = hub.bus.network.histories["hist.r"].epoch
    acked(s, await hub.subscribe(s, "hist.r", (0, epoch)))
    await settle(hub)
    assert s.ws.closed is None and s.outbox.bytes <= 64 << 10
    received: list[int] = []
    for turn in range(5000):
        s.ws.write_paused = turn % 2 == 1  # the client reads, stops, reads, ...
        if not s.ws.write_paused:
            s.outbox.writable()
        await settle(hub, 3)
        assert s.outbox.bytes <= 64 << 10
        received += s.offsets()
        s.frames.clear()
        if len(received) == 500:
            break
    assert received == list(range(1, 501)) and s.ws.closed is None
    assert s in hub.topics["hist.r"].live  # caught up: merged into the live group


async def test_a_failed_bus_subscribe_leaves_nothing_behind(world: Any) -> None:
    hub, bus, _, _ = world

    async def refuse(topics: Any) -> None:
        from broker.errors import BusUnavailable

        raise BusUnavailable("no Redis")

    bus.subscribe = refuse  # type: ignore[method-assign]
    s = FakeSession(hub)
    with pytest.raises(Exception, match="no Redis"):
        await hub.subscribe(s, "plain.z", None)
    assert hub.topic_names() == []


async def test_a_session_gone_during_its_subscribe_is_not_added(world: Any) -> None:
    hub, _, _, _ = world
    s = FakeSession(hub)
    task = asyncio.ensure_future(hub.subscribe(s, "hist.gone", None))
    s.live = False
    assert await task is None
    await settle(hub)
    assert hub.topic_names() == []
