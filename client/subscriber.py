"""Consume topics from a Python service, straight from the bus (no WebSocket hop).

    async with Subscriber("redis://127.0.0.1:6379/0", ["orders", "prices"]) as sub:
        async for event in sub:
            if isinstance(event, Gap):
                resync(event.topics)      # the bus was interrupted: messages may be missing
            else:
                handle(event.topic, event.data)

Messages arrive in publish order per topic. The subscription reconnects by itself (the
bus's own loop, with backoff); an interruption, or a consumer too slow for
`max_queue` messages, is surfaced as a `Gap`, never swallowed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from broker.bus import Bus, make_bus
from broker.envelope import ENCODING_MSGPACK, BusMessage, msgpack_loads
from broker.settings import Settings
from broker.topics import check_topic


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    data: Any
    offset: int | None = None
    epoch: str | None = None
    origin: str = ""


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages of these topics may have been missed (reconnection or overflow)."""

    topics: frozenset[str]
    reason: str


def decode(message: BusMessage) -> Message:
    if message.encoding == ENCODING_MSGPACK:
        data = msgpack_loads(message.payload)
    else:
        data = json.loads(message.payload)
    return Message(message.topic, data, message.offset, message.epoch, message.origin)


class Subscriber:
    def __init__(
        self,
        redis_url: str,
        topics: Iterable[str],
        *,
        settings: Settings | None = None,
        origin: str | None = None,
        max_queue: int = 100_000,
    ) -> None:
        self.settings = (settings or Settings.load()).replace(redis_url=redis_url)
        self.topics = [check_topic(t, self.settings.max_topic_bytes) for t in topics]
        self.origin = origin or f"sdk-sub-{os.getpid()}-{random.getrandbits(32):08x}"
        self.max_queue = max_queue
        self.dropped = 0
        self._events: deque[Message | Gap] = deque()
        self._wake = asyncio.Event()
        self._bus: Bus | None = None

    async def start(self) -> None:
        bus = self._bus = make_bus(self.settings, origin=self.origin)
        bus.on_messages = self._on_messages
        bus.on_gap = self._on_gap
        await bus.start()
        await bus.subscribe(self.topics)

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.close()
        self._wake.set()

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _on_messages(self, batch: list[BusMessage]) -> None:
        room = max(self.max_queue - len(self._events), 0)
        kept, lost = batch[:room], batch[room:]
        for message in kept:
            try:
                self._events.append(decode(message))
            except ValueError:
                self.dropped += 1
        if lost:  # the gap comes where the messages are missing: after what was kept
            self.dropped += len(lost)
            self._events.append(
                Gap(frozenset(m.topic for m in lost), f"consumer too slow: {len(lost)} dropped")
            )
        self._wake.set()

    def _on_gap(self, topics: frozenset[str]) -> None:
        self._events.append(Gap(topics, "bus subscription interrupted"))
        self._wake.set()

    async def get(self, timeout_s: float | None = None) -> Message | Gap:
        """The next message or gap (TimeoutError after `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            while not self._events:
                if self._bus is None:
                    raise RuntimeError("subscriber is closed")
                self._wake.clear()
                await self._wake.wait()
        return self._events.popleft()

    def __aiter__(self) -> AsyncIterator[Message | Gap]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message | Gap]:
        while self._bus is not None or self._events:
            try:
                yield await self.get()
            except RuntimeError:
                return
