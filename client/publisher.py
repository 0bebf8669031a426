"""Publish from any Python service straight into the bus: no WebSocket hop.

    async with AsyncPublisher("redis://127.0.0.1:6379/0") as pub:
        ack = await pub.publish("prices", {"eur": 1.08})
        acks = await pub.publish_many(("prices", {"eur": p}) for p in prices)

    with Publisher("redis://127.0.0.1:6379/0") as pub:      # blocking, from any thread
        pub.publish("prices", {"eur": 1.08})
        futures = [pub.publish_nowait("ticks", t) for t in ticks]   # batched
        pub.flush()

Messages are the workers' own envelopes on the workers' own channels (the same
`broker.bus` code publishes them), so WebSocket subscribers and `client.subscriber`
consumers get them like any other. Concurrent publishes go out pipelined in batches.
Topic rules (history, offsets) come from the same settings as the broker's
(`REDWIRE_TOPICS`, `REDWIRE_CONFIG`, or `settings=`): a publisher must share them, so its
messages on history topics get offsets too.

Outcomes and retries. A publish is retried automatically, with backoff, for
`retry_timeout_s`, only when that is safe:
- after BusUnavailable (it was never written to Redis: nothing happened);
- after BusOutcomeUnknown (written, no reply: it may have run) only when it has a `key`:
  the retry with the same key lands at most once; when the first attempt had run, the
  result says `duplicate=True` (with the first one's offset/epoch on history topics).
Without a key, BusOutcomeUnknown is raised to the caller: the message may or may not have
been published, and only the caller can decide (pass `key=` to make retries safe; keys work
on every topic). When Redis stays away past `retry_timeout_s`: BusUnavailable (not
published), or BusOutcomeUnknown for a keyed publish whose last attempt was written.
Closing the publisher gives every pending publish an outcome: BusUnavailable for what was
still queued, BusOutcomeUnknown for the chunk being sent. A publish whose future its caller
cancelled before it was sent is not sent.

Bounded buffers. At most `max_pending` publishes (default 10,000) are queued or in flight
per publisher. Past it, `AsyncPublisher.publish` / `publish_many` wait for room,
`Publisher.publish` and `Publisher.publish_nowait` block the calling thread until there is
room, and `AsyncPublisher.enqueue` (which cannot wait) raises PublisherFull.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from broker.bus import Bus, Published, check_key, make_bus
from broker.envelope import ENCODING_JSON, ENCODING_MSGPACK, BusMessage, msgpack_dumps
from broker.errors import BusOutcomeUnknown, BusUnavailable, ClientError
from broker.settings import Settings
from broker.topics import check_topic

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode

DEFAULT_MAX_PENDING = 10_000


class PublisherFull(RuntimeError):
    """`enqueue` past `max_pending`: await `publish` (it waits for room) instead."""


class AsyncPublisher:
    """Publishes in order through one sender task: chunks of `bus_publish_batch` share a
    pipelined round trip; a chunk that fails (Redis away) is retried, the failed suffix in
    its original order, before anything queued after it is sent."""

    def __init__(
        self,
        redis_url: str,
        *,
        settings: Settings | None = None,
        origin: str | None = None,
        encoding: str = "json",
        retry_timeout_s: float = 5.0,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError("encoding must be 'json' or 'msgpack'")
        if type(max_pending) is not int or max_pending < 1:
            raise ValueError("max_pending must be an int >= 1")
        self.max_pending = max_pending
        self._pending = 0  # queued or in flight: futures not done yet
        self._room = asyncio.Event()
        # The broker's own settings (REDWIRE_* / REDWIRE_CONFIG) unless given: the topic
        # rules must be the broker's, or history topics would get messages without offsets.
        self.settings = (settings or Settings.load()).replace(redis_url=redis_url)
        self.origin = origin or f"sdk-{os.getpid()}-{random.getrandbits(32):08x}"
        self.encoding = ENCODING_MSGPACK if encoding == "msgpack" else ENCODING_JSON
        self.retry_timeout_s = retry_timeout_s
        self._bus: Bus | None = None
        self._queue: deque[_Item] = deque()
        self._sending: list[_Item] = []  # the chunk the sender has taken from the queue
        self._wake: asyncio.Event | None = None
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._bus is None:
            self._bus = make_bus(self.settings, origin=self.origin)
            await self._bus.start()
            self._wake = asyncio.Event()
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    async def close(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        # Every caller gets an outcome, none waits forever: what was still queued was never
        # written; the chunk being sent may have been, and its replies will not be read now.
        for _, _, target in self._queue:
            _fail(target, BusUnavailable("the publisher is closed; not published"))
        for _, _, target in self._sending:
            _fail(target, BusOutcomeUnknown("the publisher closed; it may have been published"))
        self._pending = 0  # nothing is queued or in flight now
        self._queue.clear()
        self._sending = []
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.close()

    async def __aenter__(self) -> AsyncPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def encode(self, data: Any) -> bytes:
        try:
            if self.encoding == ENCODING_MSGPACK:
                payload = msgpack_dumps(data)
            else:
                payload = _dumps(data).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ClientError("bad_request", f"data cannot be encoded: {exc}") from None
        if len(payload) > self.settings.max_data_bytes:
            raise ClientError("too_large", f"data over {self.settings.max_data_bytes} bytes")
        return payload

    @property
    def pending(self) -> int:
        """Publishes queued or in flight."""
        return self._pending

    def enqueue(self, topic: str, data: Any, key: str | None = None) -> asyncio.Future[Published]:
        """Queue one publish (in order with every other); the future gets its result.

        PublisherFull when `max_pending` publishes are pending (`publish` waits instead)."""
        if self._pending >= self.max_pending:
            raise PublisherFull(f"{self._pending} publishes pending (max_pending)")
        return self._enqueue(topic, data, key)

    def _enqueue(self, topic: str, data: Any, key: str | None) -> asyncio.Future[Published]:
        future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        self._put(topic, data, key, future)
        return future

    def _put(self, topic: str, data: Any, key: str | None, target: _Target) -> None:
        """Queue one publish whose outcome goes to `target` (an asyncio future, or the
        blocking publisher's concurrent one: no second future per message). It counts as
        pending until the sender settles it, or drops it because its caller gave up."""
        if self._wake is None:
            raise BusUnavailable("the publisher is not started")
        check_topic(topic, self.settings.max_topic_bytes)
        check_key(key)
        message = BusMessage(topic, self.encode(data), self.encoding, self.origin)
        self._pending += 1
        self._queue.append((message, key, target))
        self._wake.set()

    def _released(self) -> None:
        self._pending -= 1
        if self._pending < self.max_pending:
            self._room.set()

    async def _wait_for_room(self) -> None:
        while self._pending >= self.max_pending:
            self._room.clear()
            await self._room.wait()

    async def publish(self, topic: str, data: Any, *, key: str | None = None) -> Published:
        """Publish one message; returns its offset/epoch on topics with history.

        Waits for room past `max_pending`. Retried while safe (see the module docstring);
        raises BusUnavailable (not published) when Redis stayed away for
        `retry_timeout_s`, BusOutcomeUnknown when it may have been published and there is
        no `key` to retry it safely with."""
        if self._bus is None:
            await self.start()
        await self._wait_for_room()
        return await self._enqueue(topic, data, key)

    async def publish_many(
        self, items: Iterable[tuple[str, Any] | tuple[str, Any, str | None]]
    ) -> list[Published]:
        """Publish many at once: (topic, data) or (topic, data, key) items. They share
        pipelined round trips, in the given order; waits for room past `max_pending`."""
        if self._bus is None:
            await self.start()
        futures = []
        for item in items:
            await self._wait_for_room()
            topic, data, *rest = item
            futures.append(self._enqueue(topic, data, rest[0] if rest else None))
        return list(await asyncio.gather(*futures))

    async def _send_loop(self) -> None:
        assert self._wake is not None
        batch = self.settings.bus_publish_batch
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                queue = self._queue
                self._sending = [queue.popleft() for _ in range(min(len(queue), batch))]
                await self._send_chunk(self._sending)
                self._sending = []

    async def _send_chunk(self, chunk: list[_Item]) -> None:
        """Send one chunk until each of its publishes has an outcome: the bus queues them
        all at once (`publish_nowait`, no task per message) and pipelines them; what may be
        retried is sent again, in its original order, with backoff."""
        bus = self._bus
        assert bus is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout_s
        delay = 0.05
        unknown: set[int] = set()  # ids of targets whose last attempt may have run
        while chunk:
            live = []
            for item in chunk:
                if item[2].done():
                    self._released()  # its caller gave up (cancelled): not sent again
                else:
                    live.append(item)
            chunk = live
            if not chunk:
                return
            outcomes = [bus.publish_nowait(message, key=key) for message, key, _ in chunk]
            await asyncio.wait(outcomes)
            retry: list[_Item] = []
            for item, outcome in zip(chunk, outcomes, strict=True):
                target = item[2]
                error = (
                    BusUnavailable("the publish was cancelled")
                    if outcome.cancelled()
                    else outcome.exception()
                )
                if isinstance(error, BusUnavailable):
                    retry.append(item)  # never written: safe to send again, in order
                    continue
                if isinstance(error, BusOutcomeUnknown) and item[1] is not None:
                    unknown.add(id(target))
                    retry.append(item)  # may have run: the same key makes it land once
                    continue
                if error is not None:
                    _fail(target, error)  # BusOutcomeUnknown without a key: the caller's
                else:
                    _succeed(target, outcome.result())
                self._released()
            chunk = retry
            remaining = deadline - loop.time()
            if chunk and remaining <= 0:
                for _, _, target in chunk:
                    if id(target) in unknown:
                        failure: Exception = BusOutcomeUnknown(
                            "Redis did not answer in time; it may have been published "
                            "(retry with the same key)"
                        )
                    else:
                        failure = BusUnavailable("Redis stayed unavailable; not published")
                    _fail(target, failure)
                    self._released()
                return
            if chunk:
                await asyncio.sleep(min(remaining, delay))  # backoff between retries
                delay = min(delay * 2, 1.0)


# Where a publish's outcome goes: both kinds have done/set_result/set_exception.
_Target = "asyncio.Future[Published] | concurrent.futures.Future[Published]"
_Item = tuple[BusMessage, "str | None", _Target]
_INVALID_STATE = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)


def _fail(future: asyncio.Future[Any] | concurrent.futures.Future[Any], exc: BaseException) -> None:
    """Give `future` its error, unless its caller already gave up (cancelled it)."""
    with contextlib.suppress(*_INVALID_STATE):
        if not future.done():
            future.set_exception(exc)


def _succeed(future: asyncio.Future[Any] | concurrent.futures.Future[Any], result: Any) -> None:
    """Give `future` its result (a concurrent one may be cancelled from another thread
    between the check and the set: then the caller gave up, and that is its outcome)."""
    with contextlib.suppress(*_INVALID_STATE):
        if not future.done():
            future.set_result(result)


class Publisher:
    """The blocking publisher: its own event loop on a background thread."""

    def __init__(self, redis_url: str, **kwargs: Any) -> None:
        self._async = AsyncPublisher(redis_url, **kwargs)
        self.max_pending = self._async.max_pending
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="redwire-publisher")  # fmt: skip
        self._thread.start()
        self._outstanding: set[concurrent.futures.Future[Published]] = set()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified as outstanding ones finish
        # publish_nowait hands work to the loop thread in batches: one wake-up per batch.
        self._inbox: list[tuple[str, Any, str | None, concurrent.futures.Future[Published]]] = []
        self._call(self._async.start(), timeout_s=self._async.settings.bus_connect_timeout_s + 5)

    def _call(self, coro: Any, timeout_s: float | None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def publish(
        self, topic: str, data: Any, *, key: str | None = None, timeout_s: float | None = 30.0
    ) -> Published:
        """Publish and wait for Redis to take it (see AsyncPublisher.publish)."""
        return self._call(self._async.publish(topic, data, key=key), timeout_s)

    def publish_nowait(
        self, topic: str, data: Any, *, key: str | None = None
    ) -> concurrent.futures.Future[Published]:
        """Queue a publish and return; batched with the others queued meanwhile.

        Blocks the calling thread while `max_pending` of them are outstanding (not done)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("publish_nowait from the publisher's own loop thread")
        future: concurrent.futures.Future[Published] = concurrent.futures.Future()
        with self._lock:
            while len(self._outstanding) >= self.max_pending:
                if not self._thread.is_alive():
                    raise BusUnavailable("the publisher is closed")
                self._room.wait(1.0)  # woken by _done; the timeout re-checks the thread
            self._outstanding.add(future)
            wake = not self._inbox
            self._inbox.append((topic, data, key, future))
        future.add_done_callback(self._done)
        if wake:
            self._loop.call_soon_threadsafe(self._drain_inbox)
        return future

    def _drain_inbox(self) -> None:
        """On the loop thread: queue what publish_nowait gathered, in order, on the async
        publisher (its sender pipelines them in chunks and settles each caller's future
        itself: no task, and no second future, per message)."""
        with self._lock:
            batch, self._inbox = self._inbox, []
        put = self._async._put
        for topic, data, key, future in batch:
            try:
                put(topic, data, key, future)  # bounded by publish_nowait
            except Exception as exc:
                _fail(future, exc)

    def _done(self, future: concurrent.futures.Future[Published]) -> None:
        with self._lock:
            self._outstanding.discard(future)
            self._room.notify()

    def flush(self, timeout_s: float | None = 30.0) -> None:
        """Wait for every publish_nowait so far; raises the first failure."""
        with self._lock:
            pending = list(self._outstanding)
        done, not_done = concurrent.futures.wait(pending, timeout_s)
        if not_done:
            raise TimeoutError(f"{len(not_done)} publishes still pending after {timeout_s}s")
        for future in done:
            future.result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self.flush()
        finally:
            self._call(self._async.close(), timeout_s=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
