"""A killed worker's clients disappear from presence within the TTL (issue check).

`redwire serve --workers 2` with presence and join/leave on `room.*` and
REDWIRE_PRESENCE_TTL_S=2. The clients under test are `client.pubsub` clients, two on each
worker, all on `room.a`. The observer speaks the raw protocol over `websockets`
(tests/support/broker_client.py), because the SDK client does not surface `join` / `leave`
frames. Worker 0 is killed with SIGKILL: no goodbye, its entries go when its worker key
expires (at most presence_ttl_s after its last heartbeat), and the survivors' sweep (or a
presence query) announces one `leave` for each. The normal path: an unsubscribe or a close
takes the client out at once, with its `leave`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from support.broker_client import PubSubClient as Observer
from support.processes import ServerProcess, redwire, worker_pids
from support.waiting import eventually

from client.pubsub import PubSubClient, connect

TOPIC = "room.a"
RULES = [{"pattern": "room.*", "presence": True, "join_leave": True}]
WORKERS = 2
PER_WORKER = 2
PRESENCE_TTL_S = 2.0
MARGIN_S = 3.0  # scheduling slack on top of the ttl (a busy machine, the sweep period)
WAIT_S = 10.0  # anything that does not depend on the ttl
MAX_CONNECTIONS = 64  # opened at most while filling every worker


@pytest.fixture
def broker(redis_url: str) -> Iterator[ServerProcess]:
    server = ServerProcess(
        redwire(
            "serve", "--host", "127.0.0.1", "--port", "0",
            "--workers", str(WORKERS), "--redis", redis_url,
        ),
        env={"REDWIRE_TOPICS": json.dumps(RULES), "REDWIRE_PRESENCE_TTL_S": str(PRESENCE_TTL_S)},
    )  # fmt: skip
    yield server
    server.stop()


class Watcher:
    """The observer's unsolicited frames (join, leave, ...), all kept in arrival order."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.seen: list[dict[str, Any]] = []

    def clients(self, op: str) -> set[str]:
        return {f["client"] for f in self.seen if f.get("op") == op}

    async def until(self, op: str, ids: set[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """Read frames until an `op` frame arrived for every client in `ids`; those frames."""
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                while not ids <= self.clients(op):
                    self.seen.append(await self.observer.others.get())
        except TimeoutError:
            missing = ids - self.clients(op)
            raise AssertionError(f"no {op} for {sorted(missing)}; seen {self.seen}") from None
        return {f["client"]: f for f in self.seen if f.get("op") == op and f["client"] in ids}


@pytest.fixture
async def opened() -> AsyncIterator[list[PubSubClient | Observer]]:
    """Every connection a test opens; all closed afterwards."""
    clients: list[PubSubClient | Observer] = []
    yield clients
    for client in clients:
        await client.close()


async def observe(url: str, worker: str, opened: list[Any]) -> tuple[Observer, Watcher]:
    """A raw-protocol observer on `worker`, subscribed, once it has seen its own join."""
    for _ in range(MAX_CONNECTIONS):
        observer = await Observer.connect(url)
        opened.append(observer)
        if observer.worker == worker:
            break
    else:
        raise AssertionError(f"{MAX_CONNECTIONS} connections and none on worker {worker}")
    await observer.subscribe(TOPIC)
    watcher = Watcher(observer)
    await watcher.until("join", {observer.welcome["client"]}, WAIT_S)
    return observer, watcher


async def sdk_clients(
    url: str, per_worker: int, opened: list[Any]
) -> dict[str, list[PubSubClient]]:
    """`per_worker` SDK clients on every worker (no reconnect: a lost one stays lost)."""
    by_worker: dict[str, list[PubSubClient]] = {str(w): [] for w in range(WORKERS)}
    for _ in range(MAX_CONNECTIONS):
        client = await connect(url, reconnect=False)
        opened.append(client)
        assert client.worker is not None and client.client_id is not None
        if len(by_worker[client.worker]) < per_worker:
            by_worker[client.worker].append(client)
        if all(len(c) == per_worker for c in by_worker.values()):
            return by_worker
    counts = {w: len(c) for w, c in by_worker.items()}
    raise AssertionError(f"{MAX_CONNECTIONS} connections filled workers only so far: {counts}")


def ids(clients: list[PubSubClient]) -> set[str]:
    return {c.client_id for c in clients if c.client_id is not None}


@pytest.mark.parametrize("asking", [True, False], ids=["presence-asked", "sweep-only"])
async def test_a_killed_workers_clients_leave_presence_within_the_ttl(
    broker: ServerProcess, opened: list[Any], asking: bool
) -> None:
    """asking: a survivor asks `presence` until they are gone (within the ttl), and the
    leaves follow (that query removes dead entries itself); otherwise nobody asks, and the
    survivors' periodic sweep alone must announce the leaves (within twice the ttl)."""
    observer, watcher = await observe(broker.url, "1", opened)
    by_worker = await sdk_clients(broker.url, PER_WORKER, opened)
    for clients in by_worker.values():
        for client in clients:
            await client.subscribe(TOPIC)
    doomed, survivors = ids(by_worker["0"]), ids(by_worker["1"])
    everyone = doomed | survivors | {observer.welcome["client"]}

    joins = await watcher.until("join", doomed | survivors, WAIT_S)
    for worker, clients in by_worker.items():
        for client in clients:
            assert joins[client.client_id]["topic"] == TOPIC
            assert joins[client.client_id]["info"]["worker"] == worker
    asker = by_worker["1"][0]  # asks on the surviving worker
    here = await asker.presence(TOPIC)
    assert set(here) == everyone
    assert {c: here[c]["worker"] for c in doomed} == dict.fromkeys(doomed, "0")

    killed_at = time.monotonic()
    os.kill(worker_pids(broker.proc.pid)["0"], signal.SIGKILL)

    async def doomed_gone() -> dict[str, Any] | None:
        here = await asker.presence(TOPIC)
        return None if doomed & set(here) else here

    if asking:
        deadline = killed_at + PRESENCE_TTL_S + MARGIN_S
        here = await eventually(doomed_gone, timeout_s=deadline - time.monotonic())
        gone_s = time.monotonic() - killed_at
        leaves = await watcher.until("leave", doomed, deadline - time.monotonic())
        leave_s = time.monotonic() - killed_at
    else:
        deadline = killed_at + 2 * PRESENCE_TTL_S + MARGIN_S
        leaves = await watcher.until("leave", doomed, deadline - time.monotonic())
        leave_s = gone_s = time.monotonic() - killed_at
        here = await asker.presence(TOPIC)
    assert set(here) == everyone - doomed  # the survivors stay
    for client_id, frame in leaves.items():
        assert frame == {
            "op": "leave",
            "topic": TOPIC,
            "client": client_id,
            "info": {"worker": "0", "identity": None},
        }
    left = [f["client"] for f in watcher.seen if f.get("op") == "leave"]
    assert sorted(left) == sorted(doomed)  # one leave each, and nobody else's
    assert all(c.state == "closed" for c in by_worker["0"])  # their connections did die
    print(f"\nafter SIGKILL: out of presence in {gone_s:.2f}s, leaves in {leave_s:.2f}s")


async def test_unsubscribe_and_close_leave_at_once(
    broker: ServerProcess, opened: list[Any]
) -> None:
    observer, watcher = await observe(broker.url, "1", opened)
    by_worker = await sdk_clients(broker.url, 1, opened)
    leaving, closing = by_worker["0"][0], by_worker["1"][0]  # across workers, and local
    for client in (leaving, closing):
        await client.subscribe(TOPIC)
    await watcher.until("join", ids([leaving, closing]), WAIT_S)
    assert set(await closing.presence(TOPIC)) == ids([leaving, closing]) | {
        observer.welcome["client"]
    }

    # Both workers stay up, so their heartbeats keep every entry alive: only the explicit
    # removal can take a client out (the ttl sweep never would).
    started = time.monotonic()
    await leaving.unsubscribe(TOPIC)
    frame = (await watcher.until("leave", ids([leaving]), WAIT_S))[leaving.client_id]
    unsubscribe_s = time.monotonic() - started
    assert frame["info"] == {"worker": "0", "identity": None}
    assert leaving.client_id not in await closing.presence(TOPIC)
    assert leaving.state == "open"  # unsubscribed, still connected

    started = time.monotonic()
    await closing.close()
    frame = (await watcher.until("leave", ids([closing]), WAIT_S))[closing.client_id]
    close_s = time.monotonic() - started
    assert frame["info"] == {"worker": "1", "identity": None}
    assert set(await leaving.presence(TOPIC)) == {observer.welcome["client"]}
    assert watcher.clients("leave") == ids([leaving, closing])
    print(f"\nleave after unsubscribe {unsubscribe_s * 1000:.1f} ms, close {close_s * 1000:.1f} ms")
