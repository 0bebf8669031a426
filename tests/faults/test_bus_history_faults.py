"""RedisBus history and presence under faults: Redis restarted empty, a replica promoted in
its place, a publish whose reply is lost (retried with its idempotency key), and a worker
process killed with its clients in presence.

Each test owns its redis-server(s) (the session one is shared and must not be stopped).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support.bus_watch import BusWatch, Owned
from support.redis_server import RedisServer
from support.tcp_proxy import TcpProxy, publisher_link
from support.waiting import eventually, eventually_sync

from broker.bus import JOIN, LEAVE
from broker.bus.redis import RedisBus
from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusOutcomeUnknown, BusUnavailable
from broker.settings import Settings, TopicRule

WAIT_S = 5.0
PRESENCE_TTL_S = 1.0
FAST = Settings(
    bus_reconnect_min_s=0.02,
    bus_reconnect_max_s=0.2,
    bus_probe_interval_s=60.0,  # no probes: only what a test does goes through the proxy
    bus_publish_timeout_s=0.5,
    bus_connect_timeout_s=1.0,
    presence_ttl_s=PRESENCE_TTL_S,
    topics=(
        TopicRule("hist.*", history_size=1000),
        TopicRule("room.*", presence=True, join_leave=True),
    ),
)


def _msg(i: int) -> BusMessage:
    return BusMessage("hist.f", b"%d" % i, ENCODING_JSON, "test")


@pytest.fixture
async def make_bus() -> AsyncIterator[Callable[..., RedisBus]]:
    buses: list[RedisBus] = []

    def make(url: str, origin: str = "w1") -> RedisBus:
        bus = Owned(url, FAST, origin)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


# --- Redis restarted empty ---------------------------------------------------------------------


async def test_redis_restarted_empty_starts_a_new_epoch(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    bus = make_bus(server.url)
    watch = BusWatch(bus)
    await bus.start()
    await bus.subscribe(["hist.f"])
    old = [await bus.publish(_msg(i)) for i in range(5)]
    old_epoch = old[0].epoch
    assert [p.offset for p in old] == [1, 2, 3, 4, 5]

    await asyncio.to_thread(server.stop)
    await watch.until(lambda: watch.health[-1] is False)
    with pytest.raises(BusUnavailable):
        await bus.history("hist.f", after=5, epoch=old_epoch)
    await asyncio.to_thread(server.start)
    await watch.until(lambda: watch.gaps)  # subscribed again (no probes: publishes heal)

    stale = await bus.history("hist.f", after=5, epoch=old_epoch)
    assert not stale.complete and stale.messages == [] and stale.epoch != old_epoch
    new = await bus.publish(_msg(5))
    assert (new.offset, new.epoch) == (1, stale.epoch)  # the epoch the read made is kept
    await watch.until(lambda: len(watch.messages) == 6)
    assert [(m.offset, m.epoch) for m in watch.messages] == [
        *((n, old_epoch) for n in range(1, 6)),
        (1, new.epoch),
    ]
    recovered = await bus.history("hist.f", after=0, epoch=new.epoch)
    assert recovered.complete and recovered.messages == watch.messages[5:]
    assert watch.health[-1] is True and bus.healthy


# --- a replica promoted in the old primary's place ---------------------------------------------


@pytest.fixture
async def proxy_to() -> AsyncIterator[Callable[..., Any]]:
    proxies: list[TcpProxy] = []

    async def make(port: int) -> TcpProxy:
        proxy = TcpProxy(port)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()


def _replication(server: RedisServer) -> dict[str, str]:
    text = server.command("INFO", "replication")
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


async def test_promoted_replica_starts_a_new_epoch(
    make_bus: Callable[..., RedisBus], proxy_to: Callable[..., Any]
) -> None:
    with RedisServer(docker=False) as primary, RedisServer(docker=False) as replica:
        primary.command("CONFIG", "SET", "repl-diskless-sync-delay", 0)
        replica.command("REPLICAOF", "127.0.0.1", primary.port)
        eventually_sync(lambda: _replication(replica).get("master_link_status") == "up")
        proxy: TcpProxy = await proxy_to(primary.port)
        bus = make_bus(proxy.url)
        watch = BusWatch(bus)
        await bus.start()
        await bus.subscribe(["hist.f"])
        old = [await bus.publish(_msg(i)) for i in range(5)]
        assert primary.command("WAIT", 1, 2000) == 1
        meta = replica.command("HGETALL", "redwire:{hist.f}:m")
        assert meta[b"o"] == b"5" and meta[b"e"] == old[0].epoch.encode()  # all replicated

        # Failover: the primary dies, the replica is promoted, the address now leads there.
        await asyncio.to_thread(primary.kill)
        replica.command("REPLICAOF", "NO", "ONE")
        proxy.target_port = replica.port
        proxy.cut()
        await watch.until(lambda: watch.gaps)  # subscribed again, to the promoted replica

        # Its copy of the history may lack what the old primary acknowledged last: the
        # offsets cannot be trusted, so the topic starts over under a new epoch.
        new = await bus.publish(_msg(5))
        assert new.offset == 1 and new.epoch != old[0].epoch
        stale = await bus.history("hist.f", after=3, epoch=old[0].epoch)
        assert (stale.messages, stale.complete, stale.offset) == ([], False, 1)
        meta = replica.command("HGETALL", "redwire:{hist.f}:m")
        assert meta[b"r"] == _replication(replica)["master_replid"].encode()
        assert replica.command("XLEN", "redwire:{hist.f}:h") == 1


# --- a lost reply, retried with the idempotency key ----------------------------------------------


async def test_publish_whose_reply_was_lost_is_retried_once_with_its_key(
    server: RedisServer, make_bus: Callable[..., RedisBus], proxy_to: Callable[..., Any]
) -> None:
    proxy: TcpProxy = await proxy_to(server.port)
    bus = make_bus(proxy.url)
    watch = BusWatch(bus)
    await bus.start()
    await bus.subscribe(["hist.f"])
    assert (await bus.publish(_msg(0))).offset == 1
    assert proxy.freeze(publisher_link) == 1

    with pytest.raises(BusOutcomeUnknown, match="timed out"):
        await bus.publish(_msg(1), key="order-1")  # Redis ran it; the answer never came
    await watch.until(lambda: len(watch.messages) == 2)
    retry = await bus.publish(_msg(1), key="order-1")  # a new connection
    assert retry.offset == 2 and retry.duplicate

    assert (await bus.publish(_msg(2))).offset == 3
    await watch.until(lambda: len(watch.messages) == 3)
    assert [(m.offset, m.payload) for m in watch.messages] == [(1, b"0"), (2, b"1"), (3, b"2")]


# --- a worker process killed with clients in presence ---------------------------------------------

_DOOMED = """
import asyncio, sys
from broker.bus.redis import RedisBus
from broker.settings import Settings, TopicRule

async def main():
    settings = Settings(
        presence_ttl_s=float(sys.argv[2]),
        topics=(TopicRule("room.*", presence=True, join_leave=True),),
    )
    bus = RedisBus(sys.argv[1], settings, "doomed")
    await bus.start()
    await bus.presence_add("room.k", "c1", {"user": "ann"})
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_worker_leaves_presence_within_the_ttl(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    survivor = make_bus(server.url, "survivor")
    watch = BusWatch(survivor)
    await survivor.start()
    await survivor.subscribe(["room.k"])
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DOOMED,
        server.url,
        str(PRESENCE_TTL_S),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert doomed.stdout is not None
        assert await asyncio.wait_for(doomed.stdout.readline(), WAIT_S) == b"ready\n"
        await watch.until(lambda: watch.presence == [("room.k", JOIN, "c1", {"user": "ann"})])
        assert await survivor.presence("room.k") == {"c1": {"user": "ann"}}
    finally:
        doomed.kill()  # SIGKILL: no goodbye, the worker key is left to expire
        await doomed.wait()

    async def gone() -> bool:
        return await survivor.presence("room.k") == {}

    # the worker key outlives the last heartbeat by presence_ttl_s at most
    await eventually(gone, timeout_s=PRESENCE_TTL_S + 0.25, interval_s=0.05)
    await watch.until(lambda: len(watch.presence) == 2, PRESENCE_TTL_S)
    assert watch.presence[1] == ("room.k", LEAVE, "c1", {"user": "ann"})
