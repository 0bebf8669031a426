"""Delivery guarantees under faults: no gap, no duplicate, in offset order (issue check).

3 workers, a publisher at 2,000 msg/s for 10 s on one topic with history, 50 subscribers
using the Python client (which recovers from its last offset on reconnect). Mid-run one
worker is killed with SIGKILL and another worker's Redis subscription is cut (CLIENT KILL).
Every subscriber must end with offsets 1..N exactly once and in order. With history too
short to cover the outage, the affected subscribers must be told (`recovered: false`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
from support.processes import ServerProcess, redwire, worker_pids
from support.redis_server import RedisServer

from broker.settings import Settings
from client.publisher import AsyncPublisher
from client.pubsub import PubSubClient, Subscription, connect
from client.subscriber import Gap, Message

TOPIC = "feed.orders"
RATE = 2000
SECONDS = 10.0
SUBSCRIBERS = 50
# Each run is 10 s of publishing, then a catch-up bounded at 60 s by the test itself; with
# 50 clients connecting and recovering in this one process it takes 45-60 s on a quiet
# 2-core machine. pytest's guard against a hang sits above that bound, not at 120 s.
pytestmark = pytest.mark.timeout(300)


def _rules(history_size: int) -> list[dict[str, object]]:
    return [{"pattern": "feed.*", "history_size": history_size}]


def _serve(redis: RedisServer, history_size: int) -> ServerProcess:
    rules = _rules(history_size)
    return ServerProcess(
        redwire(
            "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "3",
            "--redis", redis.url,
        ),
        env={
            "REDWIRE_TOPICS": json.dumps(rules),
            "REDWIRE_BUS_PROBE_INTERVAL_S": "0.5",
            "REDWIRE_BUS_RECONNECT_MAX_S": "0.5",
            "REDWIRE_MAX_SEND_BUFFER_BYTES": str(16 * 1024 * 1024),
        },
    )  # fmt: skip


class Collector:
    """One subscriber: every offset it was given, and every gap it was told about."""

    def __init__(self, client: PubSubClient) -> None:
        self.client = client
        self.offsets: list[int] = []
        self.gaps: list[Gap] = []
        self.task: asyncio.Task[None] | None = None
        self.target: int | None = None  # the last offset published, once known
        self.caught_up = asyncio.Event()

    async def start(self) -> None:
        sub = await self.client.subscribe(TOPIC)  # acknowledged: messages from now on
        self.task = asyncio.create_task(self.run(sub))

    async def run(self, sub: Subscription) -> None:
        async for item in sub:
            if isinstance(item, Gap):
                self.gaps.append(item)
                continue
            assert item.offset is not None
            self.offsets.append(item.offset)
            self.check()

    def check(self) -> None:
        if self.target is not None and self.offsets and self.offsets[-1] >= self.target:
            self.caught_up.set()


async def _publish(redis_url: str, total: int, history_size: int) -> int:
    """Publish `total` messages at RATE per second; returns the last offset."""
    last = 0
    settings = Settings.load(environ={"REDWIRE_TOPICS": json.dumps(_rules(history_size))})
    async with AsyncPublisher(redis_url, settings=settings, retry_timeout_s=10) as pub:
        start = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - start) * RATE) + 1)
            results = await pub.publish_many((TOPIC, {"n": n}) for n in range(sent, due))
            last = max([last, *(r.offset or 0 for r in results)])
            sent = due
            await asyncio.sleep(0.005)  # pacing: the publish rate is the scenario
    return last


async def _faults(server: ServerProcess, redis: RedisServer) -> None:
    await asyncio.sleep(SECONDS / 3)  # the timeline of the scenario, not synchronisation
    workers = worker_pids(server.proc.pid)
    os.kill(workers["0"], signal.SIGKILL)
    await asyncio.sleep(SECONDS / 3)  # the timeline: the second fault a third later
    await asyncio.to_thread(
        redis.command, "CLIENT", "KILL", "TYPE", "pubsub", "SKIPME", "yes"
    )  # every worker's subscription drops: each must repair from history


async def _run(redis: RedisServer, history_size: int) -> tuple[int, list[Collector]]:
    server = _serve(redis, history_size)
    collectors: list[Collector] = []
    try:
        for _ in range(SUBSCRIBERS):
            client = await connect(server.url, min_delay_s=0.05, max_delay_s=0.5)
            collectors.append(Collector(client))
        await asyncio.gather(*(c.start() for c in collectors))
        total = int(RATE * SECONDS)
        publishing = _publish(redis.url, total, history_size)
        last, _ = await asyncio.gather(publishing, _faults(server, redis))
        for c in collectors:
            c.target = last
            c.check()
        try:
            async with asyncio.timeout(60):
                for c in collectors:
                    await c.caught_up.wait()
        except TimeoutError:
            summary = [
                (len(c.offsets), c.offsets[-1] if c.offsets else None, c.client.disconnects,
                 c.client.state, len(c.gaps))
                for c in collectors
            ]  # fmt: skip
            raise AssertionError(f"not caught up to {last}: {summary}") from None
        return last, collectors
    finally:
        for c in collectors:
            await c.client.close()
            if c.task is not None:
                c.task.cancel()
        server.stop()


async def test_every_subscriber_gets_every_offset_once_in_order(own_redis: RedisServer) -> None:
    last, collectors = await _run(own_redis, history_size=100_000)
    assert last == int(RATE * SECONDS)
    expected = list(range(1, last + 1))
    reconnected = 0
    for c in collectors:
        assert c.gaps == [], c.gaps
        assert c.offsets[0] == 1
        assert c.offsets == expected
        reconnected += c.client.disconnects > 0
    assert reconnected > 0, "the killed worker had no subscribers: the fault was not exercised"


async def test_history_too_short_is_reported_not_silent(own_redis: RedisServer) -> None:
    last, collectors = await _run(own_redis, history_size=20)
    told = 0
    for c in collectors:
        missing = set(range(c.offsets[0], last + 1)) - set(c.offsets)
        assert c.offsets == sorted(set(c.offsets)), "duplicates or disorder"
        if missing:
            assert c.gaps, f"{len(missing)} offsets missing without a gap"
            told += 1
    assert told > 0, "no subscriber needed recovery: the fault was not exercised"


async def test_plain_topic_subscribers_are_told_when_their_worker_dies(
    own_redis: RedisServer,
) -> None:
    """A topic without history cannot be recovered: the clients whose worker was killed
    get a `Gap` before what follows their reconnect; nobody else does."""
    server = _serve(own_redis, history_size=100)
    clients: list[PubSubClient] = []
    try:
        for _ in range(12):
            clients.append(await connect(server.url, min_delay_s=0.05, max_delay_s=0.5))
        subs = [await c.subscribe("plain.events") for c in clients]
        victim = clients[0].worker
        assert victim is not None
        hit = [i for i, c in enumerate(clients) if c.worker == victim]
        os.kill(worker_pids(server.proc.pid)[victim], signal.SIGKILL)
        for i in hit:
            item = await subs[i].get(timeout_s=30)
            assert isinstance(item, Gap), item
            assert item.topics == {"plain.events"}
        publisher = clients[-1] if clients[-1].worker != victim else clients[hit[-1]]
        await publisher.publish("plain.events", "after")
        for i, sub in enumerate(subs):
            item = await sub.get(timeout_s=30)
            assert isinstance(item, Message) and item.data == "after", (i, item)
        assert all(clients[i].disconnects == 1 for i in hit)
    finally:
        for c in clients:
            await c.close()
        server.stop()
