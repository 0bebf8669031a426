"""The Redis bus: one subscriber connection per worker, owned by our own tasks, and a publisher.

Channels. Topic T travels on the Redis channel `channel_prefix + "t:" + T` (T in UTF-8);
each bus has a private probe channel `channel_prefix + "probe:" + origin`. The payload on
a topic channel is `envelope.pack(message)`. URLs: `redis://`, `rediss://`, `unix://`.

Theory of operation.
- Subscriber. Each connection attempt is a *session*: a fresh redis-py `Connection` (RESP2),
  which only connects and parses replies. redis-py's PubSub is not used: it reconnects
  lazily and silently loses what was published meanwhile. A session runs three tasks:
    reader  reads replies; every message already buffered (at most `bus_read_batch`) goes
            to `on_messages` as one list before it yields to the loop;
    sender  turns changes of the wanted channel set into SUBSCRIBE / UNSUBSCRIBE commands
            of at most `bus_resubscribe_batch` channels. Changes made within one loop
            iteration go out together: that is how concurrent `subscribe` calls coalesce;
    prober  when nothing arrived for `bus_probe_interval_s`, publishes a probe on the
            private channel; if it is not back within `bus_probe_timeout_s` (or PUBLISH
            says nobody listens) the subscription is wedged and the session ends.
  A session ends on any connection error, a wedge, or a resubscribe not confirmed within
  `bus_connect_timeout_s`. The bus then reconnects with exponential backoff and jitter
  (`bus_reconnect_min_s` .. `bus_reconnect_max_s`), resubscribes to exactly the wanted set,
  and reports `on_gap(those topics)` once Redis confirmed them all.
- Per-channel bookkeeping in a session: `server` holds channels whose last command sent was
  SUBSCRIBE, `inflight` counts commands sent and not yet confirmed, `dirty` holds channels
  changed since the sender last ran. A channel is *settled* when it is neither dirty nor
  in flight; `subscribe` / `unsubscribe` return when all their channels are settled.
- Publisher. Publishes are queued; one task sends up to `bus_publish_batch` of them as one
  pipeline (one write, replies read in order, no transaction) on its own connection, and
  resolves each caller's future with its command's result. Batches go one at a time, so
  messages leave in publish order. A connection error or `bus_publish_timeout_s` fails the
  batch and everything queued behind it with BusUnavailable; the next batch reconnects.
- `healthy` = the session is live, the last probe (if one is out) is not overdue, and the
  last publish batch worked. Each flip is reported through `on_health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from broker.bus import Bus, Published, StatsValue
from broker.envelope import BusMessage, pack, unpack
from broker.errors import BusError, BusUnavailable, ConfigError, EnvelopeError
from broker.settings import Settings

log = logging.getLogger("redwire.bus")

_IO_ERRORS = (RedisError, OSError)  # asyncio's TimeoutError is the builtin, an OSError
_PUBLISHED = Published()
_MALFORMED_LOG_EVERY_S = 10.0  # log a malformed envelope at most this often (all are counted)
_MAX_BACKOFF_DOUBLINGS = 30


class _SubscriptionWedged(BusError):
    """The probe did not come back: the subscription is silently dead."""


def _client_name(kind: str, origin: str) -> str:
    # CLIENT SETNAME accepts printable ASCII without spaces.
    return re.sub(r"[^!-~]", "_", f"redwire-{kind}:{origin}")[:128]


def connection_factory(
    url: str, client_name: str, connect_timeout_s: float
) -> Callable[[], AbstractConnection]:
    """A function making fresh, unconnected redis-py connections to `url` (RESP2)."""
    try:
        kwargs: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL ({url.split('://', 1)[0]}://...): {exc}") from None
    cls = kwargs.pop("connection_class", Connection)
    kwargs.update(
        protocol=2,  # pub/sub messages as plain arrays, no RESP3 push handling
        socket_timeout=None,  # every wait is bounded by our own asyncio.timeout
        socket_connect_timeout=connect_timeout_s,
        client_name=client_name,
    )
    return lambda: cls(**kwargs)


async def _idle_and_open(conn: AbstractConnection) -> bool:
    """True if `conn` is connected with nothing unread: no EOF, no stray reply."""
    try:
        return conn.is_connected and not await conn.can_read()
    except _IO_ERRORS:
        return False


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _reject(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


# --- publisher -------------------------------------------------------------------------------


class _Publisher:
    """A queue of PUBLISH commands flushed as pipelines over one connection, in order."""

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        settings: Settings,
        on_change: Callable[[], None],
    ) -> None:
        self._connect = connect
        self._batch = settings.bus_publish_batch
        self._timeout_s = settings.bus_publish_timeout_s
        self._on_change = on_change
        self._conn: AbstractConnection | None = None
        self._queue: deque[tuple[bytes, bytes, asyncio.Future[int]]] = deque()
        self._sending: list[tuple[bytes, bytes, asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.ok = True  # the last batch worked (or none was sent yet)
        self.batches = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bus-publisher")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(BusUnavailable("the bus is closed"))
        await self._drop_connection()

    def send(self, channel: bytes, data: bytes) -> asyncio.Future[int]:
        """Queue one PUBLISH; the future gets Redis' receiver count, or a BusError."""
        if self._task is None:
            raise BusUnavailable("the bus is not running")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((channel, data, future))
        self._wake.set()
        return future

    async def _run(self) -> None:
        queue = self._queue
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                self._sending = [queue.popleft() for _ in range(min(len(queue), self._batch))]
                await self._flush(self._sending)
                self._sending = []

    async def _flush(self, batch: list[tuple[bytes, bytes, asyncio.Future[int]]]) -> None:
        self.batches += 1
        answered = 0
        try:
            async with asyncio.timeout(self._timeout_s):
                conn = self._conn
                if conn is not None and not await _idle_and_open(conn):
                    await self._drop_connection()  # e.g. Redis restarted since the last batch
                    conn = None
                if conn is None:
                    conn = self._conn = self._connect()
                    await conn.connect()
                commands = [(b"PUBLISH", channel, data) for channel, data, _ in batch]
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                for _, _, future in batch:
                    try:
                        result = await conn.read_response(disable_decoding=True, timeout=math.inf)
                    except ResponseError as exc:  # this command failed; the pipeline goes on
                        _reject(future, BusError(f"Redis refused PUBLISH: {exc}"))
                    else:
                        _resolve(future, result)
                    answered += 1
        except _IO_ERRORS as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            error = BusUnavailable(f"Redis publish failed: {reason or type(exc).__name__}")
            for _, _, future in batch[answered:]:
                _reject(future, error)
            self._fail_all(error)  # queued during the outage: refuse rather than pile up
            await self._drop_connection()
            self._set_ok(False)
        else:
            self._set_ok(True)

    def _fail_all(self, error: BusError) -> None:
        for _, _, future in self._sending:
            _reject(future, error)
        while self._queue:
            _reject(self._queue.popleft()[2], error)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*_IO_ERRORS):
                await conn.disconnect(nowait=True)

    def _set_ok(self, ok: bool) -> None:
        if ok != self.ok:
            self.ok = ok
            self._on_change()


# --- subscriber session ----------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Waiter:
    future: asyncio.Future[None]
    remaining: int
    subscribing: bool  # a lost connection fails it (unsubscribing: the channel is gone anyway)


class _Session:
    """One subscriber connection and what was asked of it; see the module docstring."""

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.live = False  # the initial (re)subscribe was confirmed
        self.server: set[bytes] = set()
        self.confirmed: set[bytes] = set()
        self.inflight: dict[bytes, int] = {}
        self.dirty: set[bytes] = set()
        self.waiters: dict[bytes, list[_Waiter]] = {}
        self.wake = asyncio.Event()

    def touch(self, channels: Iterable[bytes]) -> None:
        self.dirty.update(channels)
        self.wake.set()

    def wait(self, channels: Iterable[bytes], *, subscribing: bool) -> asyncio.Future[None]:
        """A future done when every one of `channels` is settled."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = {ch for ch in channels if ch in self.dirty or ch in self.inflight}
        if not pending:
            future.set_result(None)
            return future
        waiter = _Waiter(future, len(pending), subscribing)
        for ch in pending:
            self.waiters.setdefault(ch, []).append(waiter)
        return future

    def reconcile(self, wanted: Callable[[bytes], bool], batch: int) -> list[tuple[bytes, ...]]:
        """The commands that make Redis' channel set match `wanted` for the dirty channels."""
        dirty, self.dirty = self.dirty, set()
        server, inflight = self.server, self.inflight
        sub = [ch for ch in dirty if ch not in server and wanted(ch)]
        unsub = [ch for ch in dirty if ch in server and not wanted(ch)]
        server.update(sub)
        server.difference_update(unsub)
        for ch in (*sub, *unsub):
            inflight[ch] = inflight.get(ch, 0) + 1
        for ch in dirty:
            if ch not in inflight:
                self._settle(ch)
        return [
            (verb, *channels[i : i + batch])
            for verb, channels in ((b"SUBSCRIBE", sub), (b"UNSUBSCRIBE", unsub))
            for i in range(0, len(channels), batch)
        ]

    def confirmed_by_redis(self, kind: bytes, channel: bytes) -> None:
        if kind == b"subscribe":
            self.confirmed.add(channel)
        else:
            self.confirmed.discard(channel)
        left = self.inflight.get(channel, 0) - 1
        if left > 0:
            self.inflight[channel] = left
            return
        self.inflight.pop(channel, None)
        if channel not in self.dirty:
            self._settle(channel)

    def _settle(self, channel: bytes) -> None:
        for waiter in self.waiters.pop(channel, ()):
            waiter.remaining -= 1
            if waiter.remaining == 0:
                _resolve(waiter.future, None)

    def end(self, error: BusError) -> None:
        """The connection is gone: subscribers waiting get `error`, unsubscribers are done."""
        for waiters in self.waiters.values():
            for waiter in waiters:
                if waiter.subscribing:
                    _reject(waiter.future, error)
                else:
                    _resolve(waiter.future, None)
        self.waiters.clear()


# --- the bus ---------------------------------------------------------------------------------


class RedisBus(Bus):
    def __init__(self, url: str, settings: Settings, origin: str) -> None:
        super().__init__()
        self.settings = settings
        self.origin = origin
        timeout = settings.bus_connect_timeout_s
        self._new_connection = connection_factory(url, _client_name("sub", origin), timeout)
        self._publisher = _Publisher(
            connection_factory(url, _client_name("pub", origin), timeout),
            settings,
            self._update_health,
        )
        prefix = settings.channel_prefix.encode()
        self._topic_prefix = prefix + b"t:"
        self.probe_channel = prefix + b"probe:" + origin.encode()
        self._topics: dict[bytes, str] = {}  # the wanted set: channel -> topic
        self._session: _Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._reported_healthy = False
        self._last_rx = 0.0  # time.monotonic() of the last reply from the subscription
        self._last_probe_at = 0.0
        self._probe_sent_at: float | None = None
        self._probe_nonce = b""
        self._probe_back: asyncio.Future[None] | None = None
        self._malformed_logged_at = -math.inf
        self._live_sessions = 0
        # counters
        self.reconnects = 0
        self.connect_failures = 0
        self.gaps = 0
        self.messages_in = 0
        self.malformed = 0
        self.published = 0
        self.publish_errors = 0
        self.subscribe_commands = 0
        self.probes = 0
        self.probe_timeouts = 0
        self.last_probe_rtt_s = 0.0

    def channel(self, topic: str) -> bytes:
        """The Redis channel carrying `topic`."""
        return self._topic_prefix + topic.encode()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._publisher.start()
        self._started = started = loop.create_future()
        self._task = task = loop.create_task(self._run(), name=f"bus-subscriber-{self.origin}")
        await asyncio.wait((started, task), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # a bug ended the subscriber task: say so now

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._publisher.close()
        self._update_health()

    async def _run(self) -> None:
        failures = 0
        while True:
            went_live = await self._session_once(failures)
            if self._started is not None:
                _resolve(self._started, None)
            failures = 0 if went_live else failures + 1
            s = self.settings
            cap = s.bus_reconnect_min_s * 2 ** min(failures, _MAX_BACKOFF_DOUBLINGS)
            await asyncio.sleep(
                random.uniform(s.bus_reconnect_min_s, min(cap, s.bus_reconnect_max_s))
            )

    async def _session_once(self, failures: int) -> bool:
        """One subscriber connection, from connect to loss. True if it went live."""
        s = _Session(self._new_connection())
        tasks: list[asyncio.Task[None]] = []
        ready: asyncio.Future[None] | None = None
        try:
            async with asyncio.timeout(self.settings.bus_connect_timeout_s):
                await s.conn.connect()
            self._session = s
            channels = [*self._topics, self.probe_channel]
            s.touch(channels)
            ready = s.wait(channels, subscribing=True)
            loop = asyncio.get_running_loop()
            tasks.append(loop.create_task(self._read_loop(s), name="bus-reader"))
            tasks.append(loop.create_task(self._send_loop(s), name="bus-sender"))
            done, _ = await asyncio.wait(
                (ready, *tasks),
                timeout=self.settings.bus_connect_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in tasks:
                if task in done:
                    task.result()
            if not ready.done():
                raise TimeoutError(f"{len(channels)} channels not confirmed in time")
            self._went_live(s, channels)
            tasks.append(loop.create_task(self._probe_loop(s), name="bus-prober"))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise RedisConnectionError("subscriber task ended")  # they only end by raising
        except _SubscriptionWedged as exc:
            self.probe_timeouts += 1
            log.warning("bus: subscription wedged (%s); reconnecting", exc)
        except _IO_ERRORS as exc:
            self._log_loss(s.live, failures, exc)
        except Exception:
            log.exception("bus: subscriber failed; reconnecting")
        finally:
            await self._end_session(s, tasks, ready)
        return s.live

    def _log_loss(self, was_live: bool, failures: int, exc: BaseException) -> None:
        if not was_live:
            self.connect_failures += 1
        reason = str(exc) or type(exc).__name__
        if was_live:
            log.warning("bus: subscriber connection lost (%s); reconnecting", reason)
        elif failures == 0:
            log.warning("bus: cannot connect to Redis (%s); retrying", reason)
        else:
            log.debug("bus: connect attempt %d failed: %s", failures + 1, reason)

    async def _end_session(
        self, s: _Session, tasks: list[asyncio.Task[None]], ready: asyncio.Future[None] | None
    ) -> None:
        if self._session is s:
            self._session = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        s.end(BusUnavailable("the Redis subscription was lost; it is being re-established"))
        if ready is not None and ready.done() and not ready.cancelled():
            ready.exception()  # retrieved: the session ending is reported above
        self._probe_sent_at = None
        with contextlib.suppress(*_IO_ERRORS):
            await s.conn.disconnect(nowait=True)
        self._update_health()

    def _went_live(self, s: _Session, channels: list[bytes]) -> None:
        s.live = True
        self._last_rx = self._last_probe_at = time.monotonic()
        if self._live_sessions:
            self.reconnects += 1
            log.info("bus: subscription live again (%d topics)", len(channels) - 1)
        self._live_sessions += 1
        if self._started is not None:
            _resolve(self._started, None)
        gap = frozenset(self._topics[ch] for ch in channels if ch in self._topics)
        if gap:
            self.gaps += 1
            self._call(self.on_gap, gap)
        self._update_health()

    # --- session tasks ---------------------------------------------------------------------

    async def _read_loop(self, s: _Session) -> None:
        read = s.conn.read_response
        can_read = s.conn.can_read
        topics = self._topics
        probe_channel = self.probe_channel
        limit = self.settings.bus_read_batch
        forever = math.inf
        while True:
            reply = await read(disable_decoding=True, timeout=forever)
            self._last_rx = time.monotonic()
            batch: list[BusMessage] = []
            count = 0
            while True:
                count += 1
                if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                    channel = reply[1]
                    topic = topics.get(channel)
                    if topic is not None:
                        try:
                            message = unpack(reply[2])
                        except EnvelopeError as exc:
                            self._skip_malformed(channel, exc)
                        else:
                            if message.topic == topic:
                                batch.append(message)
                            else:
                                self._skip_malformed(channel, "envelope of another topic")
                    elif channel == probe_channel:
                        self._probe_arrived(reply[2])
                else:
                    self._control(s, reply)
                if count >= limit or not await can_read():
                    break
                reply = await read(disable_decoding=True, timeout=forever)
            if batch:
                self.messages_in += len(batch)
                self._call(self.on_messages, batch)
            if count >= limit:
                await asyncio.sleep(0)  # a backlog: let the hub's writes run

    def _control(self, s: _Session, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3 and reply[0] in (b"subscribe", b"unsubscribe"):
            s.confirmed_by_redis(reply[0], reply[1])
        elif not (type(reply) is list and reply and reply[0] == b"pong"):
            log.warning("bus: unexpected reply on the subscriber connection: %.200r", reply)

    async def _send_loop(self, s: _Session) -> None:
        batch = self.settings.bus_resubscribe_batch
        while True:
            await s.wake.wait()
            s.wake.clear()
            commands = s.reconcile(self._wanted, batch)
            if not commands:
                continue
            if not s.conn.is_connected:  # never let redis-py reconnect behind our back
                raise RedisConnectionError("subscriber connection closed")
            self.subscribe_commands += sum(1 for c in commands if c[0] == b"SUBSCRIBE")
            await s.conn.send_packed_command(s.conn.pack_commands(commands), check_health=False)

    def _wanted(self, channel: bytes) -> bool:
        return channel in self._topics or channel == self.probe_channel

    async def _probe_loop(self, s: _Session) -> None:
        interval = self.settings.bus_probe_interval_s
        while True:
            if self._publisher.ok:
                due = max(self._last_rx, self._last_probe_at) + interval
            else:  # retry the publisher every interval, even while messages flow in
                due = self._last_probe_at + interval
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self._probe()

    async def _probe(self) -> None:
        timeout = self.settings.bus_probe_timeout_s
        self.probes += 1
        self._probe_nonce = b"%d" % self.probes
        self._probe_back = back = asyncio.get_running_loop().create_future()
        self._probe_sent_at = sent_at = self._last_probe_at = time.monotonic()
        try:
            try:
                receivers = await self._publisher.send(self.probe_channel, self._probe_nonce)
            except BusError as exc:  # the publisher's trouble; `healthy` reflects it
                log.debug("bus: probe not sent: %s", exc)
                return
            if receivers == 0:
                raise _SubscriptionWedged("Redis has no subscriber on our probe channel")
            try:
                async with asyncio.timeout(max(0.0, sent_at + timeout - time.monotonic())):
                    await back
            except TimeoutError:
                raise _SubscriptionWedged(f"probe not back within {timeout}s") from None
        finally:
            self._probe_sent_at = None
            self._probe_back = None

    def _probe_arrived(self, data: bytes) -> None:
        back, sent_at = self._probe_back, self._probe_sent_at
        if back is not None and sent_at is not None and data == self._probe_nonce:
            self.last_probe_rtt_s = time.monotonic() - sent_at
            _resolve(back, None)

    # --- the interface ---------------------------------------------------------------------

    async def subscribe(self, topics: Collection[str]) -> None:
        if self._task is None:
            raise BusUnavailable("the bus is not running")
        channels = []
        for topic in topics:
            channel = self.channel(topic)
            self._topics[channel] = topic
            channels.append(channel)
        s = self._session
        if s is None:
            raise BusUnavailable("not connected to Redis; subscribing when it is back")
        s.touch([ch for ch in channels if ch not in s.server])
        await s.wait(channels, subscribing=True)

    async def unsubscribe(self, topics: Collection[str]) -> None:
        channels = [self.channel(topic) for topic in topics]
        for channel in channels:
            self._topics.pop(channel, None)
        s = self._session
        if s is None:
            return
        s.touch([ch for ch in channels if ch in s.server])
        await s.wait(channels, subscribing=False)

    async def publish(self, message: BusMessage) -> Published:
        data = pack(message)
        try:
            await self._publisher.send(self.channel(message.topic), data)
        except BusError:
            self.publish_errors += 1
            raise
        self.published += 1
        return _PUBLISHED

    @property
    def healthy(self) -> bool:
        s = self._session
        if s is None or not s.live or not self._publisher.ok:
            return False
        sent_at = self._probe_sent_at
        return sent_at is None or time.monotonic() - sent_at <= self.settings.bus_probe_timeout_s

    def stats(self) -> dict[str, StatsValue]:
        s = self._session
        subscribed = 0
        if s is not None:
            subscribed = len(s.confirmed) - (self.probe_channel in s.confirmed)
        return {
            "healthy": self.healthy,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "gaps": self.gaps,
            "messages_in": self.messages_in,
            "malformed": self.malformed,
            "published": self.published,
            "publish_batches": self._publisher.batches,
            "publish_errors": self.publish_errors,
            "subscribe_commands": self.subscribe_commands,
            "subscribed_channels": subscribed,
            "wanted_topics": len(self._topics),
            "probes": self.probes,
            "probe_timeouts": self.probe_timeouts,
            "last_probe_rtt_s": self.last_probe_rtt_s,
        }

    # --- helpers ---------------------------------------------------------------------------

    def _update_health(self) -> None:
        healthy = self.healthy
        if healthy != self._reported_healthy:
            self._reported_healthy = healthy
            self._call(self.on_health, healthy)

    def _skip_malformed(self, channel: bytes, why: object) -> None:
        self.malformed += 1
        now = time.monotonic()
        if now - self._malformed_logged_at >= _MALFORMED_LOG_EVERY_S:
            self._malformed_logged_at = now
            log.warning(
                "bus: skipped a malformed envelope on %r (%s); %d so far",
                channel,
                why,
                self.malformed,
            )

    @staticmethod
    def _call(callback: Callable[[Any], None], arg: Any) -> None:
        try:
            callback(arg)
        except Exception:
            log.exception("bus: callback %r failed", callback)
