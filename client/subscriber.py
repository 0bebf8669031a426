"""Consume topics from a Python service, straight from the bus (no WebSocket hop).

    async with Subscriber("redis://127.0.0.1:6379/0", ["orders", "prices"]) as sub:
        async for event in sub:
            if isinstance(event, Gap):
                resync(event.topics)      # messages may be missing
            else:
                handle(event.topic, event.data)

Messages arrive in publish order per topic. The subscription reconnects by itself (the
bus's own loop, with backoff; the Subscriber is the bus' owner: `wanted_topics` is its
topic set). Every break is surfaced as a `Gap`, never swallowed:
- a topic without history: after every bus reconnection (Redis restarted, the subscriber
  connection killed, a wedged subscription replaced), `Gap(topics, reason)`;
- a topic with history: the Subscriber keeps the topic's position (epoch, last offset) and,
  after a reconnection, reads history after it: the missed messages are delivered in order,
  with no duplicate, and a `Gap` (with `epoch`, `first`, `last`) names only what history
  lacks. When the epoch changed (history was lost), a `Gap` with `last=None` ends the old
  epoch and the new epoch is delivered from its start, as far as history holds it;
- a consumer too slow for `max_queue` messages: `Gap` after the kept messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from broker.bus import Bus, make_bus
from broker.envelope import ENCODING_MSGPACK, BusMessage, msgpack_loads
from broker.errors import BusError
from broker.settings import Settings
from broker.tasks import spawn
from broker.topics import check_topic

log = logging.getLogger("redwire.subscriber")

_REPAIR_RETRY_MIN_S = 0.05
_REPAIR_RETRY_MAX_S = 2.0


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    data: Any
    offset: int | None = None
    epoch: str | None = None
    origin: str = ""


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages of these topics may have been missed (reconnection or overflow).

    On a history topic (one topic): exactly offsets `first`..`last` of `epoch` are missing;
    `last` None: every offset from `first` on in `epoch` may be missing (that epoch ended;
    what follows carries the new epoch)."""

    topics: frozenset[str]
    reason: str
    epoch: str | None = None
    first: int | None = None
    last: int | None = None


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
        # history topics: position (epoch, last offset delivered or announced)
        self._positions: dict[str, tuple[str, int]] = {}
        self._held: dict[str, list[BusMessage]] = {}  # live messages held during a repair
        self._repairing: set[str] = set()  # topics whose repair task runs
        self._again: set[str] = set()  # repairs asked for while one runs
        self._repairs: set[asyncio.Task[None]] = set()

    def _has_history(self, topic: str) -> bool:
        rule = self.settings.rule_for(topic)
        return rule is not None and rule.history_size > 0

    async def start(self) -> None:
        bus = self._bus = make_bus(self.settings, origin=self.origin)
        bus.wanted_topics = lambda: self.topics  # subscribed on every (re)connection
        bus.on_messages = self._on_messages
        bus.on_gap = self._on_gap
        await bus.start()  # subscribed once it returns, or when Redis is back (with a Gap)
        for topic in self.topics:
            if self._has_history(topic):
                self._repair(topic)  # the starting position

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        for task in list(self._repairs):
            task.cancel()
        await asyncio.gather(*self._repairs, return_exceptions=True)
        if bus is not None:
            await bus.close()
        self._wake.set()

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- delivery ------------------------------------------------------------------------

    def _push(self, events: list[Message | Gap]) -> None:
        self._events.extend(events)
        self._wake.set()

    def _on_messages(self, batch: list[BusMessage]) -> None:
        out: list[BusMessage] = []
        for message in batch:
            topic = message.topic
            if topic in self._held:  # a repair runs: it delivers these after history
                self._held[topic].append(message)
            elif message.offset is None or not self._has_history(topic):
                out.append(message)
            else:
                position = self._positions.get(topic)
                if position is None or message.epoch != position[0]:
                    self._held[topic] = [message]  # unknown start or a new epoch: repair
                    self._repair(topic)
                elif message.offset <= position[1]:
                    continue  # already delivered (from history)
                elif message.offset == position[1] + 1:
                    self._positions[topic] = (position[0], message.offset)
                    out.append(message)
                else:  # a hole (a malformed entry skipped): history may have it
                    self._held[topic] = [message]
                    self._repair(topic)
        self._deliver(out)

    def _deliver(self, batch: list[BusMessage]) -> None:
        room = max(self.max_queue - len(self._events), 0)
        kept, lost = batch[:room], batch[room:]
        events: list[Message | Gap] = []
        for message in kept:
            try:
                events.append(decode(message))
            except ValueError:
                self.dropped += 1
        if lost:  # the gap comes where the messages are missing: after what was kept
            self.dropped += len(lost)
            events.append(
                Gap(frozenset(m.topic for m in lost), f"consumer too slow: {len(lost)} dropped")
            )
        self._push(events)

    def _on_gap(self, topics: frozenset[str]) -> None:
        plain = frozenset(t for t in topics if not self._has_history(t))
        if plain:
            self._push([Gap(plain, "bus subscription interrupted")])
        for topic in topics - plain:
            self._held.setdefault(topic, [])
            self._repair(topic)

    # --- history topics: positions and repairs -------------------------------------------

    def _repair(self, topic: str) -> None:
        """Fill the topic's break from history (one repair per topic at a time)."""
        self._held.setdefault(topic, [])
        if topic in self._repairing:
            self._again.add(topic)
            return
        self._repairing.add(topic)
        task = spawn(self._repair_loop(topic), name=f"repair:{topic}")
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _repair_loop(self, topic: str) -> None:
        delay = _REPAIR_RETRY_MIN_S
        while self._bus is not None:
            self._again.discard(topic)
            try:
                await self._repair_once(topic)
            except BusError as exc:  # Redis away: try again (a reconnect asks again too)
                log.debug("subscriber: history read for %r failed: %s", topic, exc)
                await asyncio.sleep(delay)  # backoff before the next attempt
                delay = min(delay * 2, _REPAIR_RETRY_MAX_S)
                continue
            if topic not in self._again:
                break
        self._repairing.discard(topic)
        held = self._held.pop(topic, [])
        self._on_messages(held)  # what arrived live meanwhile, checked against the position

    async def _repair_once(self, topic: str) -> None:
        bus = self._bus
        assert bus is not None
        position = self._positions.get(topic)
        if position is None:  # the start: the position now; what arrived live is newer
            read = await bus.history(topic, after=None, epoch=None)
            if topic not in self._positions:
                held = self._held.get(topic, [])
                first = next((m for m in held if m.epoch == read.epoch), None)
                start = read.offset if first is None else min(read.offset, first.offset - 1)
                self._positions[topic] = (read.epoch, max(start, 0))
            return
        epoch, offset = position
        while True:
            read = await bus.history(topic, after=offset, epoch=epoch)
            events: list[Message | Gap] = []
            if read.epoch != epoch:  # that epoch ended: history lost what it held
                events.append(
                    Gap(frozenset({topic}), "history lost (new epoch)", epoch, offset + 1, None)
                )
                epoch, offset = read.epoch, 0
                self._positions[topic] = (epoch, offset)
                self._push(events)
                continue  # replay the new epoch from its start
            for message in read.messages:
                if message.offset is None or message.offset <= offset:
                    continue
                if message.offset > offset + 1:
                    missing = Gap(frozenset({topic}), "not in history", epoch, offset + 1,
                                  message.offset - 1)  # fmt: skip
                    events.append(missing)
                try:
                    events.append(decode(message))
                except ValueError:
                    self.dropped += 1
                offset = message.offset
            progressed = bool(read.messages)
            if offset < read.offset and (read.complete or not progressed):
                # history lacks the rest up to the top
                events.append(
                    Gap(frozenset({topic}), "not in history", epoch, offset + 1, read.offset)
                )
                offset = read.offset
            self._positions[topic] = (epoch, offset)
            self._push(events)
            if offset >= read.offset:
                return
            # cut by the read limit: the next page

    # --- consuming -----------------------------------------------------------------------

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
