"""Records what a bus reports through its callbacks; tests wait on it with a deadline.
`Owned` is a RedisBus with the smallest owner of its topic set, for bus-level fault tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any

from broker.bus import Bus
from broker.bus.redis import RedisBus
from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusUnavailable
from broker.settings import Settings

WAIT_S = 5.0

PresenceEvent = tuple[str, str, str, dict[str, Any]]  # topic, JOIN/LEAVE, client, info


class BusWatch:
    """Takes over all four callbacks of `bus` and keeps what they report, in order."""

    def __init__(self, bus: Bus) -> None:
        self.messages: list[BusMessage] = []
        self.batches: list[int] = []  # the size of each on_messages batch
        self.presence: list[PresenceEvent] = []
        self.events: list[BusMessage | PresenceEvent] = []  # both kinds, in delivery order
        self.gaps: list[frozenset[str]] = []
        self.health: list[bool] = []
        self._changed = asyncio.Event()
        bus.on_messages = self._on_messages
        bus.on_presence = self._on_presence
        bus.on_gap = self._on_gap
        bus.on_health = self._on_health

    def _on_messages(self, batch: list[BusMessage]) -> None:
        self.batches.append(len(batch))
        self.messages.extend(batch)
        self.events.extend(batch)
        self._changed.set()

    def _on_presence(self, topic: str, kind: str, client_id: str, info: dict[str, Any]) -> None:
        self.presence.append((topic, kind, client_id, info))
        self.events.append((topic, kind, client_id, info))
        self._changed.set()

    def _on_gap(self, topics: frozenset[str]) -> None:
        self.gaps.append(topics)
        self._changed.set()

    def _on_health(self, healthy: bool) -> None:
        self.health.append(healthy)
        self._changed.set()

    async def until(self, predicate: Callable[[], object], timeout_s: float = WAIT_S) -> None:
        """Return once `predicate()` holds, re-checked after each callback; TimeoutError."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def receive(self, bus: Bus, *topics: str) -> None:
        """Publish one message on each topic and wait until all of them came back."""
        payloads = []
        for topic in topics:
            payload = f"{topic}-{len(self.messages)}-{len(payloads)}".encode()
            await bus.publish(BusMessage(topic, payload, ENCODING_JSON, "test"))
            payloads.append(payload)
        await self.until(lambda: set(payloads) <= {m.payload for m in self.messages})


class Owned(RedisBus):
    """A RedisBus with the smallest owner (what the hub does): the topic set lives here,
    `wanted_topics` returns it, a failed subscribe drops its topics from it."""

    def __init__(self, url: str, settings: Settings, origin: str) -> None:
        super().__init__(url, settings, origin)
        self.owned: set[str] = set()
        self.wanted_topics = lambda: sorted(self.owned)

    async def subscribe(self, topics: Collection[str]) -> None:
        new = set(topics) - self.owned
        self.owned |= new
        try:
            await super().subscribe(topics)
        except BusUnavailable:
            self.owned -= new
            raise

    async def unsubscribe(self, topics: Collection[str]) -> None:
        self.owned -= set(topics)
        await super().unsubscribe(topics)
