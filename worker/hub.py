"""The local topic hub: topic → this worker's subscribers, and the fan-out.

The first local subscriber of a topic subscribes the worker to it on the bus; the last one
to leave unsubscribes it. A batch of bus messages is turned into frames once per variant
(JSON or msgpack, compressed or not) and the same bytes are queued to every subscriber.
Each subscriber's pending frames go out in one `transport.write` (coalesced writes): at
once when the hub was idle, else at most once per `coalesce_window_s`. A subscriber whose
unsent bytes exceed `max_send_buffer_bytes` is a slow consumer: it is closed with 1013
instead of growing the worker's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker import errors
from broker.bus import Bus
from broker.connection import encode_broadcast
from broker.envelope import BusMessage
from broker.frames import Opcode
from broker.settings import Settings
from worker.stats import WorkerStats
from worker.wire import message_frame_body

if TYPE_CHECKING:
    from worker.session import ClientSession

log = logging.getLogger("redwire.hub")

# A frame variant: (binary protocol?, deflate window bits or None).
Variant = tuple[bool, int | None]


class Hub:
    def __init__(self, bus: Bus, settings: Settings, stats: WorkerStats) -> None:
        self.bus = bus
        self.settings = settings
        self.stats = stats
        self.topics: dict[str, set[ClientSession]] = {}
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        self._dirty: list[ClientSession] = []
        self._last_flush = 0.0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_event_loop()
        self.gap_listeners: list[Callable[[frozenset[str]], None]] = []
        bus.on_messages = self.deliver
        bus.on_gap = self._on_gap

    # --- membership --------------------------------------------------------------------------

    async def subscribe(self, session: ClientSession, topic: str) -> None:
        """Add a local subscriber; returns once the worker receives the topic from the bus."""
        subs = self.topics.get(topic)
        if subs is None:
            subs = self.topics[topic] = set()
            subs.add(session)
            future = asyncio.get_running_loop().create_future()
            self._subscribing[topic] = future
            try:
                await self.bus.subscribe((topic,))
            except BaseException as exc:
                subs.discard(session)
                self._drop_if_empty(topic, subscribed=False)
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it themselves
                raise
            finally:
                self._subscribing.pop(topic, None)
            future.set_result(None)
            if not subs:  # everyone left while the bus was subscribing
                self._drop_if_empty(topic, subscribed=True)
            return
        subs.add(session)
        pending = self._subscribing.get(topic)
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except BaseException:
                subs.discard(session)
                raise

    def unsubscribe(self, session: ClientSession, topic: str) -> bool:
        """Remove a local subscriber; the last one out unsubscribes the worker."""
        subs = self.topics.get(topic)
        if subs is None or session not in subs:
            return False
        subs.discard(session)
        if topic not in self._subscribing:
            self._drop_if_empty(topic, subscribed=True)
        return True

    def _drop_if_empty(self, topic: str, *, subscribed: bool) -> None:
        subs = self.topics.get(topic)
        if subs is not None and not subs:
            del self.topics[topic]
            if subscribed:
                asyncio.get_running_loop().create_task(self._bus_unsubscribe(topic))

    async def _bus_unsubscribe(self, topic: str) -> None:
        if topic in self.topics:  # someone subscribed again meanwhile
            return
        try:
            await self.bus.unsubscribe((topic,))
        except errors.BusError as exc:
            log.info("unsubscribe %s deferred: %s", topic, exc)

    # --- fan-out -----------------------------------------------------------------------------

    def deliver(self, batch: list[BusMessage]) -> None:
        """Called by the bus with every message it has read; writes once per subscriber."""
        topics = self.topics
        dirty = self._dirty
        delivered = 0
        for message in batch:
            subs = topics.get(message.topic)
            if not subs:
                continue
            frames: dict[Variant, bytes] = {}
            for session in subs:
                if not session.live:
                    continue
                variant = session.variant
                frame = frames.get(variant)
                if frame is None:
                    frame = frames[variant] = self._encode_or_skip(message, variant)
                if not frame:
                    continue
                pending = session.pending
                if not pending:
                    dirty.append(session)
                pending.append(frame)
                delivered += 1
        self.stats.messages_in += len(batch)
        self.stats.deliveries += delivered
        if dirty and self._flush_timer is None:
            # Coalesce: at most one write per subscriber per `coalesce_window_s`. An idle hub
            # writes at once; a busy one gathers what arrives within the window.
            now = self._loop.time()
            wait = self._last_flush + self.settings.coalesce_window_s - now
            if wait <= 0:
                self.flush()
            else:
                self._flush_timer = self._loop.call_at(now + wait, self.flush)

    def _encode_or_skip(self, message: BusMessage, variant: Variant) -> bytes:
        """The frame, or b"" when these subscribers' encoding cannot carry the data (e.g.
        NaN from an SDK publisher to JSON clients): skipped for them, logged, not fatal."""
        try:
            return self._encode(message, variant)
        except ValueError as exc:
            self.stats.undeliverable += 1
            log.warning("message on %s cannot be sent as %s: %s", message.topic,
                        "msgpack" if variant[0] else "JSON", exc)  # fmt: skip
            return b""

    def _encode(self, message: BusMessage, variant: Variant) -> bytes:
        binary, window_bits = variant
        body = message_frame_body(message.topic, message.payload, message.encoding, binary=binary)
        s = self.settings
        return encode_broadcast(
            Opcode.BINARY if binary else Opcode.TEXT,
            body,
            compress_window_bits=window_bits,
            level=s.compression_level,
            min_bytes=s.compression_min_bytes,
        )

    def flush(self) -> None:
        self._flush_timer = None
        self._last_flush = self._loop.time()
        dirty, self._dirty = self._dirty, []
        out_bytes = 0
        for session in dirty:
            out_bytes += session.flush()
        self.stats.bytes_out += out_bytes

    def _on_gap(self, topics: frozenset[str]) -> None:
        for listener in self.gap_listeners:
            listener(topics)

    def remove_session(self, session: ClientSession) -> None:
        for topic in list(session.topics):
            self.unsubscribe(session, topic)
        session.topics.clear()
