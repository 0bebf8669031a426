"""Epochs across Redis restarts and failovers: the epoch lives in the topic's meta hash and
rotates only when history may have lost entries (broker/bus/lua.py has the rule).

- restart with AOF (SIGTERM, and kill -9 with `appendfsync always`): epoch, offsets and
  history kept, the meta records the new replication id;
- restart from an RDB snapshot only (no AOF): new epoch, the old stream dropped;
- FLUSHALL: new epoch;
- a replica promoted (REPLICAOF NO ONE), even with AOF on: new epoch on its next publish or
  read.

Each test owns its redis-server processes on free loopback ports.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable

import pytest
from support.bus_watch import BusWatch
from support.redis_server import RedisServer
from support.waiting import eventually_sync

from broker.bus.redis import RedisBus, ServerInfo, parse_server_info
from broker.envelope import ENCODING_JSON, BusMessage
from broker.settings import Settings, TopicRule

FAST = Settings(
    bus_reconnect_min_s=0.02,
    bus_reconnect_max_s=0.2,
    bus_probe_interval_s=60.0,
    bus_publish_timeout_s=1.0,
    bus_connect_timeout_s=1.0,
    topics=(TopicRule("hist.*", history_size=1000),),
)
TOPIC = "hist.e"
META = b"redwire:{hist.e}:m"


class PersistentRedis(RedisServer):
    """A redis-server (binary) that keeps its data in its directory across restarts: AOF
    (`appendfsync always`: kill -9 loses nothing acknowledged) or an RDB snapshot only."""

    def __init__(self, *, aof: bool) -> None:
        self.aof = aof
        super().__init__(docker=False)

    def _start_binary(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing"
        if self.proc is not None and self.proc.poll() is None:
            return
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.aof
            else ["--appendonly", "no", "--save", "3600 1"]  # snapshot on SIGTERM
        )
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            *persistence,
            "--dir", self._dir,
            "--unixsocket", str(self.unix_path),
            "--unixsocketperm", "700",
            "--logfile", f"{self._dir}/redis.log",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )


def _msg(i: int) -> BusMessage:
    return BusMessage(TOPIC, b"%d" % i, ENCODING_JSON, "test")


def _info(server: RedisServer, section: str) -> dict[str, str]:
    text = server.command("INFO", section)
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@pytest.fixture
async def make_bus() -> AsyncIterator[Callable[..., RedisBus]]:
    buses: list[RedisBus] = []

    def make(url: str) -> RedisBus:
        bus = RedisBus(url, FAST, "w1")
        bus.wanted_topics = lambda: [TOPIC]
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


def test_trust_comes_from_replid2_and_aof() -> None:
    zeros = b"0" * 40
    text = b"# Replication\r\nrole:master\r\nmaster_replid:%s\r\nmaster_replid2:%s\r\n"
    plain = parse_server_info(text % (b"a" * 40, zeros) + b"aof_enabled:0\r\n")
    assert plain == ServerInfo(b"a" * 40, zeros, False) and plain.trusted_restart == b""
    aof = parse_server_info(text % (b"a" * 40, zeros) + b"aof_enabled:1\r\n")
    assert aof.aof and aof.trusted_restart == b"1"
    promoted = parse_server_info(text % (b"a" * 40, b"b" * 40) + b"aof_enabled:1\r\n")
    assert promoted.replid2 == b"b" * 40 and promoted.trusted_restart == b""
    assert parse_server_info(b"").trusted_restart == b""  # INFO refused: no trust
    # While Redis replays its AOF it says aof_enabled:0: the bus must not believe it (a
    # connection made then is dropped and made again once loading is over).
    loading = parse_server_info(text % (b"a" * 40, zeros) + b"loading:1\r\naof_enabled:0\r\n")
    assert loading.loading and not parse_server_info(text % (b"a" * 40, zeros)).loading


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_restart_with_aof_keeps_epoch_offsets_and_history(
    make_bus: Callable[..., RedisBus], how: str
) -> None:
    with PersistentRedis(aof=True) as server:
        bus = make_bus(server.url)
        watch = BusWatch(bus)
        await bus.start()
        before = [await bus.publish(_msg(i)) for i in range(5)]
        epoch = before[0].epoch
        replid = _info(server, "replication")["master_replid"]

        await asyncio.to_thread(getattr(server, how))
        await asyncio.to_thread(server.start)
        await watch.until(lambda: watch.gaps)  # subscribed again
        assert _info(server, "replication")["master_replid"] != replid  # Redis 7: a new id

        read = await bus.history(TOPIC, after=2, epoch=epoch)
        assert read.complete and read.epoch == epoch and read.offset == 5
        assert [(m.offset, m.payload) for m in read.messages] == [(3, b"2"), (4, b"3"), (5, b"4")]
        after = await bus.publish(_msg(5))
        assert (after.offset, after.epoch) == (6, epoch)
        meta = server.command("HGETALL", META)
        assert meta[b"r"] == _info(server, "replication")["master_replid"].encode()
        everything = await bus.history(TOPIC, after=0, epoch=epoch)
        assert [m.offset for m in everything.messages] == [1, 2, 3, 4, 5, 6]


async def test_restart_from_a_snapshot_without_aof_starts_a_new_epoch(
    make_bus: Callable[..., RedisBus],
) -> None:
    with PersistentRedis(aof=False) as server:
        bus = make_bus(server.url)
        watch = BusWatch(bus)
        await bus.start()
        before = [await bus.publish(_msg(i)) for i in range(3)]
        await asyncio.to_thread(server.stop)  # SIGTERM: Redis saves its snapshot
        await asyncio.to_thread(server.start)
        await watch.until(lambda: watch.gaps)
        assert server.command("HGET", META, "e") == before[0].epoch.encode()  # data came back

        # ...but a snapshot may be older than what was acknowledged: not trusted
        read = await bus.history(TOPIC, after=3, epoch=before[0].epoch)
        assert read.epoch != before[0].epoch and not read.complete and read.offset == 0
        new = await bus.publish(_msg(3))
        assert (new.offset, new.epoch) == (1, read.epoch)
        assert server.command("XLEN", b"redwire:{hist.e}:h") == 1  # the old stream dropped


async def test_flushall_starts_a_new_epoch(make_bus: Callable[..., RedisBus]) -> None:
    with PersistentRedis(aof=True) as server:
        bus = make_bus(server.url)
        await bus.start()
        old = await bus.publish(_msg(0))
        server.flushall()
        new = await bus.publish(_msg(1))
        assert new.offset == 1 and new.epoch != old.epoch


async def test_promoted_replica_with_aof_starts_a_new_epoch_on_its_next_read(
    make_bus: Callable[..., RedisBus],
) -> None:
    with PersistentRedis(aof=True) as primary, PersistentRedis(aof=True) as replica:
        primary.command("CONFIG", "SET", "repl-diskless-sync-delay", 0)
        replica.command("REPLICAOF", "127.0.0.1", primary.port)
        eventually_sync(lambda: _info(replica, "replication").get("master_link_status") == "up")
        bus = make_bus(primary.url)
        await bus.start()
        old = [await bus.publish(_msg(i)) for i in range(4)]
        assert primary.command("WAIT", 1, 2000) == 1
        await bus.close()

        replica.command("REPLICAOF", "NO", "ONE")  # promoted: it took over another history
        assert _info(replica, "replication")["master_replid2"].strip("0")
        promoted = make_bus(replica.url)
        await promoted.start()
        read = await promoted.history(TOPIC, after=2, epoch=old[0].epoch)
        assert read.epoch != old[0].epoch and read.offset == 0 and not read.complete
        new = await promoted.publish(_msg(4))
        assert (new.offset, new.epoch) == (1, read.epoch)
        again = await promoted.publish(_msg(5))  # its own writes are trusted from then on
        assert (again.offset, again.epoch) == (2, read.epoch)
