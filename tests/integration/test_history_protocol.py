"""History, recovery, idempotency and presence as a client sees them on the wire."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import pytest
from support.broker_client import PubSubClient
from support.processes import ServerProcess, redwire

RULES = [
    {"pattern": "hist.*", "history_size": 100},
    {"pattern": "room.*", "presence": True, "join_leave": True},
]


@pytest.fixture(scope="module")
def broker(redis_server) -> Iterator[ServerProcess]:
    server = ServerProcess(
        redwire(
            "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
            "--redis", redis_server.url,
        ),
        env={
            "REDWIRE_TOPICS": json.dumps(RULES),
            "REDWIRE_API_KEY": "k",
            "REDWIRE_CHANNEL_PREFIX": "histproto:",
        },
    )  # fmt: skip
    yield server
    assert server.stop() == 0


async def test_offsets_in_acks_and_messages(broker) -> None:
    client = await PubSubClient.connect(broker.url)
    ack = await client.subscribe("hist.a")
    assert ack["offset"] == 0 and isinstance(ack["epoch"], str) and "recovered" not in ack
    first = await client.publish("hist.a", "one")
    second = await client.publish("hist.a", "two")
    assert (first["offset"], second["offset"]) == (1, 2)
    assert first["epoch"] == second["epoch"] == ack["epoch"]
    messages = [await client.next_message(), await client.next_message()]
    assert [(m["offset"], m["data"]) for m in messages] == [(1, "one"), (2, "two")]
    assert {m["epoch"] for m in messages} == {ack["epoch"]}
    await client.close()


async def test_subscribe_since_replays_then_goes_live(broker) -> None:
    publisher = await PubSubClient.connect(broker.url)
    for n in range(5):
        await publisher.publish("hist.b", n)
    late = await PubSubClient.connect(broker.url)
    probe = await late.subscribe("hist.c")  # learn the epoch format; hist.b is what we test
    assert probe["offset"] == 0
    position = await publisher.publish("hist.b", 5)
    epoch = position["epoch"]
    ack = await late.request(op="subscribe", topic="hist.b", since={"offset": 2, "epoch": epoch})
    # The ack names where the subscription starts: everything after it follows.
    assert ack["op"] == "ack" and ack["recovered"] is True and ack["offset"] == 2
    replayed = [(await late.next_message())["offset"] for _ in range(4)]
    assert replayed == [3, 4, 5, 6]
    await publisher.publish("hist.b", 6)
    assert (await late.next_message())["offset"] == 7
    assert late.messages.empty()
    await publisher.close()
    await late.close()


async def test_since_not_recoverable_says_so(broker) -> None:
    client = await PubSubClient.connect(broker.url)
    ack = await client.request(
        op="subscribe", topic="hist.d", since={"offset": 3, "epoch": "not-the-epoch"}
    )
    assert ack["op"] == "ack" and ack["recovered"] is False
    plain = await client.request(op="subscribe", topic="plain.x", since={"offset": 1, "epoch": "e"})
    assert plain["op"] == "ack" and plain["recovered"] is False
    bad = await client.request(op="subscribe", topic="hist.e", since={"offset": -1, "epoch": "e"})
    assert bad["op"] == "error" and bad["code"] == "bad_request"
    await client.close()


async def test_history_too_short_is_not_recovered(broker) -> None:
    publisher = await PubSubClient.connect(broker.url)
    first = await publisher.publish("hist.short", 0)
    for n in range(1, 150):  # history_size is 100
        await publisher.publish("hist.short", n)
    late = await PubSubClient.connect(broker.url)
    ack = await late.request(
        op="subscribe", topic="hist.short", since={"offset": 1, "epoch": first["epoch"]}
    )
    assert ack["recovered"] is False and ack["offset"] == 1
    # History keeps 51..150: exactly 2..50 is announced missing, then the rest follows.
    gap = await late.next_other()
    assert gap == {"op": "gap", "topic": "hist.short", "epoch": first["epoch"], "from": 2, "to": 50}
    replayed = [(await late.next_message())["offset"] for _ in range(100)]
    assert replayed == list(range(51, 151))
    await publisher.publish("hist.short", 150)
    assert (await late.next_message())["offset"] == 151
    assert late.messages.empty() and late.others.empty()
    await publisher.close()
    await late.close()


async def test_idempotency_key_lands_once(broker) -> None:
    client = await PubSubClient.connect(broker.url)
    await client.subscribe("hist.idem")
    once = await client.request(op="publish", topic="hist.idem", data="x", key="order-17")
    again = await client.request(op="publish", topic="hist.idem", data="x", key="order-17")
    assert "duplicate" not in once and again["duplicate"] is True
    assert again["offset"] == once["offset"]
    assert (await client.next_message())["offset"] == once["offset"]
    assert (await client.request(op="ping"))["op"] == "pong"
    assert client.messages.empty()

    def http_publish() -> dict:
        request = urllib.request.Request(
            f"http://{broker.host}:{broker.port}/publish",
            data=json.dumps({"topic": "hist.idem", "data": "y", "key": "http-1"}).encode(),
            headers={"Authorization": "Bearer k"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    first, second = await asyncio.to_thread(http_publish), await asyncio.to_thread(http_publish)
    assert first["offset"] == second["offset"] and second["duplicate"] is True
    await client.close()


async def test_presence_and_join_leave(broker) -> None:
    watcher = await PubSubClient.connect(broker.url)
    await watcher.subscribe("room.lobby")
    visitor = await PubSubClient.connect(broker.url)
    await visitor.subscribe("room.lobby")
    visitor_id = visitor.welcome["client"]
    while True:  # the watcher's own join may come first
        frame = await watcher.next_other()
        if frame["op"] == "join" and frame["client"] == visitor_id:
            break
    assert frame["info"]["worker"] == visitor.worker
    clients = (await watcher.request(op="presence", topic="room.lobby"))["clients"]
    assert {visitor_id, watcher.welcome["client"]} <= set(clients)
    await visitor.close()
    while True:
        frame = await watcher.next_other()
        if frame["op"] == "leave" and frame["client"] == visitor_id:
            break
    clients = (await watcher.request(op="presence", topic="room.lobby"))["clients"]
    assert visitor_id not in clients
    refused = await watcher.request(op="presence", topic="plain.topic")
    assert refused["op"] == "error" and refused["code"] == "not_enabled"
    await watcher.close()
