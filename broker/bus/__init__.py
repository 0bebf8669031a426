"""The message bus: how a worker hears what every worker publishes. Interface and factory.

Theory of operation. The hub owns reference counts (which topics have local subscribers);
the bus owns the channel set: it subscribes a topic on the hub's first `subscribe`, drops it
on `unsubscribe`, and hands every publication it receives to `on_messages` in batches, in
arrival order, from the event loop. A bus never re-encodes a payload.

When delivery may have skipped messages (the connection was lost and came back, or a
silently dead subscription was detected and replaced), the bus calls `on_gap` with the
topics concerned; `on_health` reports each flip of `healthy`. Publishing while the bus
cannot deliver raises `BusUnavailable`: a publish is never dropped silently.

Implementations: `MemoryBus` (one process, `redis_url = "memory://"`) and `RedisBus`
(`redis://`, `rediss://` or `unix://` URLs). Both pass one contract suite
(tests/integration/test_bus_contract.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.envelope import BusMessage
from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.settings import Settings

MEMORY_URL = "memory://"

StatsValue = int | float | bool


@dataclass(frozen=True, slots=True)
class Published:
    """What the bus tells a publisher; both fields are reserved for per-topic history."""

    offset: int | None = None
    epoch: str | None = None


def _ignore_messages(batch: list[BusMessage]) -> None:
    pass


def _ignore_gap(topics: frozenset[str]) -> None:
    pass


def _ignore_health(healthy: bool) -> None:
    pass


class Bus(ABC):
    """Topics in, batches of messages out. The hub owns refcounts; the bus owns the channel set.

    The three callbacks are set by the hub before `start()` and are called from the event
    loop; an exception they raise is logged and does not stop the bus.
    """

    on_messages: Callable[[list[BusMessage]], None]  # a batch, in arrival order
    on_gap: Callable[[frozenset[str]], None]  # topics whose delivery may have skipped messages
    on_health: Callable[[bool], None]  # `healthy` flipped to this value

    def __init__(self) -> None:
        self.on_messages = _ignore_messages
        self.on_gap = _ignore_gap
        self.on_health = _ignore_health

    @abstractmethod
    async def start(self) -> None:
        """Connect; returns when live or when the first attempt failed (then keeps retrying)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect for good; pending publishes and subscribes fail with BusUnavailable."""

    @abstractmethod
    async def subscribe(self, topics: Collection[str]) -> None:
        """Add `topics`; returns once their subscription is live.

        Concurrent calls are coalesced into one command. While disconnected this raises
        BusUnavailable, but the topics stay wanted and are subscribed on reconnect.
        """

    @abstractmethod
    async def unsubscribe(self, topics: Collection[str]) -> None:
        """Drop `topics`; no message on them is delivered once this is called."""

    @abstractmethod
    async def publish(self, message: BusMessage) -> Published:
        """Send `message` to every subscriber of its topic; BusUnavailable during an outage."""

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

        return MemoryBus(origin)
    from broker.bus.redis import RedisBus

    return RedisBus(url, settings, origin)
