"""RedisBus' subscriber-session bookkeeping (`_Session`), pure: no Redis, no I/O.

The session is fed what the bus would do (touch channels, reconcile into commands) and what
Redis would answer (`confirmed_by_redis`), and the tests check the commands it asks for and
when each `wait` future settles. `wanted` stands for the bus' routing map (`topics`).
"""

from __future__ import annotations

import asyncio

import pytest

from broker.bus.redis import _Session
from broker.errors import BusUnavailable

SUB, UNSUB = b"SUBSCRIBE", b"UNSUBSCRIBE"


class Fake:
    """A session with the bus' side: `subscribe`/`unsubscribe` as RedisBus does them."""

    def __init__(self) -> None:
        self.s = _Session(None)
        self.wanted: set[bytes] = set()

    def subscribe(self, *channels: bytes) -> asyncio.Future[None]:
        self.wanted.update(channels)
        self.s.touch([ch for ch in channels if ch not in self.s.server])
        return self.s.wait(channels, subscribing=True)

    def unsubscribe(self, *channels: bytes) -> asyncio.Future[None]:
        self.wanted.difference_update(channels)
        self.s.touch([ch for ch in channels if ch in self.s.server])
        return self.s.wait(channels, subscribing=False)

    def subscribed(self, *channels: bytes) -> None:
        """Subscribe and let Redis confirm it."""
        self.subscribe(*channels)
        self.confirm(self.reconcile())

    def reconcile(self, batch: int = 500) -> list[tuple[bytes, ...]]:
        return self.s.reconcile(lambda ch: ch in self.wanted, batch)

    def confirm(self, commands: list[tuple[bytes, ...]]) -> None:
        """Redis answers every command: one confirmation per channel, in order."""
        for verb, *channels in commands:
            for ch in channels:
                self.s.confirmed_by_redis(verb == SUB, ch)


async def test_subscribe_settles_when_redis_confirms() -> None:
    f = Fake()
    waiting = f.subscribe(b"a", b"b")
    assert f.s.dirty == {b"a", b"b"} and f.s.wake.is_set() and not waiting.done()
    commands = f.reconcile()
    assert [(c[0], set(c[1:])) for c in commands] == [(SUB, {b"a", b"b"})]
    assert f.s.inflight == {b"a": 1, b"b": 1} and f.s.server == {b"a", b"b"}
    f.s.confirmed_by_redis(True, b"a")
    assert not waiting.done()  # b is still in flight
    f.s.confirmed_by_redis(True, b"b")
    assert waiting.done() and waiting.result() is None
    assert f.s.confirmed == {b"a", b"b"} and f.s.inflight == {} and f.s.waiters == {}


async def test_an_already_settled_channel_needs_no_command() -> None:
    f = Fake()
    f.subscribed(b"a")
    again = f.subscribe(b"a")
    assert again.done() and f.reconcile() == []


async def test_double_subscribe_is_one_command_and_settles_both() -> None:
    f = Fake()
    first, second = f.subscribe(b"a"), f.subscribe(b"a")
    commands = f.reconcile()
    assert commands == [(SUB, b"a")]
    third = f.subscribe(b"a")  # while in flight: waits for the same confirmation
    assert f.reconcile() == [] and not third.done()
    f.confirm(commands)
    assert first.done() and second.done() and third.done()


async def test_subscribe_then_unsubscribe_before_the_command_sends_nothing() -> None:
    f = Fake()
    subscribing = f.subscribe(b"a")
    f.wanted.discard(b"a")  # unsubscribe in the same loop iteration: not on the server yet
    unsubscribing = f.s.wait([b"a"], subscribing=False)
    assert f.reconcile() == []
    assert subscribing.done() and unsubscribing.done()
    assert f.s.server == set() and f.s.inflight == {}


async def test_unsubscribe_while_the_subscribe_is_in_flight() -> None:
    f = Fake()
    subscribing = f.subscribe(b"a")
    sub = f.reconcile()
    unsubscribing = f.unsubscribe(b"a")
    unsub = f.reconcile()
    assert sub == [(SUB, b"a")] and unsub == [(UNSUB, b"a")]
    assert f.s.inflight == {b"a": 2} and f.s.server == set()
    f.confirm(sub)
    assert not subscribing.done() and not unsubscribing.done()  # one command still out
    assert f.s.confirmed == {b"a"}
    f.confirm(unsub)
    assert subscribing.done() and unsubscribing.done()
    assert f.s.confirmed == set() and f.s.inflight == {}


async def test_unsubscribe_then_subscribe_again_while_in_flight() -> None:
    f = Fake()
    f.subscribed(b"a")
    unsubscribing = f.unsubscribe(b"a")
    unsub = f.reconcile()
    subscribing = f.subscribe(b"a")
    sub = f.reconcile()
    assert unsub == [(UNSUB, b"a")] and sub == [(SUB, b"a")]
    f.confirm(unsub)
    assert not subscribing.done()
    f.confirm(sub)
    assert subscribing.done() and unsubscribing.done() and f.s.confirmed == {b"a"}


async def test_unsubscribe_of_what_is_not_subscribed_settles_at_once() -> None:
    f = Fake()
    waiting = f.unsubscribe(b"never")
    assert waiting.done() and f.reconcile() == []


async def test_commands_are_batched() -> None:
    f = Fake()
    channels = [b"c%d" % i for i in range(250)]
    waiting = f.subscribe(*channels)
    commands = f.reconcile(batch=100)
    assert [c[0] for c in commands] == [SUB, SUB, SUB]
    assert [len(c) - 1 for c in commands] == [100, 100, 50]
    assert sorted(ch for c in commands for ch in c[1:]) == sorted(channels)
    f.confirm(commands[:2])
    assert not waiting.done()
    f.confirm(commands[2:])
    assert waiting.done()
    unsubscribing = f.unsubscribe(*channels[:150])
    unsub = f.reconcile(batch=100)
    assert [(c[0], len(c) - 1) for c in unsub] == [(UNSUB, 100), (UNSUB, 50)]
    f.confirm(unsub)
    assert unsubscribing.done() and len(f.s.confirmed) == 100


async def test_end_fails_subscribers_and_resolves_unsubscribers() -> None:
    f = Fake()
    f.subscribed(b"old")
    subscribing = f.subscribe(b"new")
    unsubscribing = f.unsubscribe(b"old")
    f.reconcile()  # both in flight; the connection goes before Redis answers
    f.s.end(BusUnavailable("lost"))
    assert unsubscribing.done() and unsubscribing.result() is None
    with pytest.raises(BusUnavailable, match="lost"):
        subscribing.result()
    assert f.s.waiters == {}


async def test_end_fails_a_subscribe_not_even_sent() -> None:
    f = Fake()
    subscribing = f.subscribe(b"a")  # dirty, the sender never ran
    f.s.end(BusUnavailable("lost"))
    assert isinstance(subscribing.exception(), BusUnavailable)


async def test_a_waiter_on_several_channels_settles_once_all_are() -> None:
    f = Fake()
    f.subscribed(b"a")
    waiting = f.subscribe(b"a", b"b", b"c")  # a is settled already
    commands = f.reconcile()
    assert [(c[0], set(c[1:])) for c in commands] == [(SUB, {b"b", b"c"})]
    f.s.confirmed_by_redis(True, b"c")
    assert not waiting.done()
    f.s.confirmed_by_redis(True, b"b")
    assert waiting.done()
