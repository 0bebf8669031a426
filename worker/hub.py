"""The local topic hub: topic → this worker's subscribers, the fan-out, and gap repair.

Membership. The first local subscriber of a topic subscribes the worker to it on the bus;
the last one to leave unsubscribes it. A subscriber is first *joining* (its subscribe is
not answered yet: messages for it are kept aside) and then *live*.

Fan-out. A batch of bus messages is turned into frames once per variant (JSON or msgpack,
compressed or not) and the same bytes are queued to every live subscriber. Each
subscriber's pending frames go out in one `transport.write` (coalesced writes): at once
when the hub was idle, else at most once per `coalesce_window_s`. A subscriber whose
unsent bytes exceed `max_send_buffer_bytes` is a slow consumer: it is closed with 1013.

Order and gaps (topics with history). Messages carry per-topic offsets; the hub remembers
the last offset it delivered per topic. When the next one is not last + 1 (the bus
missed some, e.g. across a Redis reconnection), or the bus reports a gap, the topic is
*repaired*: live messages are held, the missing ones are read from history and delivered
first, then the held ones, with duplicates dropped by offset. Whatever history can no
longer give is announced to subscribers with a `gap` frame. Topics without history get a
`gap` frame after a bus interruption.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from broker import errors
from broker.bus import Bus, HistoryRead
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


class TopicState:
    """One topic's local subscribers and its delivery position."""

    __slots__ = (
        "held",
        "history",
        "joining",
        "last_epoch",
        "last_offset",
        "live",
        "name",
        "ready",
        "repairing",
    )

    def __init__(self, name: str, history: bool) -> None:
        self.name = name
        self.history = history
        self.live: set[ClientSession] = set()
        self.joining: dict[ClientSession, list[BusMessage]] = {}
        self.ready: asyncio.Future[None] | None = None  # the bus subscription, once made
        self.last_offset: int | None = None
        self.last_epoch: str | None = None
        self.repairing = False
        self.held: list[BusMessage] = []

    @property
    def empty(self) -> bool:
        return not self.live and not self.joining


class Hub:
    def __init__(self, bus: Bus, settings: Settings, stats: WorkerStats) -> None:
        self.bus = bus
        self.settings = settings
        self.stats = stats
        self.topics: dict[str, TopicState] = {}
        self._dirty: list[ClientSession] = []
        self._last_flush = 0.0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_event_loop()
        bus.on_messages = self.deliver
        bus.on_gap = self._on_gap
        bus.on_presence = self._on_presence

    # --- membership --------------------------------------------------------------------------

    async def join(self, session: ClientSession, topic: str) -> TopicState:
        """Add `session` as joining; returns once the worker receives the topic from the bus.

        Messages arriving from then on are kept for the session until `go_live`.
        """
        state = self.topics.get(topic)
        if state is None:
            rule = self.settings.rule_for(topic)
            state = self.topics[topic] = TopicState(topic, bool(rule and rule.history_size))
        state.joining[session] = []
        if state.ready is None:
            state.ready = self._loop.create_future()
            self._loop.create_task(self._bus_subscribe(state))
        try:
            await asyncio.shield(state.ready)
        except BaseException:
            self.leave(session, topic)
            raise
        return state

    async def _bus_subscribe(self, state: TopicState) -> None:
        ready = state.ready
        assert ready is not None
        try:
            await self.bus.subscribe((state.name,))
        except BaseException as exc:
            if self.topics.get(state.name) is state:
                del self.topics[state.name]
            ready.set_exception(exc)
            ready.exception()  # retrieved: the joining sessions re-raise it themselves
            return
        ready.set_result(None)
        if state.empty:  # everyone left while the bus was subscribing
            self._drop(state)

    def go_live(
        self,
        session: ClientSession,
        state: TopicState,
        after: int | None = None,
        epoch: str | None = None,
    ) -> None:
        """Move a joining session to live, first sending what was kept for it (> `after`).

        `after`/`epoch` is the position the session was told (its subscribe ack).
        """
        kept = state.joining.pop(session, None)
        if kept is None:
            return
        if state.history and state.last_offset is None and after is not None:
            state.last_offset, state.last_epoch = after, epoch
        for message in kept:
            if after is None or message.offset is None or message.offset > after:
                self.queue(session, message)
        state.live.add(session)
        if session.pending and session not in self._dirty:
            self._dirty.append(session)
        self._schedule_flush()

    def leave(self, session: ClientSession, topic: str) -> bool:
        """Remove a subscriber; the last one out unsubscribes the worker."""
        state = self.topics.get(topic)
        if state is None:
            return False
        found = session in state.live or session in state.joining
        state.live.discard(session)
        state.joining.pop(session, None)
        if state.empty and state.ready is not None and state.ready.done():
            self._drop(state)
        return found

    def _drop(self, state: TopicState) -> None:
        if self.topics.get(state.name) is state:
            del self.topics[state.name]
            self._loop.create_task(self._bus_unsubscribe(state.name))

    async def _bus_unsubscribe(self, topic: str) -> None:
        if topic in self.topics:  # someone subscribed again meanwhile
            return
        try:
            await self.bus.unsubscribe((topic,))
        except errors.BusError as exc:
            log.info("unsubscribe %s deferred: %s", topic, exc)

    # --- fan-out -----------------------------------------------------------------------------

    def deliver(self, batch: list[BusMessage]) -> None:
        """Called by the bus with every message it has read."""
        topics = self.topics
        for message in batch:
            state = topics.get(message.topic)
            if state is None:
                continue
            if message.offset is not None and not self._in_order(state, message):
                continue
            self._dispatch(state, message)
        self.stats.messages_in += len(batch)
        self._schedule_flush()

    def _in_order(self, state: TopicState, message: BusMessage) -> bool:
        """Check a history message's offset; False when it is held, dropped or repairing."""
        if state.repairing:
            state.held.append(message)
            return False
        last = state.last_offset
        offset = message.offset
        assert offset is not None
        if message.epoch != state.last_epoch:
            if state.last_epoch is not None:  # the epoch changed: history restarted, say so
                self._announce_gap(state, None, None)
            state.last_offset, state.last_epoch = offset, message.epoch
            return True
        if last is None:
            state.last_offset = offset
            return True
        if offset <= last:
            return False  # already delivered (e.g. seen again after a resubscription)
        if offset == last + 1:
            state.last_offset = offset
            return True
        state.held.append(message)
        self._start_repair(state)
        return False

    def _dispatch(self, state: TopicState, message: BusMessage) -> None:
        for kept in state.joining.values():
            kept.append(message)
        live = state.live
        if not live:
            return
        frames: dict[Variant, bytes] = {}
        dirty = self._dirty
        delivered = 0
        for session in live:
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
        self.stats.deliveries += delivered

    def queue(self, session: ClientSession, message: BusMessage) -> None:
        """Queue one message to one session (a replay from history or from what was kept)."""
        frame = self._encode_or_skip(message, session.variant)
        if frame:
            session.pending.append(frame)
            self.stats.deliveries += 1

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
        body = message_frame_body(
            message.topic,
            message.payload,
            message.encoding,
            binary=binary,
            offset=message.offset,
            epoch=message.epoch,
        )
        s = self.settings
        return encode_broadcast(
            Opcode.BINARY if binary else Opcode.TEXT,
            body,
            compress_window_bits=window_bits,
            level=s.compression_level,
            min_bytes=s.compression_min_bytes,
        )

    def _on_presence(self, topic: str, kind: str, client_id: str, info: dict[str, Any]) -> None:
        """A join or leave on a topic: tell its subscribers when the topic wants that."""
        state = self.topics.get(topic)
        rule = self.settings.rule_for(topic)
        if state is None or rule is None or not rule.join_leave:
            return
        frame = {"op": kind, "topic": topic, "client": client_id, "info": info}
        for session in state.live:
            if session.live:
                session.send(session.codec.encode(frame))

    def _schedule_flush(self) -> None:
        if not self._dirty or self._flush_timer is not None:
            return
        # Coalesce: at most one write per subscriber per `coalesce_window_s`. An idle hub
        # writes at once; a busy one gathers what arrives within the window.
        now = self._loop.time()
        wait = self._last_flush + self.settings.coalesce_window_s - now
        if wait <= 0:
            self.flush()
        else:
            self._flush_timer = self._loop.call_at(now + wait, self.flush)

    def flush(self) -> None:
        self._flush_timer = None
        self._last_flush = self._loop.time()
        dirty, self._dirty = self._dirty, []
        out_bytes = 0
        for session in dirty:
            out_bytes += session.flush()
        self.stats.bytes_out += out_bytes

    # --- gaps --------------------------------------------------------------------------------

    def _on_gap(self, topics: frozenset[str]) -> None:
        """The bus subscription was interrupted: these topics may have missed messages."""
        for topic in topics:
            state = self.topics.get(topic)
            if state is None:
                continue
            if state.history and state.last_offset is not None:
                self._start_repair(state)
            elif not state.history:
                self._announce_gap(state, None, None)

    def _start_repair(self, state: TopicState) -> None:
        if not state.repairing:
            state.repairing = True
            self._loop.create_task(self._repair(state))

    async def _repair(self, state: TopicState) -> None:
        """Fill the topic's gap from history, then deliver what was held, in offset order."""
        self.stats.gap_repairs += 1
        last = state.last_offset
        try:
            read: HistoryRead | None = await self.bus.history(
                state.name, after=last, epoch=state.last_epoch
            )
        except errors.BusError as exc:
            log.warning("gap repair of %s failed: %s", state.name, exc)
            read = None
        state.repairing = False
        held, state.held = state.held, []
        if self.topics.get(state.name) is not state:
            return
        messages = [*(read.messages if read is not None else ()), *held]
        if read is None or not read.complete:
            # What history cannot give is lost: say so, and carry on from what is there.
            first = messages[0].offset if messages else None
            if read is not None and read.epoch != state.last_epoch:
                self._announce_gap(state, None, None)
                state.last_epoch = read.epoch
            else:
                self._announce_gap(state, (last or 0) + 1, None if first is None else first - 1)
            state.last_offset = None if first is None else first - 1
        for message in messages:
            if self._in_order(state, message):
                self._dispatch(state, message)
        self._schedule_flush()

    def _announce_gap(self, state: TopicState, first: int | None, last: int | None) -> None:
        self.stats.gaps_announced += 1
        frame: dict[str, object] = {"op": "gap", "topic": state.name}
        if first is not None:
            frame["from"] = first
        if last is not None and first is not None and last >= first:
            frame["to"] = last
        for session in state.live:
            if session.live:
                session.send(session.codec.encode(frame))
