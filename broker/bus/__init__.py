"""The message bus: how a worker hears what every worker publishes. Interface and factory.

Theory of operation. The owner (the hub, or the SDK Subscriber) owns the topic set, as
centrifuge's `Hub().Channels()` does: it sets `wanted_topics` before `start()`, and after
every (re)connection the bus subscribes exactly `wanted_topics()` (in batches of
`bus_resubscribe_batch`), then reports `on_gap(frozenset(those topics))`: delivery may have
skipped messages while it was away. (The connection `start()` waits for reports no gap:
nothing could be missed before the owner heard back.) The bus keeps no wanted set of its
own that could drift from the owner's. `subscribe` subscribes on the current connection and
returns once Redis confirmed; it raises BusUnavailable while disconnected or when the
connection is lost before the confirmation, and leaves nothing behind (the owner drops the
topic from its own set; `unsubscribe` is harmless for a topic that is not subscribed). The
bus hands every publication it receives on a subscribed topic to `on_messages` in batches,
in arrival order, from the event loop. A bus never re-encodes a payload. A silently dead
subscription is detected and replaced like a lost one; `on_health` reports each flip of
`healthy`.

Publish outcomes: a publish either returns a `Published`, or raises
- BusUnavailable: it was never written to Redis; nothing happened, a retry is safe;
- BusOutcomeUnknown: it was written (or partly) and no reply came; it may have run. Retry
  only with the same idempotency `key`.
A publish never hangs (it is bounded even if the bus misbehaves), and a publish whose
caller gave up (its awaiting task was cancelled) before it was written is never sent.

History, offsets and presence (topics whose `Settings.rule_for` rule asks for them; see the
"History, recovery and presence" section of docs/protocol.md):
- A topic with `history_size > 0` numbers its messages: `publish` assigns the next offset
  atomically with the history append and the broadcast, so no subscriber can receive a
  message before history holds it, and the message delivered to subscribers carries its
  `offset` and `epoch`. The epoch names one unbroken sequence of offsets; it changes (and
  offsets restart at 1) only when history may have lost entries: the topic's meta is gone
  (Redis came back empty, FLUSHALL, the idle topic's epoch expired), a replica was promoted
  since the epoch's last write, or Redis restarted without AOF persistence. A restart with
  AOF keeps the epoch and the history (RedisBus' module docstring has the exact rule).
- `history` reads the position and, given the reader's last offset and epoch, what came
  after it, in one atomic step. Recovery without gaps or duplicates: subscribe first, then
  read history after the last offset seen, and merge both by offset.
- A publish `key` makes a retry land once (per topic, within `idempotency_ttl_s`), on every
  topic, with history or not: the duplicate publishes nothing and returns the first one's
  result with `duplicate=True` (`offset`/`epoch` None on a topic without history).
- Presence: `presence_add` / `presence_remove` / `presence` keep who is on a topic, with a
  JSON-able `info`. Entries of a closed or dead bus drop out of `presence` within
  `presence_ttl_s`; buses subscribed to the topic (rule with `presence`) sweep them out and,
  on a topic whose rule has `join_leave`, announce the `leave` within about twice that.
  On join_leave topics each change is delivered to the topic's subscribers, in order with
  its messages, through `on_presence`.

Implementations: `MemoryBus` (one process, `redis_url = "memory://"`), `RedisBus`
(`redis://`, `rediss://` or `unix://` URLs) and `RedisClusterBus` (`redis+cluster://h1:p1,
h2:p2,...`: sharded pub/sub on a Redis Cluster >= 7, one RedisBus per master), and
`RedisSentinelBus` (`redis+sentinel://s1:p1,s2:p2/service`: a RedisBus whose connections go
to the master Sentinel names). All pass one contract suite (tests/integration/
test_bus_contract.py, test_bus_cluster.py, test_bus_sentinel.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.envelope import BusMessage
from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.settings import Settings, TopicRule

MEMORY_URL = "memory://"
CLUSTER_SCHEME = "redis+cluster"  # broker/bus/redis_cluster.py
SENTINEL_SCHEME = "redis+sentinel"  # broker/bus/redis_sentinel.py

StatsValue = int | float | bool


MAX_KEY_CHARS = 64  # longest idempotency key (docs/protocol.md)
# A topic's epoch outlives its history's age bound: an idle topic keeps its epoch (offsets
# go on, readers learn history did not reach back) this many times history_ttl_s, and at
# least META_TTL_MIN_S; after that its next publish or read starts a new epoch.
META_TTL_FACTOR = 10
META_TTL_MIN_S = 3600.0
JOIN = "join"
LEAVE = "leave"


@dataclass(frozen=True, slots=True)
class Published:
    """What the bus tells a publisher. `offset`/`epoch` are set on topics with history."""

    offset: int | None = None
    epoch: str | None = None
    duplicate: bool = False  # the key matched an earlier publish: nothing was published now


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """One atomic read of a topic's position and, optionally, of its history."""

    messages: list[BusMessage]  # offset and epoch set, in offset order, all offsets > after
    offset: int  # the topic's top offset (0: nothing published in this epoch yet)
    epoch: str  # the topic's epoch ("" for a topic without history)
    complete: bool  # `messages` holds every message in (after, offset] of this epoch


NO_HISTORY = HistoryRead([], 0, "", False)  # compare with ==; buses return a fresh one


def no_history() -> HistoryRead:
    """What `history` returns for a topic without history (equal to NO_HISTORY)."""
    return HistoryRead([], 0, "", False)


def new_epoch() -> str:
    """A fresh epoch: 16 lowercase hex characters."""
    return secrets.token_hex(8)


def meta_ttl_s(rule: TopicRule) -> float:
    """How long an idle topic keeps its epoch; 0 (forever) when history has no age bound."""
    if rule.history_ttl_s <= 0:
        return 0.0
    return max(META_TTL_FACTOR * rule.history_ttl_s, META_TTL_MIN_S)


def info_json(info: dict[str, Any]) -> str:
    """Compact JSON for presence `info`; ValueError when it is not a JSON-able dict."""
    if not isinstance(info, dict):
        raise ValueError("presence info must be a dict")
    try:
        return json.dumps(info, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"presence info is not JSON-able: {exc}") from None


def check_key(key: str | None) -> None:
    """ValueError unless `key` is None or a 1..MAX_KEY_CHARS character idempotency key."""
    if key is not None and (type(key) is not str or not 0 < len(key) <= MAX_KEY_CHARS):
        raise ValueError(f"an idempotency key is 1 to {MAX_KEY_CHARS} characters")


def check_history_args(after: int | None, limit: int | None) -> None:
    """ValueError for a negative `after` or a `limit` below 1."""
    if after is not None and (type(after) is not int or after < 0):
        raise ValueError("`after` is an offset: an int >= 0")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ValueError("`limit` must be an int >= 1")


def _ignore_messages(batch: list[BusMessage]) -> None:
    pass


def _ignore_gap(topics: frozenset[str]) -> None:
    pass


def _ignore_health(healthy: bool) -> None:
    pass


def _ignore_presence(topic: str, kind: str, client_id: str, info: dict[str, Any]) -> None:
    pass


def no_topics() -> Collection[str]:
    """The default `Bus.wanted_topics`: nothing to resubscribe."""
    return ()


class Bus(ABC):
    """Topics in, batches of messages out. The owner (hub) owns the topic set.

    `wanted_topics` and the callbacks are set by the owner before `start()` and are called
    from the event loop; an exception they raise is logged and does not stop the bus.
    """

    # the topics to subscribe after each (re)connection: the owner's set, read each time
    wanted_topics: Callable[[], Collection[str]]

    on_messages: Callable[[list[BusMessage]], None]  # a batch, in arrival order
    on_gap: Callable[[frozenset[str]], None]  # topics whose delivery may have skipped messages
    on_health: Callable[[bool], None]  # `healthy` flipped to this value
    # (topic, JOIN or LEAVE, client_id, info): a presence change on a subscribed join_leave
    # topic, delivered in order with the topic's messages
    on_presence: Callable[[str, str, str, dict[str, Any]], None]

    def __init__(self) -> None:
        self.wanted_topics = no_topics
        self.on_messages = _ignore_messages
        self.on_gap = _ignore_gap
        self.on_health = _ignore_health
        self.on_presence = _ignore_presence

    @abstractmethod
    async def start(self) -> None:
        """Connect; returns when live or when the first attempt failed (then keeps retrying)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect for good; pending publishes and subscribes fail with BusUnavailable."""

    @abstractmethod
    async def subscribe(self, topics: Collection[str]) -> None:
        """Subscribe `topics` on the current connection; returns once Redis confirmed.

        Concurrent calls are coalesced into one command. Raises BusUnavailable while
        disconnected or when the connection is lost before the confirmation; a failed call
        leaves nothing behind (after a reconnection only `wanted_topics()` is subscribed).
        """

    @abstractmethod
    async def unsubscribe(self, topics: Collection[str]) -> None:
        """Drop `topics`; no message on them is delivered once this is called. Harmless for
        a topic that is not subscribed, and never fails: a lost connection drops them too."""

    @abstractmethod
    async def publish(self, message: BusMessage, *, key: str | None = None) -> Published:
        """Send `message` to every subscriber of its topic.

        On a topic with history the result has the message's offset and epoch (its own
        `offset`/`epoch` fields are ignored). `key` (1..64 characters, else ValueError), on
        any topic: a publish with a key already used on this topic within
        `idempotency_ttl_s` publishes nothing and returns the first one's result with
        `duplicate=True` (offset and epoch None on a topic without history).
        BusUnavailable: it was not published (a retry is safe). BusOutcomeUnknown: it was
        written and no reply came, it may have been published: retry only with the same
        key. Bounded in time: it never hangs. Cancelled before it was written: never sent.
        """

    def publish_nowait(
        self,
        message: BusMessage,
        *,
        key: str | None = None,
        settled: Callable[[asyncio.Future[Published]], None] | None = None,
    ) -> asyncio.Future[Published]:
        """`publish` without a coroutine for the caller to run: a future with its outcome,
        the same results and errors, bounded in time the same way; cancelling it before the
        command was written means it is never sent. Buses with a cheaper way override it
        (the Redis bus queues the command at once); this one runs `publish` as a task.

        `settled`, if given, may be called with the future as soon as it is done, before
        its done callbacks run (the Redis bus does, as it reads the reply: one loop turn
        sooner). A bus may also never call it: the caller keeps its done callback, and
        handles each future once."""
        return asyncio.ensure_future(self.publish(message, key=key))

    @abstractmethod
    async def history(
        self, topic: str, *, after: int | None, epoch: str | None, limit: int | None = None
    ) -> HistoryRead:
        """The topic's position and, when `after` is given, the messages after it.

        One atomic step. `after=None`: the position only (`messages` empty, `complete`
        True); a topic that has no epoch yet gets one, which its first publish keeps.
        Otherwise, when `epoch` is the topic's epoch, the messages with offsets after
        `after` that history still holds (at most `limit`, default `history_read_limit`;
        entries older than `history_ttl_s` are gone); `complete` is False when the epoch
        differs (then `messages` is empty), history no longer reaches `after + 1`, or the
        limit cut the read. A topic without history: `NO_HISTORY` (offset 0, epoch "",
        complete False). BusUnavailable during an outage.
        """

    @abstractmethod
    async def presence_add(self, topic: str, client_id: str, info: dict[str, Any]) -> None:
        """Put `client_id` in the topic's presence with `info` (JSON-able, else ValueError).

        Announces `join` on a join_leave topic when the client was not present. While
        disconnected this raises BusUnavailable, but the entry stays wanted and is written
        once Redis is back.
        """

    @abstractmethod
    async def presence_remove(self, topic: str, client_id: str) -> None:
        """Take `client_id` out of the topic's presence (announcing `leave` on a join_leave
        topic when it was present). BusUnavailable while disconnected; it is retried."""

    @abstractmethod
    async def presence(self, topic: str) -> dict[str, dict[str, Any]]:
        """client_id -> info of the topic's live entries (those of dead buses are dropped)."""

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """True when subscriptions are live and publishing works."""

    @abstractmethod
    def stats(self) -> dict[str, StatsValue]:
        """Counters and gauges; at least the keys in `STATS_KEYS`."""


STATS_KEYS = (
    "healthy",
    "reconnects",
    "gaps",
    "messages_in",
    "malformed",
    "published",
    "publish_batches",
    "publish_errors",
    "subscribe_commands",
    "subscribed_channels",
    "last_probe_rtt_s",
)


def make_bus(settings: Settings, origin: str) -> Bus:
    """The bus `settings.redis_url` names; `origin` identifies this publisher (worker id)."""
    url = settings.redis_url
    if url is None:
        raise ConfigError("no bus URL: the supervisor sets redis_url before starting workers")
    if url == MEMORY_URL:
        from broker.bus.memory import MemoryBus

        return MemoryBus(origin, settings=settings)
    if url.startswith(CLUSTER_SCHEME + "://"):
        from broker.bus.redis_cluster import RedisClusterBus

        return RedisClusterBus(url, settings, origin)
    if url.startswith(SENTINEL_SCHEME + "://"):
        from broker.bus.redis_sentinel import RedisSentinelBus

        return RedisSentinelBus(url, settings, origin)
    from broker.bus.redis import RedisBus

    return RedisBus(url, settings, origin)
