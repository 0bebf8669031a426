"""worker.outbox: order, the write budget, the cap (1013 at once), flow control, closing."""

from __future__ import annotations

import asyncio

import pytest

from broker import errors
from worker.outbox import Flusher, Outbox


class FakeWS:
    """What an outbox needs of worker.protocol.WebSocket, recording what it is given."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.write_paused = False
        self.buffer = 0  # what the transport would still hold
        self.closed: tuple[int, str] | None = None
        self.aborted = False

    def buffered_bytes(self) -> int:
        return self.buffer

    def write_frame(self, data: bytes) -> None:
        assert self.closed is None, "nothing is written after the close frame"
        self.written.append(data)

    def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.aborted = True


def make(max_bytes: int = 1000, high_water: int = 100) -> tuple[Outbox, FakeWS, Flusher]:
    flusher = Flusher(0.0)
    ws = FakeWS()
    return Outbox(ws, flusher, max_bytes=max_bytes, high_water=high_water), ws, flusher


async def test_frames_leave_in_order_in_one_write() -> None:
    outbox, ws, flusher = make()
    for frame in (b"a", b"bb", b"ccc"):
        assert outbox.push(frame)
    assert ws.written == []  # nothing before the flusher runs
    flusher.flush()
    assert ws.written == [b"abbccc"]
    assert outbox.bytes == 0 and not outbox.frames


async def test_the_flusher_runs_by_itself() -> None:
    outbox, ws, _ = make()
    outbox.push(b"x")
    await asyncio.sleep(0.01)  # the flusher's timer (window 0): one loop turn or two
    assert ws.written == [b"x"]


async def test_a_write_hands_over_only_what_fits_under_the_high_water_mark() -> None:
    outbox, ws, flusher = make(max_bytes=10_000, high_water=100)
    for _ in range(5):
        outbox.push(b"x" * 40)
    ws.buffer = 10
    flusher.flush()
    assert ws.written == [b"x" * 80]  # 90 bytes of room: two frames
    assert outbox.bytes == 120
    ws.buffer = 95  # less room than one frame: still one frame, never zero
    flusher.flush()
    assert ws.written[-1] == b"x" * 40


async def test_nothing_is_written_while_the_transport_is_paused() -> None:
    outbox, ws, flusher = make()
    outbox.push(b"abc")
    ws.write_paused = True
    flusher.flush()
    assert ws.written == []
    ws.write_paused = False
    outbox.writable()
    flusher.flush()
    assert ws.written == [b"abc"]


async def test_over_the_cap_the_backlog_is_dropped_and_1013_goes_out_at_once() -> None:
    outbox, ws, _ = make(max_bytes=300, high_water=100)  # 200 bytes may wait here
    overflowed = []
    outbox.on_overflow = lambda: overflowed.append(True)
    assert outbox.push(b"x" * 150)
    assert outbox.push(b"y" * 50)
    assert not outbox.push(b"z")  # 201 > 200
    assert ws.closed == (errors.CLOSE_TRY_AGAIN_LATER, "slow consumer")
    assert ws.written == []  # the backlog was dropped, not written before the close
    assert overflowed == [True]
    assert outbox.closed and outbox.bytes == 0
    assert not outbox.push(b"more")  # nothing after the close


async def test_an_empty_outbox_takes_one_frame_even_over_the_cap() -> None:
    outbox, ws, flusher = make(max_bytes=50, high_water=100)
    assert outbox.push(b"x" * 500)
    flusher.flush()
    assert ws.written == [b"x" * 500] and ws.closed is None


async def test_close_writes_what_is_queued_then_the_close_frame() -> None:
    outbox, ws, _ = make()
    outbox.push(b"ack")
    outbox.push(b"msg")
    outbox.close(1001, "going away")
    assert ws.written == [b"ackmsg"] and ws.closed == (1001, "going away")
    assert not outbox.push(b"late")


async def test_drained_waits_for_the_outbox_to_empty_and_the_transport_to_resume() -> None:
    outbox, ws, flusher = make()
    assert outbox.drained().done()  # nothing queued
    outbox.push(b"abc")
    waiter = outbox.drained()
    assert not waiter.done()
    ws.write_paused = True
    flusher.flush()
    assert not waiter.done()
    ws.write_paused = False
    outbox.writable()
    flusher.flush()
    assert waiter.done()
    ws.write_paused = True
    paused = outbox.drained()
    assert not paused.done()  # empty, but the transport is paused
    ws.write_paused = False
    outbox.writable()
    assert paused.done()


async def test_drained_is_done_when_the_connection_is_lost() -> None:
    outbox, _, _ = make()
    outbox.push(b"abc")
    waiter = outbox.drained()
    outbox.lost()
    assert waiter.done()


async def test_a_failing_write_aborts_that_client_only() -> None:
    flusher = Flusher(0.0)
    good, bad = FakeWS(), FakeWS()

    def boom(data: bytes) -> None:
        raise RuntimeError("broken transport")

    bad.write_frame = boom  # type: ignore[method-assign]
    first = Outbox(bad, flusher, max_bytes=1000, high_water=100)
    second = Outbox(good, flusher, max_bytes=1000, high_water=100)
    first.push(b"a")
    second.push(b"b")
    flusher.flush()
    assert bad.aborted and good.written == [b"b"]


@pytest.mark.parametrize("high_water", [0, 64, 10_000])
async def test_queued_bytes_never_exceed_the_cap_by_more_than_one_frame(high_water: int) -> None:
    cap = 1000
    outbox, ws, _ = make(max_bytes=cap, high_water=high_water)
    ws.write_paused = True  # a client that reads nothing
    frame = b"f" * 90
    pushed = 0
    while outbox.push(frame):
        pushed += 1
        assert outbox.bytes + ws.buffer <= cap + len(frame)
    assert ws.closed is not None and ws.closed[0] == errors.CLOSE_TRY_AGAIN_LATER
    assert pushed >= 1
