"""One session's ordered outbox, and the worker's flusher that writes outboxes out.

Theory of operation.

Order. Every frame a pub/sub client receives — welcome, acks, errors, pongs, messages, gap,
join/leave — is appended to its session's `Outbox`, already serialized as a WebSocket frame,
in the order the server decided it, and leaves in that order. A broadcast frame is the same
bytes object in every subscriber's outbox (the hub encodes it once per variant). Only RFC
6455 control frames (keepalive ping, the pong to a ping) and the close frame are written by
`worker.protocol` directly: control frames may come between whole messages, and a close
ends the stream (see Closing).

Writing. The `Flusher` writes each outbox that has frames at most once per
`coalesce_window_s` (an idle worker writes at once), one `write` per outbox. A write hands
the transport only what fits under its high water mark (`write_buffer_high_bytes`; at least
one frame), and nothing while the transport has paused us: the transport's own buffer stays
small and the backlog stays here, where it is counted and can be dropped. When the transport
resumes (its low water mark) the outbox is written again.

Cap. `limit` = `max_send_buffer_bytes` minus the high water mark: together with the
transport's buffer (at most the high water mark plus one write) what a client has queued
never exceeds `max_send_buffer_bytes` by more than one frame. An empty outbox always takes
one frame. A frame that does not fit makes the client a slow consumer: the backlog is
dropped and the close 1013 is written at once, behind at most the transport's buffer, so
the client sees the code.

Flow control. `drained()` is a future done when the outbox is empty and the transport is
writable again: a history replay waits on it between chunks, so a recovering client gets
its replay as fast as it reads it, and its memory stays bounded, however long the replay.

Closing. `close(code)` (drain, error flood, internal error) writes what is queued first,
then the close frame; after any close nothing more is queued. When the peer closes first,
`flush()` writes what is queued before the protocol writes the close reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker import errors

if TYPE_CHECKING:
    from worker.protocol import WebSocket

log = logging.getLogger("redwire.outbox")


class Outbox:
    """Serialized frames for one client, in order; see the module docstring."""

    __slots__ = (
        "_drained",
        "bytes",
        "closed",
        "dirty",
        "flusher",
        "frames",
        "high_water",
        "limit",
        "on_overflow",
        "variant",
        "ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        flusher: Flusher,
        *,
        max_bytes: int,
        high_water: int,
        on_overflow: Callable[[], None] | None = None,
        variant: tuple[bool, int | None] = (False, None),
    ) -> None:
        self.ws = ws
        self.variant = variant  # which broadcast frames this client takes (see worker.hub)
        self.flusher = flusher
        self.frames: list[bytes] = []
        self.bytes = 0
        self.high_water = high_water
        self.limit = max(max_bytes - high_water, 0)
        self.dirty = False  # in the flusher's list
        self.closed = False  # a close went out (or the connection is gone): queue nothing
        self.on_overflow = on_overflow
        self._drained: asyncio.Future[None] | None = None

    # --- queueing ----------------------------------------------------------------------------

    def push(self, frame: bytes) -> bool:
        """Queue one serialized frame; False (and the client closed 1013) when over the cap."""
        if self.closed:
            return False
        size = len(frame)
        if self.bytes and self.bytes + size > self.limit:
            self.overflow()
            return False
        self.frames.append(frame)
        self.bytes += size
        if not self.dirty:
            self.dirty = True
            self.flusher.add(self)
        return True

    def overflow(self) -> None:
        """Slow consumer: drop the backlog and send close 1013 now."""
        if self.closed:
            return
        self._drop()
        log.info("closing slow consumer (1013): more than its send buffer is queued")
        if self.on_overflow is not None:
            self.on_overflow()
        self.ws.close(errors.CLOSE_TRY_AGAIN_LATER, "slow consumer")

    def close(self, code: int, reason: str = "") -> None:
        """Write what is queued, then the close frame; queue nothing after it."""
        if self.closed:
            return
        frames = self.frames
        if frames:
            self.ws.write_frame(b"".join(frames))
        self._drop()
        self.ws.close(code, reason)

    def flush(self) -> None:
        """Write everything queued now, past the high water mark (the peer sent its close
        frame: our close reply follows what we had queued, and nothing comes after it)."""
        frames = self.frames
        if frames and not self.closed:
            self.ws.write_before_end(b"".join(frames))
            self.frames = []
            self.bytes = 0

    def lost(self) -> None:
        """The connection is gone: forget the backlog."""
        self._drop()

    def _drop(self) -> None:
        self.closed = True
        self.frames = []
        self.bytes = 0
        self._wake()

    # --- writing -----------------------------------------------------------------------------

    def write(self) -> int:
        """Hand the transport what fits under its high water mark; returns bytes written."""
        self.dirty = False
        size = self.bytes
        if not size:  # nothing queued (or closed)
            return 0
        ws = self.ws
        if ws.write_paused:
            return 0  # resume_writing calls `writable`
        frames = self.frames
        room = self.high_water - ws.buffered_bytes()
        if size <= room:  # the usual case: all of it, one write
            ws.write_frame(frames[0] if len(frames) == 1 else b"".join(frames))
            frames.clear()
            self.bytes = 0
            if self._drained is not None and not ws.write_paused:
                self._wake()
            return size
        return self._write_part(ws, frames, room)

    def _write_part(self, ws: WebSocket, frames: list[bytes], room: int) -> int:
        """Write the frames that fit in `room` (at least one); the rest waits its turn."""
        taken = 0
        count = 0
        for frame in frames:
            if count and taken + len(frame) > room:
                break
            taken += len(frame)
            count += 1
        data = b"".join(frames[:count])
        del frames[:count]
        self.bytes -= taken
        ws.write_frame(data)
        if not ws.write_paused:  # under the mark yet not all written: the next window
            self.dirty = True
            self.flusher.add(self)
        return taken

    def writable(self) -> None:
        """The transport drained to its low water mark: write more, or wake a waiting replay."""
        if self.frames:
            if not self.dirty:
                self.dirty = True
                self.flusher.add(self)
        else:
            self._wake()

    # --- flow control ------------------------------------------------------------------------

    def drained(self) -> asyncio.Future[None]:
        """Done when nothing is queued here and the transport takes more (or on close)."""
        future = self._drained
        if future is None or future.done():
            future = self._drained = asyncio.get_running_loop().create_future()
        if self.closed or (not self.frames and not self.ws.write_paused):
            future.set_result(None)
        return future

    def _wake(self) -> None:
        future = self._drained
        if future is not None:
            self._drained = None
            if not future.done():
                future.set_result(None)


class Flusher:
    """The worker's write scheduler: every dirty outbox is written once per window."""

    __slots__ = ("_last", "_loop", "_timer", "bytes_out", "dirty", "window_s")

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        # Outboxes with `dirty` set, to write. The hub's fan-out appends here directly and
        # calls `schedule` once per batch; anything else calls `add`.
        self.dirty: list[Outbox] = []
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_event_loop()
        self.bytes_out = 0

    def add(self, outbox: Outbox) -> None:
        self.dirty.append(outbox)
        if self._timer is None:
            self.schedule()

    def schedule(self, *, now: bool = False) -> None:
        """Make sure a write is coming: a busy worker gathers what arrives within the
        window; an idle one writes on the next loop turn (so one turn's frames go
        together), or at once with `now` (the hub, at the end of a bus batch)."""
        if self._timer is None and self.dirty:
            wait = self._last + self.window_s - self._loop.time()
            if wait <= 0 and now:
                self.flush()
            else:
                self._timer = self._loop.call_later(max(wait, 0.0), self.flush)

    def flush(self) -> None:
        self._timer = None
        self._last = self._loop.time()
        dirty, self.dirty = self.dirty, []
        out = 0
        for outbox in dirty:
            if outbox.dirty:
                try:
                    out += outbox.write()
                except Exception:  # one broken transport must not stop everyone's writes
                    log.exception("writing to a client failed")
                    outbox.ws.abort()
        self.bytes_out += out
