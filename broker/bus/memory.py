"""An in-process bus: the reference implementation of the contract, for one worker and tests.

Buses sharing one `MemoryNetwork` hear each other (as workers sharing one Redis would).
A publish is queued on the network; once per event-loop iteration (`loop.call_soon`) the
network hands each subscribed bus everything published to its topics since, as one batch,
in publish order. The payload object itself is handed over: nothing is copied or encoded.
Always healthy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from broker.bus import Bus, Published, StatsValue
from broker.envelope import BusMessage
from broker.errors import BusUnavailable

log = logging.getLogger("redwire.bus")


class MemoryNetwork:
    """The shared medium of a set of `MemoryBus`es: topic → buses, and the pending batch."""

    def __init__(self) -> None:
        self.topics: dict[str, set[MemoryBus]] = {}
        self._pending: list[tuple[BusMessage, tuple[MemoryBus, ...]]] = []
        self._publishers: set[MemoryBus] = set()
        self._scheduled = False

    def send(self, sender: MemoryBus, message: BusMessage) -> None:
        """Queue `message` for the buses subscribed to its topic right now (as Redis does)."""
        receivers = self.topics.get(message.topic)
        if not self._scheduled:
            asyncio.get_running_loop().call_soon(self._flush)
            self._scheduled = True
        if sender not in self._publishers:
            self._publishers.add(sender)
            sender.publish_batches += 1
        if receivers:
            self._pending.append((message, tuple(receivers)))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._publishers.clear()
        self._scheduled = False
        batches: dict[MemoryBus, list[BusMessage]] = {}
        for message, receivers in pending:
            for bus in receivers:
                batch = batches.get(bus)
                if batch is None:
                    batch = batches[bus] = []
                batch.append(message)
        for bus, batch in batches.items():
            bus.deliver(batch)


class MemoryBus(Bus):
    def __init__(self, origin: str = "", network: MemoryNetwork | None = None) -> None:
        super().__init__()
        self.origin = origin
        self.network = network if network is not None else MemoryNetwork()
        self._topics: set[str] = set()
        self._closed = False
        self.messages_in = 0
        self.published = 0
        self.publish_batches = 0
        self.subscribe_commands = 0

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        self._drop(self._topics)

    async def subscribe(self, topics: Collection[str]) -> None:
        if self._closed:
            raise BusUnavailable("the bus is closed")
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

    async def publish(self, message: BusMessage) -> Published:
        if self._closed:
            raise BusUnavailable("the bus is closed")
        self.network.send(self, message)
        self.published += 1
        return Published()

    def deliver(self, batch: list[BusMessage]) -> None:
        # Messages queued before an unsubscribe in the same loop iteration are not delivered.
        batch = [m for m in batch if m.topic in self._topics]
        if not batch:
            return
        self.messages_in += len(batch)
        try:
            self.on_messages(batch)
        except Exception:
            log.exception("on_messages failed")

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
        }
