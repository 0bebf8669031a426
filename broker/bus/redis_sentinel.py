"""The Redis bus behind Sentinel: a RedisBus whose connections go to the current master.

URL: `redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db][?query]`:
the Sentinels to ask, the name they monitor (`sentinel monitor <service_name> ...`), the
database (default 0). The credentials and the query are the master's; the Sentinels are
asked without a password.

Theory of operation. Everything is RedisBus (broker/bus/redis.py): one subscriber session
and one publisher, reconnects with backoff, resubscription of `wanted_topics()` with gap
reports, the probe, the scripts and their epoch rules. Only where a connection goes
changes: each new connection (redis-py's `SentinelManagedConnection`) asks the Sentinels
for the master of `service_name` as it connects (a master they see as down is refused), so
after a failover the next reconnect of each connection reaches the promoted replica. A
connection still open to a demoted master fails on its first write (READONLY) and is made
again. The promoted replica reports `master_replid2` (it took over another master's
history), so history topics start a new epoch there: writes the old master acknowledged may
be missing, and subscribers are told so (broker/bus/lua.py, "Epochs").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from broker.bus.redis import RedisBus, split_hosts_url
from broker.errors import ConfigError
from broker.settings import Settings

SCHEME = "redis+sentinel"


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """(the Sentinels' (host, port)s, the service name, the master's connection kwargs)."""
    parts, userinfo, sentinels = split_hosts_url(url, SCHEME, "Sentinel")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(f"bad {SCHEME}:// URL: the path is /service_name or /service_name/db")
    auth = userinfo + "@" if userinfo else ""
    query = "?" + parts.query if parts.query else ""
    db = path[1] if len(path) == 2 else "0"
    try:
        kwargs = dict(parse_url(f"redis://{auth}sentinel-master/{db}{query}"))
    except ValueError as exc:
        raise ConfigError(f"bad {SCHEME}:// URL: {exc}") from None
    for name in ("host", "port", "connection_class"):
        kwargs.pop(name, None)
    return sentinels, path[0], kwargs


class RedisSentinelBus(RedisBus):
    """RedisBus on the master Sentinel names; see the module docstring."""

    def __init__(self, url: str, settings: Settings, origin: str) -> None:
        self._pools: list[SentinelConnectionPool] = []  # the connections hold weak proxies
        super().__init__(url, settings, origin)

    def _connections(
        self, url: str, client_name: str, connect_timeout_s: float
    ) -> Callable[[], AbstractConnection]:
        sentinels, service, kwargs = parse_sentinel_url(url)
        timeouts = {
            "socket_timeout": connect_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
        }
        manager = Sentinel(sentinels, sentinel_kwargs=timeouts)
        kwargs.update(
            protocol=2,  # as RedisBus: pub/sub messages as plain arrays
            socket_timeout=None,  # every wait is bounded by the bus' own asyncio.timeout
            socket_connect_timeout=connect_timeout_s,
            client_name=client_name,
        )
        pool = SentinelConnectionPool(service, manager, **kwargs)
        self._pools.append(pool)
        return lambda: SentinelManagedConnection(**pool.connection_kwargs)
