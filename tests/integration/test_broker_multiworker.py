"""`redwire serve` with 4 workers over a real Redis: every subscriber gets every message."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import pytest
import redis.asyncio
from support.broker_client import PubSubClient, clients_on_workers
from support.processes import ServerProcess, serve
from support.waiting import eventually

WORKERS = 4
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def broker(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        workers=WORKERS,
        env={"REDWIRE_API_KEY": "test-key", "REDWIRE_CHANNEL_PREFIX": "mw:"},
    )
    yield server
    assert server.stop() == 0


def http_get(server: ServerProcess, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{server.host}:{server.port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_every_subscriber_on_every_worker_gets_every_message_in_order(broker) -> None:
    subscribers = await clients_on_workers(broker.url, WORKERS)
    subscribers += await clients_on_workers(broker.url, WORKERS)
    for sub in subscribers:
        await sub.subscribe("orders")
    publishers = await clients_on_workers(broker.url, 2, limit=64)
    count = 300

    async def publish_all(index: int, pub: PubSubClient) -> None:
        for seq in range(count):
            reply = await pub.publish("orders", {"p": index, "seq": seq})
            assert reply["op"] == "ack", reply

    await asyncio.gather(*(publish_all(i, p) for i, p in enumerate(publishers)))
    for sub in subscribers:
        seen: dict[int, list[int]] = {0: [], 1: []}
        for _ in range(count * 2):
            frame = await sub.next_message()
            assert frame["topic"] == "orders"
            seen[frame["data"]["p"]].append(frame["data"]["seq"])
        assert seen[0] == list(range(count)) and seen[1] == list(range(count))
        assert sub.messages.empty()
    for client in subscribers + publishers:
        await client.close()


async def test_unsubscribed_client_gets_nothing_more(broker) -> None:
    stay, leave = await clients_on_workers(broker.url, 2)
    for client in (stay, leave):
        await client.subscribe("news")
    await stay.publish("news", "first")
    assert (await leave.next_message())["data"] == "first"
    assert (await stay.next_message())["data"] == "first"
    assert (await leave.unsubscribe("news"))["op"] == "ack"
    await stay.publish("news", "second")
    assert (await stay.next_message())["data"] == "second"
    # `leave` and `stay` may share a worker: a ping round trip on `leave` after `stay` got the
    # message proves anything for `leave` would have arrived first.
    assert (await leave.request(op="ping"))["op"] == "pong"
    assert leave.messages.empty()
    await stay.close()
    await leave.close()


async def test_redis_channels_drop_to_zero_after_last_subscriber(broker, redis_server) -> None:
    clients = await clients_on_workers(broker.url, WORKERS)
    for client in clients:
        await client.subscribe("ephemeral.topic")
    async with redis.asyncio.from_url(redis_server.url) as r:
        channels = await r.pubsub_channels("mw:t:*")
        assert b"mw:t:ephemeral.topic" in channels
        for client in clients:
            await client.close()

        async def no_channels_left() -> bool:
            return not await r.pubsub_channels("mw:t:*")

        await eventually(no_channels_left)


BAD_INPUTS = [
    ("not json", "bad_request"),
    ("[1, 2]", "bad_request"),
    ('{"op": "dance", "id": 1}', "unknown_op"),
    ('{"id": 1}', "unknown_op"),
    ('{"op": "subscribe", "id": 1}', "bad_topic"),
    ('{"op": "subscribe", "topic": "", "id": 1}', "bad_topic"),
    ('{"op": "subscribe", "topic": "has space", "id": 1}', "bad_topic"),
    ('{"op": "subscribe", "topic": "' + "x" * 201 + '", "id": 1}', "bad_topic"),
    ('{"op": "subscribe", "topic": 5, "id": 1}', "bad_topic"),
    ('{"op": "publish", "topic": "t", "id": 1}', "bad_request"),
    ('{"op": "publish", "topic": "t/x", "data": 1, "id": 1}', "bad_topic"),
    ('{"op": "publish", "topic": "t", "id": 1, "data": "' + "x" * (MIB - 100) + '"}', "too_large"),
    ('{"op": "ping", "id": {"nested": true}}', "bad_request"),
    ('{"op": "ping", "id": true}', "bad_request"),
]


@pytest.mark.parametrize(("raw", "code"), BAD_INPUTS, ids=[c for _, c in BAD_INPUTS])
async def test_bad_input_gets_typed_error_and_connection_stays(broker, raw: str, code: str) -> None:
    client = await PubSubClient.connect(broker.url)
    await client.ws.send(raw)
    error = await client.next_other()
    assert error["op"] == "error" and error["code"] == code, error
    assert error["reason"]
    assert (await client.request(op="ping"))["op"] == "pong"
    await client.close()


async def test_binary_frame_on_json_connection_is_bad_request(broker) -> None:
    client = await PubSubClient.connect(broker.url)
    await client.ws.send(b'{"op":"ping"}')
    assert (await client.next_other())["code"] == "bad_request"
    await client.close()


async def test_error_flood_closes_1008(broker) -> None:
    client = await PubSubClient.connect(broker.url)
    for _ in range(50):
        await client.ws.send("garbage")
    code, _ = await asyncio.wait_for(client.closed, 10)
    assert code == 1008


async def test_msgpack_and_json_clients_interoperate(broker) -> None:
    import msgpack
    import websockets

    json_client = await PubSubClient.connect(broker.url)
    await json_client.subscribe("mixed")
    async with websockets.connect(broker.url, subprotocols=["redwire.msgpack"]) as ws:
        assert ws.subprotocol == "redwire.msgpack"
        welcome = msgpack.unpackb(await ws.recv())
        assert welcome["op"] == "welcome"
        await ws.send(msgpack.packb({"op": "subscribe", "topic": "mixed", "id": 1}))
        assert msgpack.unpackb(await ws.recv()) == {"op": "ack", "id": 1}
        await ws.send(msgpack.packb({"op": "publish", "topic": "mixed", "data": [1, "a"], "id": 2}))
        frames = [msgpack.unpackb(await ws.recv()) for _ in range(2)]
        assert {"op": "ack", "id": 2} in frames
        assert {"op": "message", "topic": "mixed", "data": [1, "a"]} in frames
    assert (await json_client.next_message())["data"] == [1, "a"]
    await json_client.publish("mixed", {"from": "json"})
    await json_client.close()


def test_healthz_metrics_and_http_publish(broker) -> None:
    status, body = http_get(broker, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = http_get(broker, "/metrics")
    assert status == 200
    text = body.decode()
    assert "redwire_connections_accepted_total" in text and 'worker="' in text
    request = urllib.request.Request(
        f"http://{broker.host}:{broker.port}/publish",
        data=json.dumps({"topic": "http.topic", "data": {"x": 1}}).encode(),
        headers={"Authorization": "Bearer test-key", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["ok"] is True
    request.remove_header("Authorization")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 401


async def test_http_publish_reaches_websocket_subscribers(broker) -> None:
    client = await PubSubClient.connect(broker.url)
    await client.subscribe("http.delivery")
    request = urllib.request.Request(
        f"http://{broker.host}:{broker.port}/publish",
        data=json.dumps({"topic": "http.delivery", "data": "hello"}).encode(),
        headers={"X-API-Key": "test-key"},
        method="POST",
    )
    await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
    assert (await client.next_message())["data"] == "hello"
    await client.close()


async def test_metrics_cover_all_workers(broker) -> None:
    clients = await clients_on_workers(broker.url, WORKERS)

    async def all_workers_reported() -> bool:
        _, body = await asyncio.to_thread(http_get, broker, "/metrics")
        workers = {
            line.split('worker="')[1].split('"')[0]
            for line in body.decode().splitlines()
            if line.startswith("redwire_connections_accepted_total{")
        }
        return len(workers) == WORKERS

    await eventually(all_workers_reported, timeout_s=15)
    for client in clients:
        await client.close()
