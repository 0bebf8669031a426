"""The Redis Cluster bus: sharded pub/sub (Redis >= 7), one shard bus per master.

URL: `redis+cluster://[user:password@]host:port[,host:port...][?query]`: seed nodes (any
master or replica of the cluster); the rest of the cluster is learned from CLUSTER SLOTS.
The query (e.g. `?socket_keepalive=true`) and the credentials apply to every node; the
database is always 0.

Slots and names. A topic T lives in the slot of its hash tag `{T}` (CRC16 of T mod 16384;
`keyslot` below): its keys `P{T}:m|h|k:K|p` as on a single node (broker/bus/redis.py), and
its channel `P + "t:{" + T + "}"` (braced, unlike a single node's `P + "t:" + T`, so each
script's SPUBLISH stays in the slot of the keys it touches, which Redis demands). Per-topic
tags spread topics evenly over 3..16 equal shards (tests/unit/test_cluster_slots.py); a
tag per shard index (`{0}`, `{1}`, ...) would not (centrifuge#554).

Theory of operation.
- Topology. `SlotMap` says which master ("host:port") owns each slot. It is read from a
  node on start, every `bus_cluster_refresh_s`, and at once (coalesced: one refresh at a
  time) after a MOVED, TRYAGAIN or CLUSTERDOWN reply, a shard's subscriber session
  ending, or a server-sent `sunsubscribe`; on a shard's publisher connection when it works
  (queued with the publishes), else on a connection of its own. Each refresh also reads
  every master's replication id (INFO), and each (re)connection of a shard's publisher
  updates its master's: the `|id|...|` list the scripts get after ARGV[2], so a history
  topic whose keys MIGRATE moved from a live master keeps its epoch (broker/bus/lua.py,
  "Epochs"). A master restarted or promoted has a new id, so its own topics start a new
  epoch exactly as on one Redis (its old id leaves the list before its first write).
- Shards. Every master owning slots gets a `_ShardBus`: a RedisBus (its publisher, its
  subscriber session with reader/sender/prober tasks, reconnects, resubscription, gap
  reports, presence upkeep: all unchanged) pointed at that node, speaking SSUBSCRIBE /
  SUNSUBSCRIBE / SPUBLISH and the scripts' sharded variants. Its subscriber starts with
  the shard's first topic (a subscribe, or topics moved there), so only shards with local
  topics hold a subscriber connection; it then stays. Its `wanted_topics()` is the owner's
  topics whose slot it owns now; its probe channel carries a tag chosen in its own slots
  (`{0}`, `{1}`, ...: the first the map gives it), picked again on each session. A shard
  without a subscriber is healthy while its publisher works.
- Routing. A publish, history read or presence call goes to the shard owning the topic's
  slot, so one topic's commands leave in call order on one pipeline. A command a node did
  not run comes back as `Redirected`: MOVED refreshes the map and retries on the new owner;
  ASK retries once on the named node with ASKING ahead of the command (a slot being
  migrated whose keys are already there); TRYAGAIN / CLUSTERDOWN retry after a short pause.
  Past the publisher's bound it is BusUnavailable (never run: a retry is safe).
- Re-routing (after a refresh, `_reroute`). For each shard, topics of its session whose
  slot moved away are dropped from it; every topic in the owner's `wanted_topics()` whose
  owner shard's session lacks it, or has it but the server dropped it (a `sunsubscribe`
  after a slot migration), is subscribed there with a gap: `on_gap` is reported when that
  node confirms it, before any message of the new subscription, exactly as after a
  reconnect (a shard whose subscriber was not running starts it, and its first session
  reports the gaps). Presence entries of moved topics move to the new shard and are
  rewritten there.
- Presence across slots. A topic's entries are checked against worker keys in its own slot,
  `P{T}:w:<instance>` (one per topic with entries of this bus, refreshed together every
  third of presence_ttl_s, DELeted one by one on close), so no script or command ever spans
  two slots. All shards of a bus share its instance id.
- `healthy`: a slot map is known and every shard is healthy. `stats()`: the shards' counters
  summed (`last_probe_rtt_s`: the largest), plus `cluster_shards`, `cluster_refreshes`,
  `cluster_redirects`. `unsubscribe` drops the topics on every shard before it awaits.

During a slot migration a history topic loses nothing: a publish the source no longer runs
(ASK) lands in the target's history; its live copy reaches nobody, since the subscription is
still on the source until the source drops it, and the resulting gap is repaired from
history by the hub. A plain topic gets the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from broker.bus import STATS_KEYS, Bus, HistoryRead, Published, StatsValue
from broker.bus.lua import SHARDED
from broker.bus.redis import (
    _IO_ERRORS,
    ASKING,
    Redirected,
    RedisBus,
    ServerInfo,
    _client_name,
    _retrieve,
    _Session,
    connection_factory,
    split_hosts_url,
)
from broker.envelope import BusMessage
from broker.errors import BusError, BusUnavailable, ConfigError
from broker.settings import Settings

log = logging.getLogger("redwire.bus")

T = TypeVar("T")
SLOTS = 16384
SCHEME = "redis+cluster"
_RETRY_PAUSE_S = 0.05  # TRYAGAIN / CLUSTERDOWN: wait this long before trying again
_PROBE_TAG_TRIES = 100_000  # tags tried for a probe channel in a shard's slots


# --- slots -----------------------------------------------------------------------------------


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the one Redis Cluster uses: crc16(b"123456789") == 0x31C3."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


@functools.lru_cache(maxsize=4096)  # recent topics: a CRC16 costs a few µs
def keyslot(key: bytes) -> int:
    """The Cluster slot of `key`: of its hash tag (the first non-empty `{...}`) if any."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


@dataclass(frozen=True)
class SlotMap:
    """Which master ("host:port") owns each slot ("" for none)."""

    ranges: tuple[tuple[int, int, str], ...]  # (first, last, owner), sorted

    @functools.cached_property
    def owners(self) -> list[str]:
        owners = [""] * SLOTS
        for first, last, addr in self.ranges:
            owners[first : last + 1] = [addr] * (last - first + 1)
        return owners

    @property
    def masters(self) -> list[str]:
        return sorted({addr for _, _, addr in self.ranges})


def parse_slots(reply: Any, default_host: str) -> SlotMap:
    """The SlotMap in a CLUSTER SLOTS reply (an empty host means the node asked)."""
    ranges = []
    for entry in reply:
        host = entry[2][0].decode() if entry[2][0] else ""
        if host in ("", "?"):
            host = default_host
        ranges.append((int(entry[0]), int(entry[1]), f"{host}:{int(entry[2][1])}"))
    return SlotMap(tuple(sorted(ranges)))


def parse_cluster_url(url: str) -> tuple[list[str], Callable[[str], str]]:
    """The seeds ("host:port") of a `redis+cluster://` URL and a function making the plain
    `redis://` URL of one node."""
    parts, userinfo, hosts = split_hosts_url(url, SCHEME, "node")
    seeds = [f"{host}:{port}" for host, port in hosts]
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(f"bad {SCHEME}:// URL: a Redis Cluster has database 0 only")
    auth = ""
    if userinfo:
        user, _, password = userinfo.partition(":")
        auth = quote(unquote(user), safe="") + ":" + quote(unquote(password), safe="") + "@"
    query = "?" + parts.query if parts.query else ""
    return seeds, lambda addr: f"redis://{auth}{addr}/0{query}"


# --- one shard -------------------------------------------------------------------------------


class _ShardBus(RedisBus):
    """A RedisBus on one master, with sharded pub/sub; see the module docstring."""

    SUBSCRIBE_VERBS = (b"SSUBSCRIBE", b"SUNSUBSCRIBE")
    PUBLISH_VERB = b"SPUBLISH"
    MESSAGE_KIND = b"smessage"
    CONFIRM_KINDS = (b"ssubscribe", b"sunsubscribe")
    CHANNEL_GROUP = staticmethod(keyslot)  # one SSUBSCRIBE per slot (CROSSSLOT otherwise)
    LUA = SHARDED

    def __init__(self, cluster: RedisClusterBus, addr: str, *, late: bool) -> None:
        super().__init__(cluster.node_url(addr), cluster.settings, cluster.origin)
        self.cluster = cluster
        self.addr = addr
        self.late = late  # made after the cluster bus started: gaps on its first session too
        self._starting: asyncio.Future[None] | None = None
        self._gap_first = False  # the first session reports gaps (its topics moved here)
        self.instance = cluster.instance
        base = self.probe_channel.rpartition(b":")[0].replace(b"{", b"_").replace(b"}", b"_")
        self._probe_base = base + b":" + self.instance.encode()
        self._publisher.trust_extra = cluster.trust

    def channel(self, topic: str) -> bytes:
        return self.cluster.channel(topic)

    # --- subscriber: started once the shard has topics -----------------------------------

    async def start(self) -> None:
        self._start_publishing()
        if self.wanted_topics():  # topics moved to a shard made after the bus started
            await self._subscriber(gaps=self.late)

    async def _subscriber(self, *, gaps: bool = False) -> None:
        """Start the subscriber task if it is not running (`gaps`: its first session reports
        gaps too, for topics moved here); returns when its first session went live or failed."""
        if self._starting is None:
            self._gap_first = gaps
            self._starting = asyncio.ensure_future(self._start_subscriber())
        await asyncio.shield(self._starting)

    async def subscribe(self, topics: Collection[str]) -> None:
        if self._starting is None and self._publisher.running:
            await self._subscriber()
        await super().subscribe(topics)

    @property
    def healthy(self) -> bool:
        if self._starting is None:  # no topics here yet: only publishing matters
            return self._publisher.running and self._publisher.ok
        return super().healthy

    def _gap_on_connect(self) -> bool:
        return self._gap_first or super()._gap_on_connect()

    async def _session_once(self, failures: int) -> bool:
        self.probe_channel = self._pick_probe()
        try:
            return await super()._session_once(failures)
        finally:
            self.cluster.refresh_soon(self.addr)  # the session ended: has the cluster changed?

    def _pick_probe(self) -> bytes:
        owners = self.cluster.slot_map.owners if self.cluster.slot_map else None
        for i in range(_PROBE_TAG_TRIES if owners else 1):
            if owners is None or owners[keyslot(b"%d" % i)] == self.addr:
                return self._probe_base + b":{%d}" % i
        return self._probe_base + b":{0}"

    def _dropped_by_server(self, s: _Session, channel: bytes) -> None:
        # A node drops sharded subscriptions of slots it lost (a migration, a failover).
        s.server.discard(channel)
        s.confirmed.discard(channel)
        if channel == self.probe_channel:
            from redis.exceptions import ConnectionError as RedisConnectionError

            raise RedisConnectionError("the probe channel's slot moved away")
        log.info("bus: %s dropped %r (slot moved); re-routing", self.addr, channel)
        self.cluster.dropped(self.addr)

    def release(self, topics: Collection[str]) -> None:
        """Drop `topics` from the session now (their slot moved to another shard)."""
        self.unsubscribe_now(topics)  # (nobody waits for the confirmation)

    def adopt(self, topics: Collection[str]) -> None:
        """Subscribe `topics` on the session with a gap reported as the node confirms each."""
        s = self._session
        if s is None:
            if self._starting is None and self._publisher.running:  # the first topics here
                asyncio.ensure_future(self._subscriber(gaps=True)).add_done_callback(_retrieve)
            return  # the next session subscribes wanted_topics(), gaps included
        channels = []
        for topic in topics:
            channel = self.channel(topic)
            s.topics[channel] = topic
            s.unreported.add(topic)
            channels.append(channel)
        s.touch(channels)

    def needs(self, topic: str) -> bool:
        """True when `topic` is not (being) subscribed on the live session."""
        s = self._session
        if s is None:
            return self._starting is None  # else the next session subscribes wanted_topics()
        channel = self.channel(topic)
        if channel not in s.topics:
            return True
        return channel not in s.server and channel not in s.dirty and channel not in s.inflight

    # --- presence: worker keys in each topic's slot --------------------------------------

    def _worker_prefix_for(self, topic: str) -> bytes:
        return self.key(topic, "w:")

    def _worker_keys(self) -> list[bytes]:
        return [self.key(topic, "w:" + self.instance) for topic in self._present]

    def _presence_first(self, topic: str) -> None:
        self._presence_used = True
        if topic not in self._present:
            self._beat_topic(topic).add_done_callback(_retrieve)

    def _beat_topic(self, topic: str) -> asyncio.Future[Any]:
        ttl_ms = math.ceil(self.settings.presence_ttl_s * 1000)
        key = self.key(topic, "w:" + self.instance)
        return self._publisher.send(b"SET", key, self.origin, b"PX", ttl_ms, b"GET")

    def _beat(self) -> asyncio.Future[Any]:
        """Refresh every topic's worker key; the result is None when one of them was gone."""
        beats = [self._beat_topic(topic) for topic in self._present]

        async def all_there() -> bytes | None:
            results = await asyncio.gather(*beats)
            return None if any(r is None for r in results) else b"1"

        return asyncio.ensure_future(all_there())

    def take_presence(self, topic: str) -> dict[str, str]:
        """Hand this shard's wanted entries of `topic` over (its slot moved)."""
        entries = self._present.pop(topic, {})
        self._presence_dirty.difference_update((topic, c) for c in entries)
        return entries

    def give_presence(self, topic: str, entries: dict[str, str]) -> None:
        """Take entries over from another shard; the presence loop writes them here."""
        if not entries:
            return
        self._presence_first(topic)
        self._present.setdefault(topic, {}).update(entries)
        self._presence_dirty.update((topic, c) for c in entries)


# --- the bus ---------------------------------------------------------------------------------


class RedisClusterBus(Bus):
    """The Bus on a Redis Cluster (>= 7): one `_ShardBus` per master; see the docstring."""

    def __init__(self, url: str, settings: Settings, origin: str) -> None:
        super().__init__()
        self.settings = settings
        self.origin = origin
        self.seeds, self.node_url = parse_cluster_url(url)
        prefix = settings.channel_prefix
        if "{" in prefix or "}" in prefix:
            raise ConfigError("channel_prefix must not contain { or } on a Redis Cluster")
        self._prefix = prefix.encode()
        self.instance = secrets.token_hex(8)
        self.slot_map: SlotMap | None = None
        self.trust = b""  # `|replid|...|` of the masters at the last refresh
        self._replids: dict[str, bytes] = {}  # master -> its replication id, last seen
        self._shards: dict[str, _ShardBus] = {}
        self._running = False
        self._refreshing: asyncio.Task[bool] | None = None
        self._refresh_again: str | None = None  # a refresh was asked while one ran
        self._task: asyncio.Task[None] | None = None
        self._reported_healthy = False
        self._bound_s = (
            settings.bus_publish_timeout_s + settings.bus_connect_timeout_s + 1.0
        )  # as one RedisBus publish
        self._dropped = False  # a node dropped a subscription since the last re-route
        self.refreshes = 0
        self.redirects = 0

    # --- names and routing ---------------------------------------------------------------

    def channel(self, topic: str) -> bytes:
        """The shard channel carrying `topic` (hash-tagged like its keys)."""
        return self._prefix + b"t:{" + topic.encode() + b"}"

    def key(self, topic: str, suffix: str) -> bytes:
        return self._prefix + b"{" + topic.encode() + b"}:" + suffix.encode()

    def slot(self, topic: str) -> int:
        return keyslot(self.key(topic, "m"))

    def owner(self, topic: str) -> str:
        """ "host:port" of the master serving `topic` ("" when unknown)."""
        return self.slot_map.owners[self.slot(topic)] if self.slot_map else ""

    def _shard_for(self, topic: str) -> _ShardBus:
        shard = self._shards.get(self.owner(topic))
        if shard is None:
            raise BusUnavailable("no Redis Cluster master serves this topic's slot now")
        return shard

    async def _routed(self, topic: str, call: Callable[[_ShardBus], Awaitable[T]]) -> T:
        """`call` on the shard owning `topic`, following redirections (module docstring)."""
        if not self._running:
            raise BusUnavailable("the bus is not running")
        deadline = time.monotonic() + self._bound_s
        asking = ""
        while True:
            shard = self._shards.get(asking) if asking else None
            if shard is None:
                shard = self._shard_for(topic)
            token = ASKING.set(bool(asking))
            try:
                return await call(shard)
            except Redirected as exc:
                self.redirects += 1
                if time.monotonic() >= deadline or not self._running:
                    raise
                asking = ""
                if exc.kind == "ASK":
                    asking = exc.addr
                    if asking not in self._shards:
                        await self.refresh(exc.addr)
                elif exc.kind == "MOVED":
                    with contextlib.suppress(TimeoutError):  # the refresh goes on (shielded)
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            await self.refresh(exc.addr)
                else:  # TRYAGAIN (keys of a slot half moved) or CLUSTERDOWN
                    self.refresh_soon()
                    await asyncio.sleep(_RETRY_PAUSE_S)
            finally:
                ASKING.reset(token)

    # --- topology ------------------------------------------------------------------------

    def dropped(self, addr: str) -> None:
        """A node dropped one of our subscriptions: refresh, and re-route even if the map
        looks the same (the topic is then subscribed again where it is)."""
        self._dropped = True
        self.refresh_soon(addr)

    def refresh_soon(self, hint: str | None = None) -> None:
        """Refresh the slot map in the background (coalesced)."""
        if self._running:
            asyncio.ensure_future(self.refresh(hint)).add_done_callback(_retrieve)

    async def refresh(self, hint: str | None = None) -> bool:
        """Read the slot map (from `hint` first), re-route what moved; True if it worked.
        Callers during a refresh get a second one after it (what they saw may be newer)."""
        task = self._refreshing
        if task is None or task.done():
            loop = asyncio.get_running_loop()  # (a context of its own: never sent ASKING)
            task = loop.create_task(self._refresh_loop(hint), context=contextvars.Context())
            self._refreshing = task
        else:  # the running one goes round once more, for what this caller saw
            self._refresh_again = hint or self._refresh_again or ""
        return await asyncio.shield(task)

    async def _refresh_loop(self, hint: str | None) -> bool:
        ok = await self._refresh_guarded(hint)
        while self._refresh_again is not None and self._running:
            hint, self._refresh_again = self._refresh_again or None, None
            ok = await self._refresh_guarded(hint)
        return ok

    async def _refresh_guarded(self, hint: str | None) -> bool:
        try:
            return await self._refresh_once(hint)
        except Exception:  # a bug, or a reply we do not understand: keep the old map
            log.exception("bus: Redis Cluster refresh failed")
            return False

    async def _refresh_once(self, hint: str | None) -> bool:
        self.refreshes += 1
        candidates = list(dict.fromkeys([*([hint] if hint else []), *self._shards, *self.seeds]))
        new_map = None
        for addr in candidates:
            try:
                reply = await self._ask(addr, b"CLUSTER", b"SLOTS")
                new_map = parse_slots(reply, addr.rpartition(":")[0])
                break
            except (*_IO_ERRORS, BusError) as exc:
                log.debug("bus: CLUSTER SLOTS from %s failed: %s", addr, exc)
        if new_map is None or not new_map.ranges or not self._running:
            if self._running:
                log.warning("bus: no Redis Cluster node answered CLUSTER SLOTS; retrying")
            return False
        changed = new_map != self.slot_map
        replies = await asyncio.gather(
            *(self._ask(addr, b"INFO", b"replication") for addr in new_map.masters),
            return_exceptions=True,
        )
        replids = {}
        for addr, reply in zip(new_map.masters, replies, strict=True):
            if addr in self._replids:  # kept when this INFO failed
                replids[addr] = self._replids[addr]
            if isinstance(reply, bytes):
                for line in reply.splitlines():
                    if line.startswith(b"master_replid:"):
                        replids[addr] = line.split(b":", 1)[1].strip()
        self._replids = replids
        self.slot_map = new_map
        late = self._task is not None
        fresh = []
        for addr in new_map.masters:
            if addr not in self._shards:
                self._shards[addr] = shard = self._make_shard(addr, late=late)
                fresh.append(shard)
        gone = [self._shards.pop(a) for a in list(self._shards) if a not in new_map.masters]
        self._set_trust()
        if changed:
            log.info("bus: Redis Cluster slot map: %d masters", len(new_map.masters))
        if changed or gone or self._dropped:
            self._dropped = False
            self._reroute(gone)
        if fresh:
            await asyncio.gather(*(shard.start() for shard in fresh))
            self._reroute(())
        for shard in gone:
            await shard.close()
        self._update_health()
        return True

    async def _ask(self, addr: str, *args: bytes) -> Any:
        """One command to the node `addr`: on its shard's publisher connection (queued with
        the publishes) when there is one that works, else on a connection of its own."""
        shard = self._shards.get(addr)
        if shard is not None and shard._publisher.running and shard._publisher.ok:
            with contextlib.suppress(BusError):
                return await shard._publisher.call(*args)
        return await self._one_shot(addr, *args)

    async def _one_shot(self, addr: str, *args: bytes) -> Any:
        timeout = self.settings.bus_connect_timeout_s
        conn = connection_factory(
            self.node_url(addr), _client_name("admin", self.origin), timeout
        )()
        try:
            async with asyncio.timeout(self.settings.bus_connect_timeout_s):
                await conn.connect()
                await conn.send_command(*args, check_health=False)
                return await conn.read_response(disable_decoding=True)
        finally:
            with contextlib.suppress(*_IO_ERRORS):
                await conn.disconnect(nowait=True)

    def _set_trust(self) -> None:
        """Give every shard the masters' replication ids, as its scripts' trust list."""
        ids = [replid for addr, replid in self._replids.items() if addr in self._shards]
        self.trust = b"|" + b"|".join(ids) + b"|" if ids else b""
        for shard in self._shards.values():
            shard._publisher.trust_extra = self.trust

    def _server_seen(self, addr: str, server: ServerInfo) -> None:
        """A shard's publisher (re)connected: a master restarted since the last look has a
        new id, and its old one no longer vouches for anything (before the first write)."""
        if server.replid and self._replids.get(addr) != server.replid:
            self._replids[addr] = server.replid
            self._set_trust()

    def _make_shard(self, addr: str, *, late: bool) -> _ShardBus:
        shard = _ShardBus(self, addr, late=late)
        shard._publisher.on_server = lambda server: self._server_seen(addr, server)

        def wanted() -> list[str]:
            return [t for t in self.wanted_topics() if self.owner(t) == addr]

        shard.wanted_topics = wanted
        shard.on_messages = lambda batch: self.on_messages(batch)
        shard.on_gap = lambda topics: self.on_gap(topics)
        shard.on_presence = lambda *event: self.on_presence(*event)
        shard.on_health = lambda healthy: self._update_health()
        return shard

    def _reroute(self, gone: Collection[_ShardBus]) -> None:
        """Move topics and presence entries to the shards that own their slots now."""
        shards = self._shards
        for shard in (*shards.values(), *gone):
            s = shard._session
            if s is not None:
                moved = [t for t in s.topics.values() if self.owner(t) != shard.addr]
                if moved:
                    shard.release(moved)
            for topic in [t for t in shard._present if self.owner(t) != shard.addr]:
                target = shards.get(self.owner(topic))
                entries = shard.take_presence(topic)
                if target is not None:
                    target.give_presence(topic, entries)
        try:
            wanted = list(self.wanted_topics())
        except Exception:
            log.exception("bus: wanted_topics() failed; re-routing nothing")
            return
        needed: dict[str, list[str]] = {}
        for topic in wanted:
            target = shards.get(self.owner(topic))
            if target is not None and target.needs(topic):
                needed.setdefault(target.addr, []).append(topic)
        for addr, topics in needed.items():
            log.info("bus: %d topics re-routed to %s", len(topics), addr)
            shards[addr].adopt(topics)

    async def _refresh_forever(self) -> None:
        while True:
            wait = self.settings.bus_cluster_refresh_s
            if self.slot_map is None:
                wait = min(wait, self.settings.bus_reconnect_max_s)
            await asyncio.sleep(wait)
            try:
                await self.refresh()
            except Exception:
                log.exception("bus: Redis Cluster refresh failed")

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(
            self._refresh_forever(), name="bus-cluster-refresh"
        )

    async def close(self) -> None:
        self._running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        refreshing = self._refreshing
        if refreshing is not None and not refreshing.done():
            refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await refreshing
        shards, self._shards = list(self._shards.values()), {}
        await asyncio.gather(*(shard.close() for shard in shards))
        self._update_health()

    # --- the interface -------------------------------------------------------------------

    async def subscribe(self, topics: Collection[str]) -> None:
        if not self._running:
            raise BusUnavailable("the bus is not running")
        groups: dict[str, list[str]] = {}
        for topic in topics:
            groups.setdefault(self._shard_for(topic).addr, []).append(topic)
        results = await asyncio.gather(
            *(self._shards[addr].subscribe(group) for addr, group in groups.items()),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.unsubscribe(topics)  # a failed subscribe leaves nothing behind
            raise failed[0]

    async def unsubscribe(self, topics: Collection[str]) -> None:
        topics = list(topics)  # dropped on every shard before the first await:
        await asyncio.gather(*[shard.unsubscribe_now(topics) for shard in self._shards.values()])

    async def publish(self, message: BusMessage, *, key: str | None = None) -> Published:
        return await self._routed(message.topic, lambda shard: shard.publish(message, key=key))

    async def history(
        self, topic: str, *, after: int | None, epoch: str | None, limit: int | None = None
    ) -> HistoryRead:
        return await self._routed(
            topic, lambda shard: shard.history(topic, after=after, epoch=epoch, limit=limit)
        )

    async def presence_add(self, topic: str, client_id: str, info: dict[str, Any]) -> None:
        await self._routed(topic, lambda shard: shard.presence_add(topic, client_id, info))

    async def presence_remove(self, topic: str, client_id: str) -> None:
        await self._routed(topic, lambda shard: shard.presence_remove(topic, client_id))

    async def presence(self, topic: str) -> dict[str, dict[str, Any]]:
        return await self._routed(topic, lambda shard: shard.presence(topic))

    @property
    def healthy(self) -> bool:
        shards = self._shards
        return self._running and bool(shards) and all(s.healthy for s in shards.values())

    def stats(self) -> dict[str, StatsValue]:
        total: dict[str, StatsValue] = dict.fromkeys(STATS_KEYS, 0)
        total["last_probe_rtt_s"] = 0.0
        for shard in self._shards.values():
            for name, value in shard.stats().items():
                if name == "last_probe_rtt_s":
                    total[name] = max(float(total.get(name, 0.0)), float(value))
                elif not isinstance(value, bool):
                    total[name] = total.get(name, 0) + value
        total["healthy"] = self.healthy
        total["cluster_shards"] = len(self._shards)
        total["cluster_refreshes"] = self.refreshes
        total["cluster_redirects"] = self.redirects
        return total

    def _update_health(self) -> None:
        healthy = self.healthy
        if healthy != self._reported_healthy:
            self._reported_healthy = healthy
            try:
                self.on_health(healthy)
            except Exception:
                log.exception("bus: callback %r failed", self.on_health)
