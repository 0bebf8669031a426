"""The local topic hub: the one owner of this worker's topic set and of delivery order.

Theory of operation.

Topics. `topics` maps each topic with a local subscriber (or one joining) to its
`TopicState`. The bus subscribes exactly this set: the first local subscriber subscribes
the worker to the topic, the last one out unsubscribes it, and after a reconnection the bus
asks `topic_names()` what to subscribe again (a failed subscribe leaves nothing behind).

Fan-out. A message from the bus is encoded once per variant (JSON or msgpack, compressed
or not) and the same bytes are queued to the outbox of every live subscriber
(`worker.outbox`): one ordered queue per session, so a `gap` or `join` never overtakes a
message queued before it. Encoding one message for one variant may fail (data JSON cannot
carry, nesting too deep): that message is skipped for that variant only, counted, logged
at most once per interval.

Plain topics (no history) are at most once: a subscriber is live as soon as the bus has
the topic; after a bus interruption each live subscriber gets `{"op":"gap","topic":T}`.

History topics. Every message has (epoch, offset). Each subscription has a position: the
last (epoch, offset) written to it (or told in its subscribe ack). Invariants:
  1. a message at or below a subscription's position is never written to it;
  2. a subscription gets every message after its position, in offset order, except ranges
     announced by a gap frame `{"op":"gap","topic","epoch","from","to"?}`, sent only when
     history lacks them (no `to`: that epoch ended; the new one is replayed from its start);
  3. the ack of a subscribe is queued before any message it covers.
The *live group* (`state.live`) is the subscriptions whose position is the topic's
`position`: a pub/sub message at position + 1 goes to all of them at once. A message
further ahead, a new epoch, or a bus interruption starts a *repair* of the group: live
messages are held (at most `max_held_messages`; past that they are dropped, history has
them), history is read in pages of `history_page_size` after the position and written to
the group, holes announced, then the held messages, until the group is back in step with
the bus. A subscription that joins — with `since`, or at the topic's current position — is
a *replay*: it reads history from its own position in pages, written only as fast as its
socket takes them (`Outbox.drained`), until its position equals the group's; then it
*merges* into the group. A replay ahead of the group (history was read past what pub/sub
has delivered) is *parked* at its position and merges when the group reaches it. A group
that changes epoch wakes the parked replays of other epochs to read again. With no live
group, the first replay to finish becomes the group (it *adopts* the topic).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from broker import errors
from broker.bus import Bus, HistoryRead
from broker.connection import encode_broadcast
from broker.envelope import BusMessage
from broker.frames import Opcode, frame_header
from broker.settings import Settings
from broker.tasks import spawn
from worker.outbox import Flusher, Outbox
from worker.stats import WorkerStats
from worker.wire import message_frame_parts

if TYPE_CHECKING:
    from worker.session import ClientSession

log = logging.getLogger("redwire.hub")

# A frame variant: (binary protocol?, deflate window bits or None).
Variant = tuple[bool, int | None]
_LOG_EVERY_S = 10.0  # a recurring failure (a message no variant can carry) is logged this often
_RETRY_MIN_S, _RETRY_MAX_S = 0.1, 2.0  # a history read that failed is retried with backoff


class Replay:
    """One subscription catching up from its own position; see the module docstring."""

    __slots__ = (
        "ended",
        "epoch",
        "epoch_changes",
        "interruptions",
        "offset",
        "page",
        "session",
        "task",
        "top",
    )

    def __init__(self, session: ClientSession, epoch: str, offset: int) -> None:
        self.session = session
        self.epoch = epoch
        self.offset = offset
        self.page: list[BusMessage] | None = None  # a first page already read, else None
        self.top = offset  # the topic's top offset when `page` was read
        self.ended: tuple[str, int] | None = None  # (epoch, from): announce that epoch ended
        self.interruptions = 0  # the topic's bus interruptions when history was last read
        self.epoch_changes = 0  # and how often its live group had changed epoch by then
        self.task: asyncio.Task[None] | None = None


class TopicState:
    """One topic's local subscribers, and on history topics the live group's position."""

    __slots__ = (
        "epoch",
        "epoch_changes",
        "held",
        "held_dropped",
        "history",
        "interruptions",
        "joining",
        "live",
        "name",
        "offset",
        "parked",
        "ready",
        "repair",
        "replays",
        "seen",
    )

    def __init__(self, name: str, history: bool) -> None:
        self.name = name
        self.history = history
        self.ready: asyncio.Future[None] | None = None  # the bus subscription, once made
        self.joining: set[ClientSession] = set()  # subscribes not answered yet
        self.live: dict[ClientSession, Outbox] = {}  # subscriber -> its outbox
        # history topics only
        self.epoch: str | None = None  # the live group's position (None: no live group)
        self.offset = 0
        self.repair: asyncio.Task[None] | None = None
        self.held: list[BusMessage] = []
        self.held_dropped = False
        self.replays: dict[ClientSession, Replay] = {}
        self.parked: dict[tuple[str, int], list[Replay]] = {}
        # While there is no live group: the last numbered message pub/sub brought, and how
        # often the bus was interrupted. A replay adopts the topic only when it has read
        # past both (else messages published after its last read would wait for the next).
        self.seen: tuple[str, int] | None = None
        self.interruptions = 0
        self.epoch_changes = 0  # the live group moved to a new epoch this often

    @property
    def empty(self) -> bool:
        return not self.live and not self.joining and not self.replays


class Hub:
    def __init__(self, bus: Bus, settings: Settings, stats: WorkerStats) -> None:
        self.bus = bus
        self.settings = settings
        self.stats = stats
        self.topics: dict[str, TopicState] = {}
        self.flusher = Flusher(settings.coalesce_window_s)
        self._loop = asyncio.get_event_loop()
        self._failures_logged_at = -math.inf
        self._failures = 0
        bus.on_messages = self.deliver
        bus.on_gap = self._on_gap
        bus.on_presence = self._on_presence
        bus.wanted_topics = self.topic_names

    def topic_names(self) -> list[str]:
        """The topics this worker wants from the bus (the bus resubscribes exactly these)."""
        return list(self.topics)

    # --- membership --------------------------------------------------------------------------

    async def subscribe(
        self, session: ClientSession, topic: str, since: tuple[int, str] | None
    ) -> dict[str, Any] | None:
        """Make `session` a subscriber of `topic`; returns the subscribe ack's fields.

        The caller queues the ack before anything else can run (this coroutine returns
        without yielding to the loop after the replay is registered), so the ack precedes
        every message it covers. None when the session went away meanwhile. BusError when
        the bus cannot subscribe or read history: then nothing is left behind.
        """
        state = self.topics.get(topic)
        if state is None:
            rule = self.settings.rule_for(topic)
            state = self.topics[topic] = TopicState(topic, bool(rule and rule.history_size))
        state.joining.add(session)
        try:
            if state.ready is None:
                state.ready = self._loop.create_future()
                self._spawn(self._bus_subscribe(state))
            await asyncio.shield(state.ready)
            if not session.live or self.topics.get(topic) is not state:
                return None
            if not state.history:
                state.live[session] = session.outbox
                return {} if since is None else {"recovered": False}
            return await self._join_history(state, session, since)
        finally:
            state.joining.discard(session)
            self._drop_if_empty(state)

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
            # A subscribe cut by a lost connection may have reached Redis: undo it.
            self._spawn(self._bus_unsubscribe(state.name))
            return
        ready.set_result(None)
        self._drop_if_empty(state)  # everyone left while the bus was subscribing

    def unsubscribe(self, session: ClientSession, topic: str) -> None:
        """Remove a subscriber; the last one out unsubscribes the worker."""
        state = self.topics.get(topic)
        if state is None:
            return
        state.live.pop(session, None)
        replay = state.replays.pop(session, None)
        if replay is not None:
            self._unpark(state, replay)
            if replay.task is not None and replay.task is not asyncio.current_task():
                replay.task.cancel()
        if state.history and not state.live:
            self._forget_position(state)
        self._drop_if_empty(state)

    def _drop_if_empty(self, state: TopicState) -> None:
        if not state.empty or state.ready is None or not state.ready.done():
            return
        if self.topics.get(state.name) is state:
            del self.topics[state.name]
            if state.repair is not None:
                state.repair.cancel()
            if not state.ready.cancelled() and state.ready.exception() is None:
                self._spawn(self._bus_unsubscribe(state.name))

    async def _bus_unsubscribe(self, topic: str) -> None:
        if topic in self.topics:  # someone subscribed again meanwhile
            return
        try:
            await self.bus.unsubscribe((topic,))
        except errors.BusError as exc:
            log.info("unsubscribe %s deferred: %s", topic, exc)

    # --- history topics: joining ---------------------------------------------------------------

    async def _join_history(
        self, state: TopicState, session: ClientSession, since: tuple[int, str] | None
    ) -> dict[str, Any] | None:
        page = self.settings.history_page_size
        interruptions, epoch_changes = state.interruptions, state.epoch_changes
        if since is None:
            read = await self.bus.history(state.name, after=None, epoch=None)
        else:
            read = await self.bus.history(state.name, after=since[0], epoch=since[1], limit=page)
        if not session.live or self.topics.get(state.name) is not state:
            return None
        fields: dict[str, Any]
        if since is None:
            replay = Replay(session, read.epoch, read.offset)
            replay.page, replay.top = [], read.offset  # nothing to read: merge at once
            fields = {"offset": read.offset, "epoch": read.epoch}
        else:
            after, epoch = since
            if read.epoch == epoch and after <= read.offset:
                replay = Replay(session, epoch, after)
                replay.page, replay.top = read.messages, read.offset
                recovered = _no_hole(read.messages, after) and (
                    read.complete or len(read.messages) >= page
                )
            elif read.epoch == epoch:  # the client claims offsets history never had
                replay = Replay(session, epoch, read.offset)
                recovered = False
            else:  # the client's epoch ended: replay the new one from its start
                replay = Replay(session, read.epoch, 0)
                replay.ended = (epoch, after + 1)
                recovered = False
            fields = {"offset": replay.offset, "epoch": replay.epoch, "recovered": recovered}
            if recovered:
                self.stats.recoveries += 1
            else:
                self.stats.recoveries_failed += 1
        replay.interruptions, replay.epoch_changes = interruptions, epoch_changes
        state.replays[session] = replay
        replay.task = self._spawn(self._run_replay(state, replay))
        return fields

    async def _run_replay(self, state: TopicState, replay: Replay) -> None:
        """Write history after the replay's position to its session until it can merge."""
        try:
            await self._replay(state, replay)
        except Exception:  # a bug: this client reconnects and recovers, nothing is silent
            log.exception("replay of %s failed", state.name)
            replay.session.fail()

    async def _replay(self, state: TopicState, replay: Replay) -> None:
        session = replay.session
        page = self.settings.history_page_size
        if replay.ended is not None:
            epoch, first = replay.ended
            replay.ended = None
            self._send_gap(session, state.name, epoch, first, None)
        messages, top = replay.page, replay.top
        replay.page = None

        def wanted() -> bool:
            return session.live and state.replays.get(session) is replay

        while wanted():
            if messages is None:
                replay.interruptions = state.interruptions
                replay.epoch_changes = state.epoch_changes
                read = await self._read_page(state.name, replay.offset, replay.epoch, wanted)
                if read is None or not wanted():
                    return
                if state.seen is not None and state.seen[0] != read.epoch:
                    state.seen = None  # a late message of an epoch Redis has left
                if read.epoch != replay.epoch:  # that epoch ended: say so, replay the new one
                    self._send_gap(session, state.name, replay.epoch, replay.offset + 1, None)
                    replay.epoch, replay.offset = read.epoch, 0
                    continue
                messages, top = read.messages, read.offset
            cut = len(messages) >= page
            await self._write_replay(state, replay, messages)
            messages = None
            if not session.live or state.replays.get(session) is not replay:
                return
            if not cut and replay.offset < top:  # history ends below its own top: lost
                self._send_gap(session, state.name, replay.epoch, replay.offset + 1, top)
                replay.offset = top
            if not cut and self._merge(state, replay):
                return

    async def _write_replay(
        self, state: TopicState, replay: Replay, messages: list[BusMessage]
    ) -> None:
        session = replay.session
        outbox = session.outbox
        budget = min(self.settings.write_buffer_high_bytes, outbox.limit // 2)
        for message in messages:
            offset = message.offset
            assert offset is not None
            if message.epoch != replay.epoch or offset <= replay.offset:
                continue
            frame = self._encode_or_skip(message, session.variant)
            queued = outbox.bytes
            if queued and (queued >= budget or queued + len(frame) > outbox.limit):
                await outbox.drained()  # as fast as the client reads, no faster
                if not session.live or state.replays.get(session) is not replay:
                    return
            if offset > replay.offset + 1:
                self._send_gap(session, state.name, replay.epoch, replay.offset + 1, offset - 1)
            if frame and outbox.push(frame):
                self.stats.deliveries += 1
            replay.offset = offset

    def _merge(self, state: TopicState, replay: Replay) -> bool:
        """Move a caught-up replay into the live group; False when it must read more."""
        position = (replay.epoch, replay.offset)
        if state.epoch is None:  # no live group: this subscription becomes it
            seen = state.seen
            if replay.interruptions != state.interruptions or (
                seen is not None and (seen[0] != replay.epoch or seen[1] > replay.offset)
            ):
                return False  # pub/sub went past (or may have lost) what it read: read more
            state.epoch, state.offset = position
            state.seen = None
        elif state.epoch == replay.epoch and state.offset < replay.offset:
            state.parked.setdefault(position, []).append(replay)  # ahead: wait for the group
            return True
        elif state.epoch != replay.epoch:
            if replay.epoch_changes != state.epoch_changes:
                return False  # the group moved to a newer epoch since we read: read again
            state.parked.setdefault(position, []).append(replay)  # the group will move here
            return True
        elif state.offset > replay.offset:
            return False
        del state.replays[replay.session]
        state.live[replay.session] = replay.session.outbox
        return True

    def _unpark(self, state: TopicState, replay: Replay) -> None:
        position = (replay.epoch, replay.offset)
        parked = state.parked.get(position)
        if parked is not None and replay in parked:
            parked.remove(replay)
            if not parked:
                del state.parked[position]

    def _merge_parked(self, state: TopicState) -> None:
        """The live group moved: parked replays at its new position join it."""
        parked = state.parked.pop((state.epoch, state.offset), None)  # type: ignore[arg-type]
        if parked:
            for replay in parked:
                if state.replays.get(replay.session) is replay and replay.session.live:
                    del state.replays[replay.session]
                    state.live[replay.session] = replay.session.outbox

    def _wake_parked(self, state: TopicState, *, other_epochs: bool) -> None:
        """Parked replays read again (the group changed epoch, or there is no group)."""
        for position in list(state.parked):
            if other_epochs and position[0] == state.epoch:
                continue
            for replay in state.parked.pop(position):
                if state.replays.get(replay.session) is replay:
                    replay.task = self._spawn(self._run_replay(state, replay))

    def _forget_position(self, state: TopicState) -> None:
        """Nobody is live on a history topic: stop repairing; the next replay adopts it."""
        if state.repair is not None:
            state.repair.cancel()
            state.repair = None
        state.held = []
        state.held_dropped = False
        state.epoch = None
        state.offset = 0
        state.seen = None
        self._wake_parked(state, other_epochs=False)

    # --- fan-out -----------------------------------------------------------------------------

    def deliver(self, batch: list[BusMessage]) -> None:
        """Called by the bus with every message it has read, in arrival order."""
        topics = self.topics
        for message in batch:
            state = topics.get(message.topic)
            if state is None:
                continue
            try:
                if message.offset is None:
                    if not state.history:
                        self._dispatch(state, message)
                else:
                    self._on_numbered(state, message)
            except Exception:  # a bug must not cost the other topics their messages
                self._failed("delivering a message on %s failed", message.topic, exc_info=True)
        self.stats.messages_in += len(batch)
        self.flusher.schedule(now=True)

    def _on_numbered(self, state: TopicState, message: BusMessage) -> None:
        if not state.history:
            return
        if state.epoch is None:  # no live group: joining replays read history instead
            if state.replays:
                state.seen = (message.epoch or "", message.offset or 0)
            return
        if state.repair is not None:
            self._hold(state, message)
            return
        offset = message.offset
        assert offset is not None
        if message.epoch == state.epoch:
            if offset <= state.offset:
                return  # already delivered (e.g. seen again after a resubscription)
            if offset == state.offset + 1:
                self._dispatch(state, message)
                state.offset = offset
                if state.parked:
                    self._merge_parked(state)
                return
        self._hold(state, message)  # ahead of the group, or a new epoch: repair first
        self._start_repair(state)

    def _hold(self, state: TopicState, message: BusMessage) -> None:
        held = state.held
        if len(held) >= self.settings.max_held_messages:
            held.clear()  # history has them; the repair reads past what was dropped
            state.held_dropped = True
        held.append(message)

    def _dispatch(self, state: TopicState, message: BusMessage) -> None:
        """Queue one message to every live subscriber, encoded once per variant."""
        frames: dict[Variant, bytes] = {}
        dirty = self.flusher.dirty
        delivered = 0
        last_variant: Variant | None = None
        frame = b""
        size = 0
        for outbox in state.live.values():
            if outbox.closed:
                continue
            variant = outbox.variant
            if variant != last_variant:  # most topics have one variant: encoded once
                last_variant = variant
                cached = frames.get(variant)
                if cached is None:
                    cached = frames[variant] = self._encode_or_skip(message, variant)
                frame, size = cached, len(cached)
            if not size:
                continue
            queued = outbox.bytes
            if queued and queued + size > outbox.limit:
                outbox.overflow()  # slow consumer: backlog dropped, 1013 now
                continue
            outbox.frames.append(frame)
            outbox.bytes = queued + size
            if not outbox.dirty:
                outbox.dirty = True
                dirty.append(outbox)
            delivered += 1
        self.stats.deliveries += delivered  # the caller schedules the write

    def _encode_or_skip(self, message: BusMessage, variant: Variant) -> bytes:
        """The frame, or b"" when it cannot be built for this variant (data JSON cannot
        carry, nesting too deep, ...): skipped for these subscribers only, counted."""
        try:
            return self._encode(message, variant)
        except Exception as exc:  # RecursionError included: one message, one variant
            self.stats.undeliverable += 1
            self._failed(
                "message on %s cannot be sent as %s (%s)",
                message.topic,
                "msgpack" if variant[0] else "JSON",
                type(exc).__name__,
            )
            return b""

    def _encode(self, message: BusMessage, variant: Variant) -> bytes:
        binary, window_bits = variant
        parts = message_frame_parts(
            message.topic, message.payload, message.encoding, binary, message.offset, message.epoch
        )
        opcode = Opcode.BINARY if binary else Opcode.TEXT
        s = self.settings
        size = sum(map(len, parts))
        if window_bits is None or size < s.compression_min_bytes:
            # The usual case: header and pieces in one join, the frame built once for all.
            return b"".join([frame_header(opcode, size), *parts])
        body = b"".join(parts)
        return encode_broadcast(
            opcode,
            body,
            compress_window_bits=window_bits,
            level=s.compression_level,
            min_bytes=s.compression_min_bytes,
        )

    def _on_presence(self, topic: str, kind: str, client_id: str, info: dict[str, Any]) -> None:
        """A join or leave on a topic: tell its live subscribers, in order with messages."""
        state = self.topics.get(topic)
        rule = self.settings.rule_for(topic)
        if state is None or rule is None or not rule.join_leave:
            return
        frame = {"op": kind, "topic": topic, "client": client_id, "info": info}
        for session in state.live:
            # Join and leave are presence: only for those the rules let see it (allow_presence).
            sees = getattr(session, "may", None)
            if sees is None or sees("presence", topic):
                session.send_control(frame)

    # --- gaps and repairs ----------------------------------------------------------------------

    def _on_gap(self, topics: frozenset[str]) -> None:
        """The bus subscription was interrupted: these topics may have missed messages."""
        for topic in topics:
            state = self.topics.get(topic)
            if state is None:
                continue
            if not state.history:
                self.stats.gaps_announced += 1
                for session in state.live:
                    session.send_control({"op": "gap", "topic": topic})
            elif state.epoch is not None:
                self._start_repair(state)
            else:
                state.interruptions += 1

    def _start_repair(self, state: TopicState) -> None:
        if state.repair is None:
            state.repair = self._spawn(self._repair(state))

    async def _repair(self, state: TopicState) -> None:
        """Bring the live group back in step: history after its position, then what was held."""
        self.stats.gap_repairs += 1
        page = self.settings.history_page_size

        def wanted() -> bool:
            return bool(state.live) and state.epoch is not None

        try:
            while wanted():
                held_before = len(state.held)  # held from before this read
                assert state.epoch is not None
                read = await self._read_page(state.name, state.offset, state.epoch, wanted)
                if read is None or self.topics.get(state.name) is not state or not wanted():
                    return
                caught_up = self._repair_page(state, read, page, held_before)
                self.flusher.schedule()
                if caught_up:
                    return
        except Exception:  # a bug: these clients reconnect and recover, nothing is silent
            log.exception("gap repair of %s failed", state.name)
            for session in list(state.live):
                session.fail()
        finally:
            if state.repair is asyncio.current_task():
                state.repair = None
            # Caught up: nothing is held. Cancelled or failed: nobody is left to receive it.
            state.held = []
            state.held_dropped = False

    async def _read_page(
        self, topic: str, after: int, epoch: str, wanted: Callable[[], bool]
    ) -> HistoryRead | None:
        """One page of history after (epoch, after). While the bus fails it is read again
        with backoff for as long as `wanted()`; None once it is not wanted any more."""
        delay = _RETRY_MIN_S
        while wanted():
            try:
                return await self.bus.history(
                    topic, after=after, epoch=epoch, limit=self.settings.history_page_size
                )
            except errors.BusError as exc:
                log.info("history of %s waits for the bus: %s", topic, exc)
                await asyncio.sleep(delay)  # backoff before reading again
                delay = min(delay * 2, _RETRY_MAX_S)
        return None

    def _repair_page(
        self, state: TopicState, read: HistoryRead, page: int, held_before: int
    ) -> bool:
        """Write one page of history to the live group; True when it is back in step.

        `held_before`: how many held messages came before the read. Those of an epoch
        other than the one it found are late messages of an epoch Redis has left."""
        assert state.epoch is not None
        if read.epoch != state.epoch:  # the epoch ended: announce, replay the new one
            self._gap_live(state, state.epoch, state.offset + 1, None)
            state.epoch, state.offset = read.epoch, 0
            state.epoch_changes += 1
            self._wake_parked(state, other_epochs=True)
            return False
        for message in read.messages:
            self._advance(state, message)
        cut = len(read.messages) >= page
        if not cut and state.offset < read.offset:  # history ends below its own top: lost
            self._gap_live(state, state.epoch, state.offset + 1, read.offset)
            state.offset = read.offset
            if state.parked:
                self._merge_parked(state)
        if cut:
            return False
        if state.held_dropped:
            state.held_dropped = False  # this read started after the drop: it covered them
            return False
        # Then what pub/sub delivered meanwhile, if it follows on.
        held = state.held
        if any(m.epoch != state.epoch for m in held[:held_before]):
            held = state.held = [
                m for i, m in enumerate(held) if i >= held_before or m.epoch == state.epoch
            ]
        taken = 0
        for message in held:
            if message.epoch != state.epoch:
                break
            assert message.offset is not None
            if message.offset > state.offset + 1:
                break
            self._advance(state, message)
            taken += 1
        del held[:taken]
        return not held and state.offset >= read.offset

    def _advance(self, state: TopicState, message: BusMessage) -> None:
        """Write one message of the group's epoch to the group, announcing a hole before it."""
        offset = message.offset
        assert offset is not None and state.epoch is not None
        if message.epoch != state.epoch or offset <= state.offset:
            return
        if offset > state.offset + 1:
            self._gap_live(state, state.epoch, state.offset + 1, offset - 1)
        self._dispatch(state, message)
        state.offset = offset
        if state.parked:
            self._merge_parked(state)

    def _gap_live(self, state: TopicState, epoch: str, first: int, last: int | None) -> None:
        for session in state.live:
            self._send_gap(session, state.name, epoch, first, last)

    def _send_gap(
        self, session: ClientSession, topic: str, epoch: str, first: int, last: int | None
    ) -> None:
        self.stats.gaps_announced += 1
        frame: dict[str, Any] = {"op": "gap", "topic": topic, "epoch": epoch, "from": first}
        if last is not None:
            frame["to"] = last
        session.send_control(frame)

    # --- helpers -----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task kept alive until done, whose failure is logged (broker.tasks)."""
        return spawn(coro, name="hub")

    def _failed(self, message: str, *args: Any, exc_info: bool = False) -> None:
        """Log a recurring failure at most once per interval, with how many there were."""
        self._failures += 1
        now = time.monotonic()
        if now - self._failures_logged_at >= _LOG_EVERY_S:
            self._failures_logged_at = now
            log.warning(message + " (%d such failures so far)", *args, self._failures,
                        exc_info=exc_info)  # fmt: skip


def _no_hole(messages: list[BusMessage], after: int) -> bool:
    """True when `messages` are exactly after+1, after+2, ... (none missing)."""
    expected = after + 1
    for message in messages:
        if message.offset != expected:
            return False
        expected += 1
    return True
