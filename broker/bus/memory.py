"""An in-process bus: the reference implementation of the contract, for one worker and tests.

Buses sharing one `MemoryNetwork` hear each other (as workers sharing one Redis would).
A publish is queued on the network; once per event-loop iteration (`loop.call_soon`) the
network hands each subscribed bus everything published to its topics since, as one batch,
in publish order. The payload object itself is handed over: nothing is copied or encoded.
Always healthy. It has no reconnections, so `wanted_topics` is never read; `subscribe`
and `unsubscribe` follow the contract (an unsubscribe of a topic not subscribed is harmless).

The network also holds what Redis holds for RedisBus, with the same semantics: each
history topic's position, epoch and kept messages (ages from `time.monotonic`), the
idempotency keys, and presence. A bus is alive until `close()`, which takes its clients
out of presence (announcing `leave` on join_leave topics). `forget()` drops all of it,
as a Redis that came back empty would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from broker.bus import (
    JOIN,
    LEAVE,
    Bus,
    HistoryRead,
    Published,
    StatsValue,
    check_history_args,
    check_key,
    info_json,
    meta_ttl_s,
    new_epoch,
    no_history,
)
from broker.envelope import BusMessage
from broker.errors import BusUnavailable
from broker.settings import Settings, TopicRule

log = logging.getLogger("redwire.bus")


@dataclass(frozen=True, slots=True)
class _PresenceEvent:
    topic: str
    kind: str  # JOIN or LEAVE
    client_id: str
    info: dict[str, Any]


@dataclass(slots=True)
class _History:
    """One history topic: its position and kept messages (offset, monotonic time, message)."""

    epoch: str
    size: int
    offset: int = 0
    touched: float = 0.0  # last publish or creation, for the epoch's expiry
    entries: deque[tuple[int, float, BusMessage]] = field(default_factory=deque)


class MemoryNetwork:
    """The shared medium of a set of `MemoryBus`es: topic → buses, the pending batch, and
    the state Redis would hold (history, idempotency keys, presence)."""

    def __init__(self) -> None:
        self.topics: dict[str, set[MemoryBus]] = {}
        self._pending: list[tuple[BusMessage | _PresenceEvent, tuple[MemoryBus, ...]]] = []
        self._publishers: set[MemoryBus] = set()
        self._scheduled = False
        self.histories: dict[str, _History] = {}
        # (topic, key) -> offset, epoch (None on a topic without history), expiry
        self.keys: dict[tuple[str, str], tuple[int | None, str | None, float]] = {}
        self.presence: dict[str, dict[str, tuple[MemoryBus, dict[str, Any]]]] = {}

    def forget(self) -> None:
        """Drop history, positions, keys and presence, as a Redis restarted empty would."""
        self.histories.clear()
        self.keys.clear()
        self.presence.clear()

    def send(self, sender: MemoryBus | None, item: BusMessage | _PresenceEvent) -> None:
        """Queue `item` for the buses subscribed to its topic right now (as Redis does)."""
        receivers = self.topics.get(item.topic)
        if not self._scheduled:
            asyncio.get_running_loop().call_soon(self._flush)
            self._scheduled = True
        if sender is not None and sender not in self._publishers:
            self._publishers.add(sender)
            sender.publish_batches += 1
        if receivers:
            self._pending.append((item, tuple(receivers)))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._publishers.clear()
        self._scheduled = False
        batches: dict[MemoryBus, list[BusMessage | _PresenceEvent]] = {}
        for item, receivers in pending:
            for bus in receivers:
                batch = batches.get(bus)
                if batch is None:
                    batch = batches[bus] = []
                batch.append(item)
        for bus, batch in batches.items():
            bus.deliver(batch)

    # --- history -------------------------------------------------------------------------

    def position(self, topic: str, rule: TopicRule, now: float) -> _History:
        """The topic's history, made anew (new epoch, offset 0) when missing or expired."""
        h = self.histories.get(topic)
        ttl = rule.history_ttl_s
        if h is not None and ttl > 0:
            if now - h.touched > meta_ttl_s(rule):
                h = None
            else:
                while h.entries and now - h.entries[0][1] > ttl:
                    h.entries.popleft()
        if h is None:
            h = self.histories[topic] = _History(new_epoch(), rule.history_size, touched=now)
        return h

    def append(self, h: _History, message: BusMessage, now: float) -> BusMessage:
        h.offset += 1
        h.touched = now
        message = BusMessage(
            message.topic, message.payload, message.encoding, message.origin, h.offset, h.epoch
        )
        h.entries.append((h.offset, now, message))
        while len(h.entries) > h.size:
            h.entries.popleft()
        return message

    def first_publish(
        self, topic: str, key: str, now: float
    ) -> tuple[int | None, str | None] | None:
        keys = self.keys
        while keys:  # drop expired keys, oldest first
            oldest = next(iter(keys))
            if keys[oldest][2] > now:
                break
            del keys[oldest]
        found = keys.get((topic, key))
        return None if found is None else found[:2]


class MemoryBus(Bus):
    def __init__(
        self,
        origin: str = "",
        network: MemoryNetwork | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        super().__init__()
        self.origin = origin
        self.settings = settings if settings is not None else Settings()
        self.network = network if network is not None else MemoryNetwork()
        self._topics: set[str] = set()
        self._closed = False
        self.messages_in = 0
        self.published = 0
        self.publish_batches = 0
        self.subscribe_commands = 0
        self.duplicates = 0
        self.history_reads = 0

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        self._drop(self._topics)
        for topic, entries in list(self.network.presence.items()):
            for client_id, (bus, _) in list(entries.items()):
                if bus is self:
                    self._presence_remove(topic, client_id)

    async def subscribe(self, topics: Collection[str]) -> None:
        self._check_open()
        new = [t for t in topics if t not in self._topics]
        if new:
            self.subscribe_commands += 1
        for topic in new:
            self._topics.add(topic)
            self.network.topics.setdefault(topic, set()).add(self)

    async def unsubscribe(self, topics: Collection[str]) -> None:
        self._drop(list(topics))

    def _drop(self, topics: Collection[str]) -> None:
        for topic in list(topics):
            self._topics.discard(topic)
            buses = self.network.topics.get(topic)
            if buses is not None:
                buses.discard(self)
                if not buses:
                    del self.network.topics[topic]

    async def publish(self, message: BusMessage, *, key: str | None = None) -> Published:
        self._check_open()
        check_key(key)
        rule = self.settings.rule_for(message.topic)
        net = self.network
        now = time.monotonic()
        if key is not None:
            first = net.first_publish(message.topic, key, now)
            if first is not None:
                self.duplicates += 1
                return Published(first[0], first[1], duplicate=True)
        if rule is None or rule.history_size == 0:
            if key is not None:
                expiry = now + self.settings.idempotency_ttl_s
                net.keys[(message.topic, key)] = (None, None, expiry)
            net.send(self, message)
            self.published += 1
            return Published()
        h = net.position(message.topic, rule, now)
        message = net.append(h, message, now)
        if key is not None:
            expiry = now + self.settings.idempotency_ttl_s
            net.keys[(message.topic, key)] = (h.offset, h.epoch, expiry)
        net.send(self, message)
        self.published += 1
        return Published(h.offset, h.epoch)

    async def history(
        self, topic: str, *, after: int | None, epoch: str | None, limit: int | None = None
    ) -> HistoryRead:
        self._check_open()
        check_history_args(after, limit)
        rule = self.settings.rule_for(topic)
        if rule is None or rule.history_size == 0:
            return no_history()
        self.history_reads += 1
        h = self.network.position(topic, rule, time.monotonic())
        if after is None:
            return HistoryRead([], h.offset, h.epoch, True)
        if epoch != h.epoch or after > h.offset:
            return HistoryRead([], h.offset, h.epoch, False)
        limit = self.settings.history_read_limit if limit is None else limit
        newer = (m for offset, _, m in h.entries if offset > after)
        messages = list(itertools.islice(newer, limit))
        return HistoryRead(messages, h.offset, h.epoch, len(messages) == h.offset - after)

    # --- presence --------------------------------------------------------------------------

    async def presence_add(self, topic: str, client_id: str, info: dict[str, Any]) -> None:
        self._check_open()
        info = json.loads(info_json(info))  # a copy, as RedisBus' JSON round trip makes
        entries = self.network.presence.setdefault(topic, {})
        new = client_id not in entries
        entries[client_id] = (self, info)
        if new and self._announces(topic):
            self.network.send(None, _PresenceEvent(topic, JOIN, client_id, info))

    async def presence_remove(self, topic: str, client_id: str) -> None:
        self._check_open()
        self._presence_remove(topic, client_id)

    def _presence_remove(self, topic: str, client_id: str) -> None:
        entries = self.network.presence.get(topic)
        if entries is None or client_id not in entries:
            return
        _, info = entries.pop(client_id)
        if not entries:
            del self.network.presence[topic]
        if self._announces(topic):
            self.network.send(None, _PresenceEvent(topic, LEAVE, client_id, info))

    async def presence(self, topic: str) -> dict[str, dict[str, Any]]:
        self._check_open()
        entries = self.network.presence.get(topic, {})
        return {client_id: info for client_id, (_, info) in entries.items()}

    def _announces(self, topic: str) -> bool:
        rule = self.settings.rule_for(topic)
        return rule is not None and rule.join_leave

    # --- delivery --------------------------------------------------------------------------

    def deliver(self, items: list[BusMessage | _PresenceEvent]) -> None:
        # Items queued before an unsubscribe in the same loop iteration are not delivered.
        batch: list[BusMessage] = []
        for item in items:
            if item.topic not in self._topics:
                continue
            if isinstance(item, BusMessage):
                batch.append(item)
                continue
            self._deliver_messages(batch)
            batch = []
            try:
                self.on_presence(item.topic, item.kind, item.client_id, item.info)
            except Exception:
                log.exception("on_presence failed")
        self._deliver_messages(batch)

    def _deliver_messages(self, batch: list[BusMessage]) -> None:
        if not batch:
            return
        self.messages_in += len(batch)
        try:
            self.on_messages(batch)
        except Exception:
            log.exception("on_messages failed")

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailable("the bus is closed")

    @property
    def healthy(self) -> bool:
        return True

    def stats(self) -> dict[str, StatsValue]:
        return {
            "healthy": True,
            "reconnects": 0,
            "gaps": 0,
            "messages_in": self.messages_in,
            "malformed": 0,
            "published": self.published,
            "publish_batches": self.publish_batches,
            "publish_errors": 0,
            "subscribe_commands": self.subscribe_commands,
            "subscribed_channels": len(self._topics),
            "last_probe_rtt_s": 0.0,
            "duplicates": self.duplicates,
            "history_reads": self.history_reads,
        }
