"""The delivery core at its limits, with real workers and a real Redis of the test's own:
a long recovery streamed at full speed, a Redis outage under a publishing client, poisoned
messages beside an unrelated topic, publishes in flight across a SIGTERM drain.
Clients are plain `websockets` connections (tests/support/broker_client.py), no dedupe."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
from collections.abc import Iterator

import pytest
from support.broker_client import PubSubClient
from support.processes import ServerProcess, serve, worker_pids
from support.redis_server import RedisServer

from broker.bus.redis import RedisBus
from broker.envelope import ENCODING_MSGPACK, BusMessage
from broker.settings import Settings

TOML = """
[redwire]
history_page_size = 200

[[redwire.topics]]
pattern = "hist.*"
history_size = 20000
"""


@pytest.fixture
def config() -> Iterator[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(TOML)
    yield fh.name
    os.unlink(fh.name)


def start(redis: RedisServer, config: str, workers: int = 1, **env: str) -> ServerProcess:
    return serve(
        redis.url,
        workers=workers,
        args=("--config", config),
        env={"REDWIRE_CHANNEL_PREFIX": f"limits{os.getpid()}:", **env},
    )


async def test_a_recovery_of_10000_messages_at_full_speed_completes_in_one_session(
    own_redis: RedisServer, config: str
) -> None:
    # A send buffer far smaller than the replay: the replay must be streamed, not cut.
    broker = start(own_redis, config, REDWIRE_MAX_SEND_BUFFER_BYTES=str(512 * 1024))
    try:
        publisher = await PubSubClient.connect(broker.url)
        first = await publisher.publish("hist.long", {"n": 0, "pad": "x" * 200})
        for n in range(1, 10_000):
            await publisher.ws.send(json.dumps(
                {"op": "publish", "topic": "hist.long", "data": {"n": n, "pad": "x" * 200}}
            ))  # fmt: skip
        last = await publisher.publish("hist.long", {"n": 10_000, "pad": ""})
        assert last["offset"] == 10_001
        late = await PubSubClient.connect(broker.url)
        ack = await late.request(
            op="subscribe", topic="hist.long", since={"offset": 0, "epoch": first["epoch"]}
        )
        assert ack["recovered"] is True and ack["offset"] == 0
        offsets = [(await late.next_message(30))["offset"] for _ in range(10_001)]
        assert offsets == list(range(1, 10_002))
        assert not late.closed.done()  # one session: never closed for its own replay
        assert late.others.empty()  # no gap
        await publisher.close()
        await late.close()
    finally:
        assert broker.stop() == 0


async def test_a_publisher_rides_out_a_redis_outage_and_publishes_again(
    own_redis: RedisServer, config: str
) -> None:
    broker = start(own_redis, config, REDWIRE_BUS_PUBLISH_TIMEOUT_S="1")
    try:
        client = await PubSubClient.connect(broker.url)
        subscriber = await PubSubClient.connect(broker.url)
        await subscriber.subscribe("plain.outage")
        outcomes: list[str] = []

        async def publish_at_20_per_s(count: int) -> None:
            for n in range(count):
                reply = await client.request(
                    timeout_s=15, op="publish", topic="plain.outage", data=n
                )
                outcomes.append(reply["op"] if reply["op"] == "ack" else reply["code"])
                await asyncio.sleep(0.05)  # pacing: 20 publishes a second

        before = asyncio.ensure_future(publish_at_20_per_s(20))
        await asyncio.sleep(0.3)  # the outage starts while it publishes
        own_redis.stop()
        await asyncio.sleep(3.0)  # a 3 s outage
        own_redis.start()
        await before
        assert set(outcomes) <= {"ack", "unavailable", "outcome_unknown"}
        assert "unavailable" in outcomes or "outcome_unknown" in outcomes
        assert not client.closed.done()  # bus trouble never closes the client
        outcomes.clear()
        await publish_at_20_per_s(20)  # and once Redis is back, it publishes again
        assert outcomes[-5:] == ["ack"] * 5 and not client.closed.done()
        await client.close()
        await subscriber.close()
    finally:
        assert broker.stop() == 0


async def test_poisoned_messages_cost_an_unrelated_topic_nothing(
    own_redis: RedisServer, config: str
) -> None:
    broker = start(own_redis, config, workers=2)
    settings = Settings(channel_prefix=f"limits{os.getpid()}:")
    sdk = RedisBus(own_redis.url, settings, "poisoner")
    await sdk.start()
    try:
        victims = [await PubSubClient.connect(broker.url) for _ in range(4)]
        for victim in victims:
            await victim.subscribe("plain.poison")
            await victim.subscribe("plain.fine")
        publisher = await PubSubClient.connect(broker.url)
        deep = b"\x91" * 500 + b"\x01"  # 530-odd bytes, nested 500 deep
        for n in range(300):
            # From a back end straight into the bus (nothing checks it on the way) ...
            await sdk.publish(BusMessage("plain.poison", deep, ENCODING_MSGPACK, "sdk"))
            await publisher.ws.send(json.dumps(
                {"op": "publish", "topic": "plain.fine", "data": {"n": n}}
            ))  # fmt: skip
            if n % 15 == 0:
                await asyncio.sleep(0.1)  # pacing: 150 poisoned publishes a second
        # ... and from a WebSocket client: refused with a typed error, no traceback.
        nested = "[" * 4000 + "]" * 4000
        reply = await publisher.request(op="publish", topic="plain.poison", data=None)
        assert reply["op"] == "ack"
        request = '{"op":"publish","topic":"plain.poison","id":9,"data":' + nested + "}"
        await publisher.ws.send(request)
        bad = await publisher.next_other()
        assert bad["op"] == "error" and bad["code"] == "bad_request"
        for victim in victims:
            got = [(await victim.next_message())["data"] for _ in range(301)]
            fine = [d["n"] for d in got if isinstance(d, dict)]
            assert fine == list(range(300))  # the unrelated topic lost nothing
        assert not publisher.closed.done()
        for client in (*victims, publisher):
            await client.close()
    finally:
        await sdk.close()
        assert broker.stop() == 0
    assert "".join(broker.output).count("Traceback") <= 2  # logged once per interval at most


async def test_a_drain_answers_the_publishes_in_flight_before_closing_1001(
    own_redis: RedisServer, config: str
) -> None:
    broker = start(own_redis, config, REDWIRE_DRAIN_TIMEOUT_S="8")
    try:
        client = await PubSubClient.connect(broker.url)
        assert await client.subscribe("hist.drain")
        redis_pid = own_redis.proc.pid if own_redis.proc else None
        assert redis_pid is not None
        os.kill(redis_pid, signal.SIGSTOP)  # the publishes below stay in flight
        try:
            waiters = [
                asyncio.ensure_future(client.request(op="publish", topic="hist.drain", data=n))
                for n in range(50)
            ]
            await asyncio.sleep(0.3)  # let them reach the worker
            (worker,) = worker_pids(broker.proc.pid).values()
            os.kill(worker, signal.SIGTERM)
            await asyncio.sleep(0.5)  # the drain is waiting on Redis now
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        replies = await asyncio.gather(*waiters)
        assert [r["op"] for r in replies] == ["ack"] * 50
        assert [r["offset"] for r in replies] == list(range(1, 51))
        code, _ = await asyncio.wait_for(client.closed, 10)
        assert code == 1001
    finally:
        broker.stop()
