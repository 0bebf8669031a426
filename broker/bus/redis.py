"""The Redis bus: one subscriber connection per worker, owned by our own tasks, and a publisher.

Channels. Topic T travels on the Redis channel `channel_prefix + "t:" + T` (T in UTF-8);
each bus has a private probe channel `channel_prefix + "probe:" + origin + ":" + instance`
(the bus' random id: worker 0 of every replica has the same origin). The payload on
a topic channel is `envelope.pack(message)`. URLs: `redis://`, `rediss://`, `unix://`.

Theory of operation.
- Wire. redis-py only connects (and packs commands): once a connection is up, its transport
  is taken over by a `RespWire` (broker/bus/redis_wire.py), which parses each read with hiredis
  and hands the whole replies to us inside `data_received`, with no await per reply.
- Subscriber. Each connection attempt is a *session*: a fresh redis-py `Connection` (RESP2)
  and its wire. redis-py's PubSub is not used: it reconnects lazily and silently loses what
  was published meanwhile. A session has a reader and two tasks:
    reader  the wire: the messages of each read (in lists of at most `bus_read_batch`) go
            to `on_messages` as they are parsed; its `closed` ends the session;
    sender  turns changes of the session's channel set into SUBSCRIBE / UNSUBSCRIBE
            commands of at most `bus_resubscribe_batch` channels. Changes made within one
            loop iteration go out together: that is how concurrent `subscribe` calls
            coalesce;
    prober  when nothing arrived for `bus_probe_interval_s`, publishes a probe on the
            private channel; if it is not back within `bus_probe_timeout_s` of the last
            reply read (or PUBLISH says nobody listens) the subscription is wedged and the
            session ends. A subscription still delivering, but behind (the probe queued
            after seconds of backlog), is alive: replies read keep pushing the deadline.
  A session ends on any connection error, a wedge, or a resubscribe not confirmed within
  `bus_connect_timeout_s`. The bus then reconnects with exponential backoff and jitter
  (`bus_reconnect_min_s` .. `bus_reconnect_max_s`), subscribes exactly the owner's
  `wanted_topics()` (the bus keeps no wanted set of its own), and reports `on_gap` for
  each of those topics as Redis confirms it, from the reader, before any message of the
  new subscription: a subscriber learns of the break before it sees what came after it.
- Per-channel bookkeeping in a session (`_Session`, pure): `topics` maps the channels asked
  of this session to their topics (only those are routed to `on_messages`; `subscribe`
  adds, `unsubscribe` removes at once), `server` holds channels whose last command sent was
  SUBSCRIBE, `inflight` counts commands sent and not yet confirmed, `dirty` holds channels
  changed since the sender last ran. A channel is *settled* when it is neither dirty nor
  in flight; `subscribe` / `unsubscribe` return when all their channels are settled. When
  the session ends, waiting subscribes fail with BusUnavailable and the next session
  starts from `wanted_topics()` again: a failed subscribe leaves nothing behind.
- Publisher. Publishes are queued and sent, up to `bus_publish_batch` at a time, as one
  pipeline (one write, no transaction) on its own connection. A task connects and sends
  the first batch; once a batch worked on a live connection, the next ones are written from
  callbacks (the *fast path*: the commands queued in one loop turn go together, and the last
  reply of a batch writes the next at once; one timer per `bus_publish_timeout_s` bounds
  the batch being read), until a failure or a NOSCRIPT hands the queue back to the task.
  Commands are packed by `redis_wire.pack_commands` (hiredis'). The wire settles each
  caller's future with its command's reply as the replies are read, in order, and a reply
  when no batch is waiting for one (Redis restarted, a stray byte) drops the connection.
  Batches go one at a time, so messages leave in publish order. A connection error or
  `bus_publish_timeout_s` fails the batch: before its write started, with BusUnavailable;
  after, each command whose reply did not come with BusOutcomeUnknown (those answered keep
  their results); everything queued behind it with BusUnavailable (never sent). The next
  batch reconnects. Commands whose caller gave up (future cancelled) before their batch
  was written are dropped. Any other exception fails only its batch (logged) and the loop
  goes on; each caller's wait is bounded anyway (publish timeout + connect timeout + 1 s).
  `publish_nowait` (what `publish` awaits, and what the worker calls per client publish)
  queues its command at once and returns the command's future, the reply mapped to a
  `Published` when it comes: no task per message, and publishes enter the queue in call
  order. Its `settled` callback is called as the reply is read, a loop turn before the
  future's done callbacks: the worker's ack, and the end of its publishes-in-flight hold,
  come that much sooner.
- `healthy` = the session is live, the last probe (if one is out) is not overdue, and the
  last publish batch worked. Each flip is reported through `on_health`.
- Scripts. History and presence commands are Lua scripts (`broker/bus/lua.py`) queued on
  the publisher like PUBLISH, so everything a bus sends leaves in call order, batched. They
  go as EVALSHA; on NOSCRIPT (SCRIPT FLUSH, a restart, a failover) the publisher loads every
  script and sends the refused commands again, in order, before the next batch. Each script
  gets two values about the server as ARGV[1] and ARGV[2] (see broker/bus/lua.py), from
  INFO replication and INFO persistence fetched on every (re)connection of the publisher,
  filled in when the batch is written. A keyed publish on a topic without history is a
  script too (SET NX of the key, then PUBLISH).

History, offsets and epochs (topics whose rule has `history_size > 0`). Keys are hash-tagged
with the topic, so a Redis Cluster keeps one topic's keys in one slot (P is
`channel_prefix`, T the topic; broker/bus/redis_cluster.py reuses this class per master):
    P{T}:m      hash: `o` last offset, `e` epoch (16 hex chars), `r` the replication id
                of the epoch's last write. No expiry without `history_ttl_s`; with it,
                expires max(10 x ttl, 3600 s) after the last publish.
    P{T}:h      stream: one entry per message, ID `<offset>-0`, fields `t` (server time in
                ms, from TIME) and `d` (the exact channel payload). XADD MAXLEN history_size
                (exact); with `history_ttl_s`, each publish trims expired entries from the
                head and PEXPIREs the stream to the ttl; reads skip older entries anyway.
    P{T}:k:K    string "offset:epoch" (history topics) or "-" (others): idempotency key K,
                PX idempotency_ttl_s.
A publish runs one script: read the meta hash (a new epoch and a DELeted stream when history
may have lost entries: the hash is missing, or its `r` is not the server's replication id
and the change is not a restart with AOF; exact rule in broker/bus/lua.py), HINCRBY `o`,
XADD, PUBLISH. So offsets,
history and broadcast agree: nobody can receive a message history lacks. The epoch is made
by the caller (`secrets.token_hex(8)`) and used only when the script needs a new one. A
history read is one script too: the position (made the same way when missing, so a position
given before the first publish stays valid) and the entries after the reader's offset.
Channel payloads: a plain topic carries `envelope.pack(message)` (it starts with 0x97, a
msgpack array of 7); a history topic `b"H" + offset + b":" + epoch + b":" + envelope`, the
reader sets BusMessage.offset/epoch from that header.

Presence. Hash `P{T}:p`: client id -> `{"w": bus instance, "i": info}`. A bus instance is
live while `P` + `w:` + instance exists: SET ... PX presence_ttl_s, refreshed every third of
it once the bus has presence entries, DELeted on close(). A refresh that finds the key gone
(we were away longer than the ttl, or Redis lost it) rewrites all this bus' entries; entries
whose write failed are retried on each refresh. `presence(T)` is a script that returns the
entries whose worker key exists and HDELs the others. On every refresh (a third of
presence_ttl_s) each bus sweeps its presence topics (subscribed, or holding its entries) the
same way; the HDEL inside the script makes exactly one sweeper announce each removal. On
join_leave topics the scripts publish `b"P" + json({"k": "join"|"leave", "c": client, "i":
info})` on the topic's channel, delivered in order with its messages through `on_presence`.
(The sweep script reads worker keys outside the topic's slot here; the Cluster bus,
broker/bus/redis_cluster.py, keeps one worker key per topic in the topic's slot instead.)

Needs Redis >= 6.2 (XTRIM MINID, SET ... GET); scripts use TIME, so effects replication
(the default since Redis 5, the only kind since 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import logging
import math
import random
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.bus import (
    JOIN,
    LEAVE,
    Bus,
    HistoryRead,
    Published,
    StatsValue,
    check_history_args,
    check_key,
    info_json,
    meta_ttl_s,
    new_epoch,
    no_history,
)
from broker.bus.lua import (
    HISTORY,
    PRESENCE_ADD,
    PRESENCE_LIST,
    PRESENCE_REMOVE,
    PUBLISH,
    PUBLISH_KEYED,
    SCRIPTS,
    Script,
)
from broker.bus.redis_wire import RespWire, pack_commands
from broker.envelope import BusMessage, pack, unpack
from broker.errors import BusError, BusOutcomeUnknown, BusUnavailable, ConfigError, EnvelopeError
from broker.settings import Settings, TopicRule

log = logging.getLogger("redwire.bus")

_IO_ERRORS = (RedisError, OSError)  # asyncio's TimeoutError is the builtin, an OSError
_PUBLISHED = Published()
_DUPLICATE = Published(duplicate=True)


def _published_reply(_receivers: Any) -> Published:
    return _PUBLISHED


def _keyed_reply(published: Any) -> Published:
    """The keyed-publish script's reply: 1 published, 0 the key was used (a duplicate)."""
    return _PUBLISHED if published else _DUPLICATE


def _history_reply(reply: Any) -> Published:
    """The history publish script's reply: offset, epoch, duplicate."""
    offset, epoch, duplicate = reply
    return Published(offset, epoch.decode(), bool(duplicate))


_MALFORMED_LOG_EVERY_S = 10.0  # log a malformed envelope at most this often (all are counted)
_MAX_BACKOFF_DOUBLINGS = 30
_TAG_HISTORY = ord("H")  # first byte of a history topic's channel payload
_TAG_PRESENCE = ord("P")  # first byte of a join/leave event (an envelope starts with 0x97)
_PRESENCE_BEATS_PER_TTL = 3  # the worker key is refreshed this often per presence_ttl_s


class _SubscriptionWedged(BusError):
    """The probe did not come back: the subscription is silently dead."""


class Redirected(BusUnavailable):
    """A Redis Cluster node did not run the command: MOVED or ASK (the slot is served by
    `addr`), TRYAGAIN or CLUSTERDOWN (try later). Never run, so a retry is safe."""

    def __init__(self, kind: str, addr: str, text: str) -> None:
        super().__init__(f"Redis Cluster: {text}")
        self.kind = kind  # "MOVED", "ASK", "TRYAGAIN" or "CLUSTERDOWN"
        self.addr = addr  # "host:port" for MOVED and ASK, else ""


_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)
# Set by the Cluster bus around a call it sends after an ASK redirection: the commands the
# call queues go with ASKING ahead of them (read when each command is queued).
ASKING: contextvars.ContextVar[bool] = contextvars.ContextVar("redwire_asking", default=False)


def _redirected(exc: ResponseError) -> Redirected:
    kind = type(exc).__name__.removesuffix("Error").upper()
    addr = ""
    if isinstance(exc, MovedError | AskError):
        addr = f"{exc.host}:{exc.port}"
        kind = "MOVED" if isinstance(exc, MovedError) else "ASK"
    return Redirected(kind, addr, f"{kind} {exc}")


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


def split_hosts_url(url: str, scheme: str, what: str) -> tuple[Any, str, list[tuple[str, int]]]:
    """(urlsplit parts, userinfo, [(host, port)]) of `scheme://[userinfo@]h1:p1,h2:p2...`
    (the Cluster and Sentinel URLs); ConfigError names `what` each host:port is."""
    parts = urlsplit(url)
    if parts.scheme != scheme:
        raise ConfigError(f"not a {scheme}:// URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    found = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad {scheme}:// URL: each {what} is host:port, not {item!r}")
        found.append((host, int(port)))
    return parts, userinfo, found


def _ms(seconds: float) -> int:
    """Whole milliseconds, at least 1 for a positive duration (0 stays 0: "none")."""
    return math.ceil(seconds * 1000) if seconds > 0 else 0


def parse_tagged(topic: str, data: bytes) -> BusMessage:
    """The message in a history topic's payload `H<offset>:<epoch>:<envelope>`."""
    first = data.find(b":", 1)
    second = data.find(b":", first + 1) if first > 1 else -1
    if second < 0:
        raise EnvelopeError("history payload without an offset:epoch header")
    try:
        offset = int(data[1:first])
        epoch = data[first + 1 : second].decode("ascii")
    except ValueError:
        raise EnvelopeError("history payload with a malformed header") from None
    m = unpack(data[second + 1 :])
    if m.topic != topic:
        raise EnvelopeError("envelope of another topic")
    return BusMessage(m.topic, m.payload, m.encoding, m.origin, offset, epoch)


def parse_presence(data: bytes) -> tuple[str, str, dict[str, Any]]:
    """(kind, client_id, info) of a join/leave payload `P{"k":..,"c":..,"i":..}`."""
    try:
        event = json.loads(data[1:])
    except ValueError:
        raise EnvelopeError("presence event is not JSON") from None
    if not isinstance(event, dict):
        raise EnvelopeError("presence event is not an object")
    kind, client_id, info = event.get("k"), event.get("c"), event.get("i")
    if kind not in (JOIN, LEAVE) or type(client_id) is not str:
        raise EnvelopeError("presence event with a bad kind or client")
    if info is None:
        info = {}
    elif not isinstance(info, dict):
        raise EnvelopeError("presence event info is not an object")
    return kind, client_id, info


def _presence_value(instance: str, info_text: str) -> bytes:
    # The scripts read the worker from the head and cut the info out of this exact shape.
    return ('{"w":"' + instance + '","i":' + info_text + "}").encode()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Done callback of a future nobody awaits: its exception counts as seen."""
    if not future.cancelled():
        future.exception()


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _reject(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _expire(command: _Command) -> None:
    """`bound_s` passed and the command's future is still open: fail it as `_wait` does (an
    unsent command is then never sent: the publisher skips done futures)."""
    if command.sent:
        _reject(command.future, BusOutcomeUnknown("no reply from Redis in time: it may have run"))
    else:
        _reject(command.future, BusUnavailable("the bus did not send it in time; not sent"))


# --- publisher -------------------------------------------------------------------------------


_ZERO_REPLID = b"0" * 40
_OUTER_MARGIN_S = 1.0  # publish()'s outer bound: publish timeout + connect timeout + this


@dataclass(slots=True, eq=False)
class _Command:
    """One queued command. For a script, `args` are its KEYS (the first `keys`) then its
    ARGV after the two server values (see broker/bus/lua.py), filled in when it is sent."""

    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    script: Script | None = None
    keys: int = 0
    sent: bool = False  # its bytes went (or started to go) to Redis: it may have run
    asking: bool = False  # sent after ASKING (a Cluster slot being imported by that node)
    on_reply: Callable[[Any], Any] | None = None  # the future's result from the reply
    deadline: float = math.inf  # loop time past which the publisher's watchdog fails it
    settled: Callable[[asyncio.Future[Any]], None] | None = None  # told as its reply is read


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the scripts need to know about the server (INFO, on each publisher connection)."""

    replid: bytes = b""  # master_replid
    replid2: bytes = _ZERO_REPLID  # master_replid2: all zeros unless promoted from a replica
    aof: bool = False  # aof_enabled:1
    # loading:1 — still reading its data from disk. Redis then reports aof_enabled:0 even
    # with AOF on (it turns AOF off while it replays the file): nothing said now is true.
    loading: bool = False

    @property
    def trusted_restart(self) -> bytes:
        """ARGV[2] of every script: b"1" when a new replication id means a restart that
        kept every acknowledged write (not promoted, AOF on), else b""."""
        return b"1" if self.aof and self.replid2.strip(b"0") == b"" else b""


def parse_server_info(text: bytes) -> ServerInfo:
    """The ServerInfo in the text of INFO replication + INFO persistence."""

    def field(name: bytes) -> bytes | None:
        found = re.search(rb"^" + name + rb":(\w+)", text, re.MULTILINE)
        return found.group(1) if found else None

    return ServerInfo(
        replid=field(b"master_replid") or b"",
        replid2=field(b"master_replid2") or _ZERO_REPLID,
        aof=field(b"aof_enabled") == b"1",
        loading=field(b"loading") == b"1",
    )


async def _server_info(conn: AbstractConnection) -> ServerInfo:
    """The server's ServerInfo; an empty one (no trust) when Redis will not say."""
    await conn.send_command("INFO", "replication", check_health=False)
    await conn.send_command("INFO", "persistence", check_health=False)
    text = b""
    for _ in range(2):
        try:
            text += await conn.read_response(disable_decoding=True, timeout=math.inf)
        except ResponseError as exc:
            log.warning("bus: INFO refused (%s): epochs rotate on every reconnection", exc)
    return parse_server_info(text)


def _ignore_server(server: ServerInfo) -> None:
    pass


class _BatchReplies:
    """The replies one pipeline is waiting for, settled in order as they are read.

    `expected` has one entry per command sent: the `_Command` its reply settles, or None
    for a reply only logged or skipped (the SCRIPT LOADs in front, an ASKING). `done` gets
    the scripts Redis did not know (to send again after SCRIPT LOAD) once all replies are
    in, or the connection's error if it goes first."""

    __slots__ = ("done", "expected", "fast", "next", "prefix", "retry", "retry_noscript")

    def __init__(
        self,
        expected: list[_Command | None],
        prefix: int,
        retry_noscript: bool,
        *,
        fast: bool = False,
    ) -> None:
        self.fast = fast  # written by the fast path: its last reply sends the next batch
        self.expected = expected
        self.prefix = prefix  # the first `prefix` entries are SCRIPT LOADs
        self.retry_noscript = retry_noscript
        self.next = 0
        self.retry: list[_Command] = []
        self.done: asyncio.Future[list[_Command]] = asyncio.get_running_loop().create_future()

    def take(self, reply: Any) -> None:
        index = self.next
        self.next = index + 1
        command = self.expected[index]
        if command is None:
            if index < self.prefix and isinstance(reply, ResponseError):
                log.warning("bus: Redis refused SCRIPT LOAD: %s", reply)  # its commands fail below
        elif isinstance(reply, _REDIRECTS):  # a Cluster node did not run it: the bus re-routes it
            _reject(command.future, _redirected(reply))
        elif isinstance(reply, NoScriptError):  # not run: safe to send again
            if self.retry_noscript:
                command.sent = False
                self.retry.append(command)
            else:
                _reject(command.future, BusError(f"Redis lost the script again: {reply}"))
        elif isinstance(reply, ResponseError):  # this command failed; the pipeline goes on
            name = command.script.name if command.script else command.args[0].decode()
            _reject(command.future, BusError(f"Redis refused {name}: {reply}"))
        elif command.on_reply is None:
            _resolve(command.future, reply)
        else:
            try:
                result = command.on_reply(reply)
            except Exception as exc:  # a reply of the wrong shape fails its command only
                log.exception("bus: unexpected reply to %r", command.args[:1])
                _reject(command.future, BusError(f"unexpected reply from Redis: {exc!r}"))
            else:
                _resolve(command.future, result)
        if command is not None and command.settled is not None and command.future.done():
            try:
                command.settled(command.future)
            except Exception:  # the caller's bug must not cost the batch its other replies
                log.exception("bus: a publish's settled callback failed")
        if self.next == len(self.expected):
            self.done.set_result(self.retry)


class _Publisher:
    """A queue of commands (PUBLISH, scripts, ...) flushed as pipelines over one connection,
    in order; scripts go as EVALSHA, re-sent after SCRIPT LOAD when Redis answers NOSCRIPT.

    Outcomes: a batch that fails before a byte was written fails with BusUnavailable; once
    the write started, each command whose reply did not come gets BusOutcomeUnknown (those
    answered keep their results) and everything queued behind gets BusUnavailable. Commands
    whose future is already done (the caller gave up) are dropped, never sent. A non-I/O
    exception fails only its batch; the loop goes on."""

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        settings: Settings,
        on_change: Callable[[], None],
        scripts: Sequence[Script] = SCRIPTS,
    ) -> None:
        self._connect = connect
        self._scripts = scripts  # loaded together on NOSCRIPT
        # appended to every script's ARGV[2]: the Cluster bus' `|replid|...|` (broker/bus/lua.py)
        self.trust_extra = b""
        self.on_server: Callable[[ServerInfo], None] = _ignore_server  # each (re)connection
        self._batch = settings.bus_publish_batch
        self._timeout_s = settings.bus_publish_timeout_s
        self.bound_s = (
            settings.bus_publish_timeout_s + settings.bus_connect_timeout_s + _OUTER_MARGIN_S
        )
        self._on_change = on_change
        self._conn: AbstractConnection | None = None
        self._wire: RespWire | None = None  # _conn's transport, taken over once connected
        self._reading: _BatchReplies | None = None  # the batch whose replies are due
        self._queue: deque[_Command] = deque()
        self._sending: list[_Command] = []
        self._watchdog: asyncio.TimerHandle | None = None  # see `_watch`
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The fast path (see `_send_fast`): True while the connection is up and the last
        # batch worked; batches are then written from callbacks, the task only reconnects.
        self._fast = False
        self._kicked = False  # a `_kick` is scheduled for this loop turn
        self._retry: list[_Command] = []  # refused with NOSCRIPT on the fast path: the task's
        self._batch_timer: asyncio.TimerHandle | None = None  # see `_check_batch`
        self._batch_started = 0.0
        self.ok = True  # the last batch worked (or none was sent yet)
        self.server = ServerInfo()  # fetched on each (re)connection
        self.batches = 0
        self.script_loads = 0
        self.dropped = 0  # commands whose caller gave up before they were sent
        self.internal_errors = 0

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bus-publisher")

    async def close(self) -> None:
        task, self._task = self._task, None
        sending = self._sending
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._stop_fast()
        if self._retry:
            sending = [*sending, *self._retry]
            self._retry = []
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_batch(sending, "the bus was closed")
        self._fail_all(BusUnavailable("the bus is closed"))
        await self._drop_connection()

    def send(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future gets Redis' reply, or a BusError."""
        return self._enqueue(_Command(args, self._new_future(), asking=ASKING.get())).future

    def run(self, script: Script, keys: Sequence[Any], argv: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue one script call (see `_Command`); the future gets its reply, or a BusError."""
        return self._enqueue(self._script(script, keys, argv)).future

    async def call(self, *args: Any) -> Any:
        """`send` and wait for the reply, bounded by `bound_s` (see `_wait`)."""
        command = _Command(args, self._new_future(), asking=ASKING.get())
        return await self._wait(self._enqueue(command))

    async def call_script(self, script: Script, keys: Sequence[Any], argv: Sequence[Any]) -> Any:
        """`run` and wait for the reply, bounded by `bound_s` (see `_wait`)."""
        return await self._wait(self._enqueue(self._script(script, keys, argv)))

    def call_nowait(
        self,
        args: tuple[Any, ...],
        on_reply: Callable[[Any], Any],
        script: Script | None = None,
        keys: int = 0,
    ) -> _Command:
        """`call` (or, with `script`, `call_script` with `keys` keys first in `args`)
        without a coroutine: the command is queued now, its future's result is
        `on_reply(reply)`, and it is failed past `bound_s` as `_wait` would fail it."""
        future = self._new_future()
        command = _Command(args, future, script, keys, asking=ASKING.get(), on_reply=on_reply)
        loop = asyncio.get_running_loop()
        command.deadline = loop.time() + self.bound_s
        self._enqueue(command)
        if self._watchdog is None:
            self._watchdog = loop.call_at(command.deadline, self._watch)
        return command

    def _watch(self) -> None:
        """Fail the commands past their deadline. One timer for the publisher, not one per
        command: commands are settled in the order they were queued (the batch being read,
        then the queue), so the first one still open that is not due sets the next check."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for command in itertools.chain(self._sending, self._queue):
            if command.future.done() or command.deadline == math.inf:
                continue
            if command.deadline > now:
                self._watchdog = loop.call_at(command.deadline, self._watch)
                return
            _expire(command)

    def _script(self, script: Script, keys: Sequence[Any], argv: Sequence[Any]) -> _Command:
        future = self._new_future()
        return _Command((*keys, *argv), future, script, len(keys), asking=ASKING.get())

    async def _wait(self, command: _Command) -> Any:
        """The command's reply. Past `bound_s` (the publisher misbehaves: it should have
        failed the command by then) the future is cancelled, so an unsent command is never
        sent: BusOutcomeUnknown when it was sent, else BusUnavailable."""
        try:
            async with asyncio.timeout(self.bound_s):
                return await command.future
        except TimeoutError:
            if command.sent:
                raise BusOutcomeUnknown("no reply from Redis in time: it may have run") from None
            raise BusUnavailable("the bus did not send it in time; not sent") from None

    def _new_future(self) -> asyncio.Future[Any]:
        if self._task is None:
            raise BusUnavailable("the bus is not running")
        return asyncio.get_running_loop().create_future()

    def _enqueue(self, command: _Command) -> _Command:
        self._queue.append(command)
        if not self._fast:
            self._wake.set()
        elif self._reading is None and not self._kicked:
            # what is queued in this loop turn goes as one batch; while a batch is being
            # read, its last reply sends the next one (`_batch_done`)
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._kick)
        return command

    async def _run(self) -> None:
        queue = self._queue
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (queue or self._retry) and not self._fast:
                retry, self._retry = self._retry, []
                if retry:  # the fast path's NOSCRIPT refusals: they go before the queue
                    batch = retry
                else:
                    batch = self._take_batch()
                    if not batch:
                        continue
                self._sending = batch
                try:
                    await self._flush(batch, retry_only=bool(retry))
                except Exception as exc:  # a bug: fail this batch only, keep the loop
                    self._internal_error(batch, exc)
                    await self._drop_connection()  # replies may be left unread on it
                finally:
                    self._sending = []
            if self._fast and queue and self._reading is None:
                self._send_fast()

    def _take_batch(self) -> list[_Command]:
        """Up to `bus_publish_batch` queued commands, skipping those whose caller gave up."""
        queue = self._queue
        batch: list[_Command] = []
        while queue and len(batch) < self._batch:
            command = queue.popleft()
            if command.future.done():  # its caller gave up: never send it
                self.dropped += 1
            else:
                batch.append(command)
        return batch

    def _internal_error(self, batch: list[_Command], exc: Exception) -> None:
        self.internal_errors += 1
        log.error("bus: publisher batch failed (%d so far)", self.internal_errors, exc_info=exc)
        reason = f"internal error in the bus: {exc!r}"
        self._fail_batch(batch, reason, BusError(reason))

    # --- the fast path -------------------------------------------------------------------------
    # Once a batch worked on a live connection, the next batches are written from callbacks:
    # `_enqueue` schedules one `_kick` per loop turn, the last reply of a batch writes the
    # next one at once (`_batch_done`), and one timer per `bus_publish_timeout_s` checks the
    # batch being read (`_check_batch`). No task step, event or timeout context per batch.
    # Anything else (connecting, NOSCRIPT, a failure) goes back to the task: `_fast` False.

    def _kick(self) -> None:
        self._kicked = False
        if not self._queue or self._reading is not None:
            return
        task = self._task
        if self._fast and task is not None and not task.done():
            self._send_fast()
        else:
            self._stop_fast()
            self._wake.set()

    def _send_fast(self) -> None:
        """Write the next batch now (the connection is up, no batch is being read)."""
        wire = self._wire
        if wire is None or not wire.is_open:
            self._stop_fast()
            self._wake.set()
            return
        batch = self._take_batch()
        if not batch:
            return
        self.batches += 1
        self._sending = batch
        try:
            expected: list[_Command | None] = []
            encoded: list[tuple[Any, ...]] = []
            self._encode_into(batch, encoded, expected)
            packed = pack_commands(self._conn, encoded)
        except Exception as exc:  # a bug: fail this batch only, the connection is unused
            self._sending = []
            self._internal_error(batch, exc)
            if self._queue:
                self._kicked = True
                asyncio.get_running_loop().call_soon(self._kick)
            return
        replies = self._reading = _BatchReplies(expected, 0, True, fast=True)
        for command in batch:
            command.sent = True
        loop = asyncio.get_running_loop()
        self._batch_started = loop.time()
        if self._batch_timer is None:
            self._batch_timer = loop.call_at(
                self._batch_started + self._timeout_s, self._check_batch
            )
        try:
            wire.write(packed)
        except _IO_ERRORS as exc:
            if self._reading is replies:
                self._fast_failed(f"Redis publish failed: {exc or type(exc).__name__}")

    def _batch_done(self, replies: _BatchReplies) -> None:
        """The last reply of a fast batch was read: the next batch goes now."""
        self._reading = None
        self._sending = []
        retry = replies.done.result()
        if retry:  # Redis lost its scripts: the task loads them and sends these again
            self._retry = retry
            self._stop_fast()
            self._wake.set()
            return
        self._set_ok(True)
        if self._queue:
            self._send_fast()

    def _check_batch(self) -> None:
        """The fast path's bound: the batch being read fails past `bus_publish_timeout_s`."""
        self._batch_timer = None
        replies = self._reading
        if replies is None or not replies.fast:
            return
        due = self._batch_started + self._timeout_s
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._batch_timer = loop.call_at(due, self._check_batch)
            return
        self._fast_failed("Redis publish failed: timed out")

    def _fast_failed(self, reason: str) -> None:
        """A fast batch failed (timeout, connection lost): as `_flush` fails one."""
        batch = self._sending
        self._reading = None
        self._sending = []
        self._stop_fast()
        self._fail_batch(batch, reason)
        self._fail_all(BusUnavailable(f"{reason}; not sent"))
        wire = self._wire
        if wire is not None:
            wire.abort(reason)  # the task disconnects it and reconnects on the next batch
        self._set_ok(False)

    def _stop_fast(self) -> None:
        self._fast = False
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None

    async def _flush(self, batch: list[_Command], *, retry_only: bool = False) -> None:
        self.batches += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                conn = await self._connection()
                sending = [c for c in batch if not c.future.done()]  # gave up meanwhile
                self.dropped += len(batch) - len(sending)
                batch = sending
                if not batch:
                    return
                if retry_only:  # refused with NOSCRIPT on the fast path
                    retry = batch
                else:
                    retry = await self._pipeline(conn, (), batch, retry_noscript=True)
                if retry:
                    # SCRIPT FLUSH, a restart or a failover emptied the script cache. Load
                    # every script at once (so later batches never find one script known and
                    # another not, which could reorder a topic's messages and presence
                    # events), then send the refused commands again, in order.
                    self.script_loads += 1
                    loads = [(b"SCRIPT", b"LOAD", script.source) for script in self._scripts]
                    await self._pipeline(conn, loads, retry, retry_noscript=False)
        except _IO_ERRORS as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            reason = f"Redis publish failed: {reason or type(exc).__name__}"
            self._fail_batch(batch, reason)
            # queued during the outage: refuse rather than pile up (never sent: a retry is safe)
            self._fail_all(BusUnavailable(f"{reason}; not sent"))
            await self._drop_connection()
            self._set_ok(False)
        else:
            self._set_ok(True)
            wire = self._wire
            self._fast = wire is not None and wire.is_open

    @staticmethod
    def _fail_batch(batch: list[_Command], reason: str, unsent: BusError | None = None) -> None:
        """Fail what is left of `batch`: BusOutcomeUnknown for the commands that were sent,
        `unsent` (default BusUnavailable) for the others."""
        unknown = BusOutcomeUnknown(f"{reason} after it was sent; it may have run")
        if unsent is None:
            unsent = BusUnavailable(f"{reason}; not sent")
        for command in batch:
            _reject(command.future, unknown if command.sent else unsent)

    async def _connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is not None and (self._wire is None or not self._wire.is_open):
            await self._drop_connection()  # e.g. Redis restarted since the last batch
            conn = None
        if conn is None:
            conn = self._conn = self._connect()
            await conn.connect()
            server = await _server_info(conn)
            if server.loading:  # not ready: its commands would fail, its INFO misleads
                await self._drop_connection()
                raise RedisConnectionError("Redis is loading its data; retrying")
            self._wire = wire = RespWire.take(conn, self._on_replies)
            wire.closed.add_done_callback(self._wire_closed)
            self.server = server
            self.on_server(server)
        return conn

    def _encode_into(
        self,
        commands: list[_Command],
        encoded: list[tuple[Any, ...]],
        expected: list[_Command | None],
    ) -> None:
        """Append each command to `encoded` (behind an ASKING when Redis Cluster redirected
        it with ASK) and, entry for entry, whose reply it is to `expected` (None: skipped)."""
        for command in commands:
            if command.asking:
                encoded.append((b"ASKING",))
                expected.append(None)
            encoded.append(self._encode(command))
            expected.append(command)

    def _encode(self, command: _Command) -> tuple[Any, ...]:
        script, args = command.script, command.args
        if script is None:
            return args
        n, server = command.keys, self.server
        trust = server.trusted_restart + self.trust_extra
        return (b"EVALSHA", script.sha, n, *args[:n], server.replid, trust, *args[n:])

    async def _pipeline(
        self,
        conn: AbstractConnection,
        prefix: Sequence[tuple[Any, ...]],
        commands: list[_Command],
        *,
        retry_noscript: bool,
    ) -> list[_Command]:
        """Send `prefix` then `commands` as one write and resolve each command's future with
        its reply as it comes (`_on_replies`); returns the scripts Redis did not know (when
        `retry_noscript`)."""
        encoded: list[tuple[Any, ...]] = list(prefix)
        expected: list[_Command | None] = [None] * len(prefix)  # None: a reply to skip
        self._encode_into(commands, encoded, expected)
        wire = self._wire
        assert wire is not None
        packed = pack_commands(conn, encoded)
        replies = self._reading = _BatchReplies(expected, len(prefix), retry_noscript)
        for command in commands:
            command.sent = True
        try:
            wire.write(packed)
            return await replies.done
        finally:
            self._reading = None

    def _on_replies(self, replies: list[Any]) -> None:
        """Replies read on the publisher connection, in order: each settles the next
        command of the batch being read (`_BatchReplies`)."""
        batch = self._reading
        for reply in replies:
            if batch is None or batch.done.done():
                assert self._wire is not None
                self._wire.abort("Redis sent a reply nobody asked for")
                return
            if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                assert self._wire is not None  # e.g. LOADING, NOAUTH: the connection is unusable
                self._wire.abort(f"Redis: {reply}")
                return
            batch.take(reply)
            if batch.fast and batch.done.done():
                self._batch_done(batch)
                batch = self._reading

    def _wire_closed(self, closed: asyncio.Future[None]) -> None:
        """The publisher connection is gone: the batch being read fails (its commands that
        got no reply become BusOutcomeUnknown in `_flush`)."""
        batch = self._reading
        if batch is not None and batch.fast:
            self._fast_failed("Redis publish failed: the connection was lost")
        elif batch is not None and not batch.done.done():
            error = None if closed.cancelled() else closed.exception()
            batch.done.set_exception(error or RedisConnectionError("Redis connection closed"))
        self._stop_fast()  # the next batch goes through the task, which reconnects

    def _fail_all(self, error: BusError) -> None:
        """Fail everything queued (never sent)."""
        while self._queue:
            _reject(self._queue.popleft().future, error)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()
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
    """One subscriber connection and what was asked of it; see the module docstring.

    Pure bookkeeping (no I/O): `touch` marks channels changed, `reconcile` turns the dirty
    ones into commands, `confirmed_by_redis` takes Redis' confirmations, `wait` gives a
    future done when channels are settled, `end` resolves every waiter when the connection
    is gone."""

    def __init__(self, conn: AbstractConnection | None) -> None:
        self.conn = conn
        self.wire: RespWire | None = None  # conn's transport, taken over (redis_wire.py)
        self.live = False  # the initial (re)subscribe was confirmed
        self.topics: dict[bytes, str] = {}  # asked of this session: channel -> topic
        self.initial: frozenset[str] = frozenset()  # wanted_topics() when it started
        self.unreported: set[str] = set()  # initial topics whose gap is not reported yet
        self.gaps_due: list[str] = []  # confirmed, to report before the next hand-over
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
        """A future done when every one of `channels` is settled (a subscribing one fails
        with the error given to `end` if the connection goes first)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = {ch for ch in channels if ch in self.dirty or ch in self.inflight}
        if not pending:
            future.set_result(None)
            return future
        waiter = _Waiter(future, len(pending), subscribing)
        for ch in pending:
            self.waiters.setdefault(ch, []).append(waiter)
        return future

    def reconcile(
        self,
        wanted: Callable[[bytes], bool],
        batch: int,
        verbs: tuple[bytes, bytes] = (b"SUBSCRIBE", b"UNSUBSCRIBE"),
        group: Callable[[bytes], int] | None = None,
    ) -> list[tuple[bytes, ...]]:
        """The commands (`verbs`: subscribe, unsubscribe) that make Redis' channel set match
        `wanted` for the dirty channels, at most `batch` channels each, and with `group`
        only channels of one group each (a Cluster's SSUBSCRIBE takes one slot's)."""
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
        groups: list[tuple[bytes, list[bytes]]] = [(verbs[0], sub), (verbs[1], unsub)]
        if group is not None:
            groups = [
                (verb, members)
                for verb, channels in groups
                for members in _grouped(channels, group).values()
            ]
        return [
            (verb, *channels[i : i + batch])
            for verb, channels in groups
            for i in range(0, len(channels), batch)
        ]

    def confirmed_by_redis(self, subscribed: bool, channel: bytes) -> None:
        if subscribed:
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


def _grouped(channels: list[bytes], group: Callable[[bytes], int]) -> dict[int, list[bytes]]:
    groups: dict[int, list[bytes]] = {}
    for channel in channels:
        groups.setdefault(group(channel), []).append(channel)
    return groups


# --- the bus ---------------------------------------------------------------------------------


class RedisBus(Bus):
    # Classic pub/sub. broker/bus/redis_cluster.py's shard bus swaps in the sharded verbs,
    # reply kinds and scripts (Redis >= 7: SSUBSCRIBE, SPUBLISH, smessage, ...).
    SUBSCRIBE_VERBS = (b"SUBSCRIBE", b"UNSUBSCRIBE")
    PUBLISH_VERB = b"PUBLISH"
    MESSAGE_KIND = b"message"
    CONFIRM_KINDS = (b"subscribe", b"unsubscribe")
    CHANNEL_GROUP: Callable[[bytes], int] | None = None  # channels one (UN)SUBSCRIBE may mix
    LUA: Mapping[Script, Script] = {script: script for script in SCRIPTS}

    def __init__(self, url: str, settings: Settings, origin: str) -> None:
        super().__init__()
        self.settings = settings
        self.origin = origin
        timeout = settings.bus_connect_timeout_s
        self._new_connection = self._connections(url, _client_name("sub", origin), timeout)
        self._publisher = _Publisher(
            self._connections(url, _client_name("pub", origin), timeout),
            settings,
            self._update_health,
            tuple(self.LUA.values()),
        )
        prefix = settings.channel_prefix.encode()
        self._prefix = prefix
        self._topic_prefix = prefix + b"t:"
        self.instance = secrets.token_hex(8)  # this bus, unique across workers and replicas
        self.probe_channel = prefix + b"probe:" + origin.encode() + b":" + self.instance.encode()
        # presence: this bus' entries are live while its worker key exists
        self._worker_prefix = prefix + b"w:"
        self.worker_key = self._worker_prefix + self.instance.encode()
        self._present: dict[str, dict[str, str]] = {}  # wanted: topic -> client -> info JSON
        self._presence_dirty: set[tuple[str, str]] = set()  # not (yet) written as wanted
        self._presence_used = False
        self._presence_task: asyncio.Task[None] | None = None
        self._session: _Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._reported_healthy = False
        self._last_rx = 0.0  # time.monotonic() of the last reply from the subscription
        self._last_probe_at = 0.0
        self._probe_sent_at: float | None = None
        self._probe_deadline = 0.0  # the probe out is overdue past this (see _probe)
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
        self.duplicates = 0
        self.history_reads = 0
        self.presence_events = 0
        self.presence_swept = 0

    def _connections(
        self, url: str, client_name: str, connect_timeout_s: float
    ) -> Callable[[], AbstractConnection]:
        """The factory of this bus' connections (the Sentinel bus asks Sentinel where)."""
        return connection_factory(url, client_name, connect_timeout_s)

    def channel(self, topic: str) -> bytes:
        """The Redis channel carrying `topic`."""
        return self._topic_prefix + topic.encode()

    def key(self, topic: str, suffix: str) -> bytes:
        """The Redis key `prefix{topic}:suffix` (hash-tagged: one Cluster slot per topic)."""
        return self._prefix + b"{" + topic.encode() + b"}:" + suffix.encode()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._start_publishing()
        await self._start_subscriber()

    def _start_publishing(self) -> None:
        """The publisher and the presence upkeep (the Cluster's shard bus starts its
        subscriber only once the shard has topics)."""
        if not self._publisher.running:
            self._publisher.start()
            loop = asyncio.get_running_loop()
            self._presence_task = loop.create_task(self._presence_loop(), name="bus-presence")

    async def _start_subscriber(self) -> None:
        """The subscriber task; returns when its first session went live or failed."""
        loop = asyncio.get_running_loop()
        self._started = started = loop.create_future()
        self._task = task = loop.create_task(self._run(), name=f"bus-subscriber-{self.origin}")
        await asyncio.wait((started, task), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # a bug ended the subscriber task: say so now

    async def close(self) -> None:
        presence_task, self._presence_task = self._presence_task, None
        if presence_task is not None:
            presence_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await presence_task
        if self._presence_used and self._publisher.running and self._publisher.ok:
            # Our entries die with the worker key: other buses sweep them (announcing leave).
            deletes = [self._publisher.send(b"DEL", key) for key in self._worker_keys()]
            with contextlib.suppress(BusError):
                await asyncio.gather(*deletes)
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
        conn = self._new_connection()
        s = _Session(conn)
        tasks: list[asyncio.Future[None]] = []  # the session's tasks, and its wire's `closed`
        ready: asyncio.Future[None] | None = None
        try:
            async with asyncio.timeout(self.settings.bus_connect_timeout_s):
                await conn.connect()
            self._session = s
            try:
                wanted = list(self.wanted_topics())
            except Exception:
                log.exception("bus: wanted_topics() failed; subscribing nothing")
                wanted = []
            s.topics = {self.channel(topic): topic for topic in wanted}
            s.initial = frozenset(wanted)
            if self._gap_on_connect():
                s.unreported = set(wanted)
            channels = [*s.topics, self.probe_channel]
            s.touch(channels)
            ready = s.wait(channels, subscribing=True)
            loop = asyncio.get_running_loop()
            s.wire = RespWire.take(conn, lambda replies: self._on_replies(s, replies))
            tasks.append(s.wire.closed)  # the reader: done only when the connection is gone
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

    def _gap_on_connect(self) -> bool:
        """True when this session's topics get a gap. Not on the connection start() waits
        for: nothing was delivered before it."""
        return self._started is None or self._started.done()

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
        self, s: _Session, tasks: list[asyncio.Future[None]], ready: asyncio.Future[None] | None
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
        if s.wire is not None:
            s.wire.close()
        with contextlib.suppress(*_IO_ERRORS):
            if s.conn is not None:
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
        self._report_gaps(s)  # (the reader reported them as Redis confirmed each)
        self._update_health()

    def _report_gaps(self, s: _Session) -> None:
        """Tell the owner which resubscribed topics may have missed messages."""
        due, s.gaps_due = s.gaps_due, []
        gap = frozenset(t for t in due if self.channel(t) in s.topics)
        if gap:
            self.gaps += 1
            self._call(self.on_gap, gap)

    # --- session tasks ---------------------------------------------------------------------

    def _on_replies(self, s: _Session, replies: list[Any]) -> None:
        """What one read from the subscriber connection completed (`RespWire`), in order:
        messages go to `on_messages` in lists of at most `bus_read_batch`."""
        self._last_rx = time.monotonic()
        topics = s.topics  # only what this session subscribed is routed
        probe_channel = self.probe_channel
        limit = self.settings.bus_read_batch
        message_kind = self.MESSAGE_KIND
        batch: list[BusMessage] = []
        for reply in replies:
            if type(reply) is list and len(reply) == 3 and reply[0] == message_kind:
                channel = reply[1]
                topic = topics.get(channel)
                if topic is not None:
                    data = reply[2]
                    tag = data[0] if data else 0
                    try:
                        if tag == _TAG_HISTORY:
                            batch.append(parse_tagged(topic, data))
                        elif tag == _TAG_PRESENCE:
                            kind, client_id, info = parse_presence(data)
                            batch = self._hand_over(s, batch)  # keep the topic's order
                            self.presence_events += 1
                            self._call_presence(topic, kind, client_id, info)
                        else:
                            message = unpack(data)
                            if message.topic != topic:
                                raise EnvelopeError("envelope of another topic")
                            batch.append(message)
                    except EnvelopeError as exc:
                        self._skip_malformed(channel, exc)
                    if len(batch) >= limit:
                        batch = self._hand_over(s, batch)
                elif channel == probe_channel:
                    self._probe_arrived(reply[2])
            elif isinstance(reply, Exception):  # a refused (UN)SUBSCRIBE: start over
                assert s.wire is not None
                s.wire.abort(f"Redis refused a subscriber command: {reply}")
                return
            else:
                self._control(s, reply)
        self._hand_over(s, batch)

    def _hand_over(self, s: _Session, batch: list[BusMessage]) -> list[BusMessage]:
        """Report the gaps confirmed so far, then give `batch` (if any) to `on_messages`;
        returns a new empty batch. A topic's gap is confirmed before its first message."""
        if s.gaps_due:
            self._report_gaps(s)
        if not batch:
            return batch
        self.messages_in += len(batch)
        self._call(self.on_messages, batch)
        return []

    def _control(self, s: _Session, reply: Any) -> None:
        kinds = self.CONFIRM_KINDS
        if type(reply) is list and len(reply) == 3 and reply[0] in kinds:
            subscribed = reply[0] == kinds[0]
            if not subscribed and reply[1] not in s.inflight:
                self._dropped_by_server(s, reply[1])
                return
            s.confirmed_by_redis(subscribed, reply[1])
            if subscribed and s.unreported:
                topic = s.topics.get(reply[1])
                if topic is not None and topic in s.unreported:
                    s.unreported.discard(topic)
                    s.gaps_due.append(topic)
        elif not (type(reply) is list and reply and reply[0] == b"pong"):
            log.warning("bus: unexpected reply on the subscriber connection: %.200r", reply)

    def _dropped_by_server(self, s: _Session, channel: bytes) -> None:
        """An unsubscribe nobody asked for. A single Redis never sends one; a Cluster node
        does after a slot migration (the shard bus overrides this)."""
        log.warning("bus: Redis unsubscribed %r by itself", channel)
        s.confirmed_by_redis(False, channel)

    async def _send_loop(self, s: _Session) -> None:
        batch = self.settings.bus_resubscribe_batch
        while True:
            await s.wake.wait()
            s.wake.clear()
            commands = s.reconcile(
                lambda ch: ch in s.topics or ch == self.probe_channel,
                batch,
                self.SUBSCRIBE_VERBS,
                self.CHANNEL_GROUP,
            )
            if not commands:
                continue
            assert s.conn is not None and s.wire is not None
            verb = self.SUBSCRIBE_VERBS[0]
            self.subscribe_commands += sum(1 for c in commands if c[0] == verb)
            s.wire.write(s.conn.pack_commands(commands))  # raises once the connection is gone

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
        self._probe_deadline = sent_at + timeout
        try:
            try:
                nonce = self._probe_nonce
                channel = self.probe_channel
                receivers = await self._publisher.send(self.PUBLISH_VERB, channel, nonce)
            except BusError as exc:  # the publisher's trouble; `healthy` reflects it
                log.debug("bus: probe not sent: %s", exc)
                return
            if receivers == 0:
                raise _SubscriptionWedged("Redis has no subscriber on our probe channel")
            deadline = sent_at + timeout
            while not back.done():
                await asyncio.wait((back,), timeout=max(0.0, deadline - time.monotonic()))
                if back.done():
                    break
                # Not back yet. Replies still read since the probe went out: the reader is
                # behind, not wedged (the probe waits behind that backlog). Nothing read
                # for a whole timeout: wedged.
                if self._last_rx <= deadline - timeout:
                    raise _SubscriptionWedged(f"probe not back within {timeout}s")
                deadline = self._probe_deadline = self._last_rx + timeout
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
        s = self._session
        if s is None:
            raise BusUnavailable("not connected to Redis; not subscribed")
        channels = []
        for topic in topics:
            channel = self.channel(topic)
            s.topics[channel] = topic
            channels.append(channel)
        s.touch([ch for ch in channels if ch not in s.server])
        await s.wait(channels, subscribing=True)

    async def unsubscribe(self, topics: Collection[str]) -> None:
        await self.unsubscribe_now(topics)

    def unsubscribe_now(self, topics: Collection[str]) -> asyncio.Future[None]:
        """`unsubscribe`: no message on `topics` is routed once this returns; the future is
        done when Redis confirmed (the Cluster bus drops a topic on every shard at once)."""
        s = self._session
        if s is None:  # nothing is subscribed without a connection
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        channels = [self.channel(topic) for topic in topics]
        for channel in channels:
            s.topics.pop(channel, None)  # no message on it is routed from now on
        s.touch([ch for ch in channels if ch in s.server])
        return s.wait(channels, subscribing=False)

    async def publish(self, message: BusMessage, *, key: str | None = None) -> Published:
        return await self.publish_nowait(message, key=key)

    def publish_nowait(
        self,
        message: BusMessage,
        *,
        key: str | None = None,
        settled: Callable[[asyncio.Future[Published]], None] | None = None,
    ) -> asyncio.Future[Published]:
        """`publish` with no task per message (the worker's hot path): the command (a
        PUBLISH, or the same script `publish` runs) is queued now, so publishes enter the
        bus in call order, and the future resolves as `publish` would return. `settled` is
        called as the reply is read (see `Bus.publish_nowait`)."""
        check_key(key)
        topic = message.topic
        rule = self.settings.rule_for(topic)
        data = pack(message)
        publisher = self._publisher
        try:
            if rule is not None and rule.history_size > 0:
                keys, argv = self._history_args(topic, rule, data, key)
                script = self.LUA[PUBLISH]
                command = publisher.call_nowait((*keys, *argv), _history_reply, script, len(keys))
            elif key is None:
                args = (self.PUBLISH_VERB, self.channel(topic), data)
                command = publisher.call_nowait(args, _published_reply)
            else:
                args = (
                    self.key(topic, "k:" + key),
                    self.channel(topic),
                    data,
                    _ms(self.settings.idempotency_ttl_s),
                )
                command = publisher.call_nowait(args, _keyed_reply, self.LUA[PUBLISH_KEYED], 1)
            command.settled = settled
            future = command.future
        except BusError as exc:  # not running: that is the outcome, as publish's
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        future.add_done_callback(self._count_publish)
        return future

    def _count_publish(self, future: asyncio.Future[Published]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            if isinstance(error, BusError):
                self.publish_errors += 1
        elif future.result().duplicate:
            self.duplicates += 1
        else:
            self.published += 1

    def _history_args(
        self, topic: str, rule: TopicRule, data: bytes, key: str | None
    ) -> tuple[list[Any], tuple[Any, ...]]:
        """KEYS and ARGV of the history publish script."""
        keys: list[Any] = [self.key(topic, "m"), self.key(topic, "h")]
        if key is not None:
            keys.append(self.key(topic, "k:" + key))
        argv = (
            self.channel(topic),
            data,
            new_epoch(),
            rule.history_size,
            _ms(rule.history_ttl_s),
            _ms(meta_ttl_s(rule)),
            _ms(self.settings.idempotency_ttl_s),
        )
        return keys, argv

    async def history(
        self, topic: str, *, after: int | None, epoch: str | None, limit: int | None = None
    ) -> HistoryRead:
        check_history_args(after, limit)
        rule = self.settings.rule_for(topic)
        if rule is None or rule.history_size == 0:
            return no_history()
        argv = (
            new_epoch(),
            b"" if after is None else after,
            epoch or "",
            self.settings.history_read_limit if limit is None else limit,
            _ms(rule.history_ttl_s),
            _ms(meta_ttl_s(rule)),
        )
        keys = (self.key(topic, "m"), self.key(topic, "h"))
        self.history_reads += 1
        reply = await self._publisher.call_script(self.LUA[HISTORY], keys, argv)
        offset, top_epoch, complete, entries = reply
        messages = []
        for data in entries:
            try:
                messages.append(parse_tagged(topic, data))
            except EnvelopeError as exc:  # e.g. a newer worker's envelope: a hole for us
                self._skip_malformed(self.key(topic, "h"), exc)
                complete = 0
        return HistoryRead(messages, offset, top_epoch.decode(), bool(complete))

    # --- presence --------------------------------------------------------------------------

    async def presence_add(self, topic: str, client_id: str, info: dict[str, Any]) -> None:
        text = info_json(info)
        if not self._publisher.running:
            raise BusUnavailable("the bus is not running")
        self._presence_first(topic)  # the worker key, ahead of the entry in the same queue
        self._present.setdefault(topic, {})[client_id] = text
        await self._write_presence(topic, client_id)

    async def presence_remove(self, topic: str, client_id: str) -> None:
        if not self._publisher.running:
            raise BusUnavailable("the bus is not running")
        entries = self._present.get(topic)
        if entries is not None:
            entries.pop(client_id, None)
            if not entries:
                del self._present[topic]
        await self._write_presence(topic, client_id)

    async def presence(self, topic: str) -> dict[str, dict[str, Any]]:
        _, flat = await self._run_presence_list(topic, listing=True)
        clients: dict[str, dict[str, Any]] = {}
        for i in range(0, len(flat) - 1, 2):
            try:
                value = json.loads(flat[i + 1])
                clients[flat[i].decode()] = value["i"]
            except (ValueError, KeyError, TypeError):
                log.warning("bus: skipped a malformed presence entry on %r", topic)
        return clients

    def _announces(self, topic: str) -> bool:
        rule = self.settings.rule_for(topic)
        return rule is not None and rule.join_leave

    async def _write_presence(self, topic: str, client_id: str) -> None:
        """Make Redis hold what `_present` wants for this client; on failure it stays dirty
        and the presence loop retries it."""
        entry = (topic, client_id)
        self._presence_dirty.add(entry)
        text = self._present.get(topic, {}).get(client_id)
        hash_key, channel = self.key(topic, "p"), self.channel(topic)
        announce = self._announces(topic)
        if text is not None:
            event = b""
            if announce:
                client = json.dumps(client_id)
                event = ('P{"k":"join","c":' + client + ',"i":' + text + "}").encode()
            value = _presence_value(self.instance, text)
            argv: tuple[Any, ...] = (client_id, value, channel, event)
            await self._publisher.call_script(self.LUA[PRESENCE_ADD], (hash_key,), argv)
        else:
            argv = (client_id, channel, b"1" if announce else b"")
            await self._publisher.call_script(self.LUA[PRESENCE_REMOVE], (hash_key,), argv)
        if self._present.get(topic, {}).get(client_id) == text:  # no newer change since
            self._presence_dirty.discard(entry)

    def _run_presence_list(self, topic: str, *, listing: bool) -> asyncio.Future[Any]:
        argv = (
            self._worker_prefix_for(topic),
            self.channel(topic),
            b"1" if self._announces(topic) else b"",
            b"1" if listing else b"",
        )
        return self._publisher.run(self.LUA[PRESENCE_LIST], (self.key(topic, "p"),), argv)

    # Seams for the Cluster's shard bus, whose worker keys live in each topic's slot.
    def _worker_prefix_for(self, topic: str) -> bytes:
        """The prefix of the worker keys `topic`'s presence entries are checked against."""
        return self._worker_prefix

    def _worker_keys(self) -> list[bytes]:
        """The keys that keep this bus' presence entries alive."""
        return [self.worker_key]

    def _presence_first(self, topic: str) -> None:
        """Before an entry is written on `topic`: make sure its worker key exists (queued
        ahead of the entry on the same publisher)."""
        if not self._presence_used:
            self._presence_used = True
            self._beat().add_done_callback(_retrieve)

    def _beat(self) -> asyncio.Future[Any]:
        """Refresh the worker key; the future gets its previous value (None: it was gone)."""
        ttl_ms = _ms(self.settings.presence_ttl_s)
        return self._publisher.send(b"SET", self.worker_key, self.origin, b"PX", ttl_ms, b"GET")

    async def _presence_loop(self) -> None:
        """Keep the worker key alive, rewrite entries Redis lost or never got, and sweep the
        entries of dead buses out of the presence topics this bus serves."""
        ttl = self.settings.presence_ttl_s
        while True:
            await asyncio.sleep(ttl / _PRESENCE_BEATS_PER_TTL)
            try:
                if self._presence_used:
                    if await self._beat() is None:  # expired (we were away) or Redis lost it
                        self._presence_dirty.update(
                            (topic, client_id)
                            for topic, clients in self._present.items()
                            for client_id in clients
                        )
                    dirty = list(self._presence_dirty)
                    await asyncio.gather(
                        *(self._write_presence(t, c) for t, c in dirty), return_exceptions=True
                    )
                # A dead bus' entries go at most a third of the ttl after its key expired.
                await self._sweep()
            except BusError as exc:
                log.debug("bus: presence upkeep failed: %s", exc)
            except Exception:  # a bug: say so, and keep the presence alive
                log.exception("bus: presence upkeep failed")

    async def _sweep(self) -> None:
        rule_for = self.settings.rule_for
        s = self._session
        subscribed = s.topics.values() if s is not None else ()
        topics = {t for t in subscribed if (r := rule_for(t)) and r.presence}
        topics.update(self._present)
        futures = [self._run_presence_list(t, listing=False) for t in topics]
        for future in futures:
            future.add_done_callback(self._count_swept)
        for result in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    def _count_swept(self, future: asyncio.Future[Any]) -> None:
        # A done callback: counted before any later command's caller resumes.
        if not future.cancelled() and future.exception() is None:
            self.presence_swept += future.result()[0]

    @property
    def healthy(self) -> bool:
        s = self._session
        if s is None or not s.live or not self._publisher.ok:
            return False
        if self._probe_sent_at is None:
            return True
        return time.monotonic() <= self._probe_deadline  # moved on by replies still read

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
            "session_topics": 0 if s is None else len(s.topics),
            "publish_dropped": self._publisher.dropped,
            "publish_internal_errors": self._publisher.internal_errors,
            "probes": self.probes,
            "probe_timeouts": self.probe_timeouts,
            "last_probe_rtt_s": self.last_probe_rtt_s,
            "duplicates": self.duplicates,
            "history_reads": self.history_reads,
            "script_loads": self._publisher.script_loads,
            "presence_events": self.presence_events,
            "presence_swept": self.presence_swept,
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

    def _call_presence(self, topic: str, kind: str, client_id: str, info: dict[str, Any]) -> None:
        try:
            self.on_presence(topic, kind, client_id, info)
        except Exception:
            log.exception("bus: callback %r failed", self.on_presence)
