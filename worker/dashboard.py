"""The live dashboard (`GET /dashboard`, docs/operations.md): who may see it, what it shows.

Each worker with an API key configured publishes a compact snapshot of itself once a second
to the reserved topic `$sys.stats` (`StatsPublisher`), through its bus like any publish, so
every worker of every replica sharing the Redis reaches every dashboard. The page
(worker/static/dashboard.html, dashboard.js) subscribes to it with `/redwire.js`, keeps the
last minutes per worker and draws them: the broker is its own demo. Without an API key
there is no dashboard (404) and nothing is published.

Numbers come from where they are counted already: `WorkerStats` (worker/stats.py, which
worker/metrics.py exports too), the bus's `stats()`, the hub's topic table. Rates are the
difference of two snapshots' totals over the time between them (`SnapshotBuilder`). Redis
latency is the round trip of the previous snapshot's own PUBLISH (timed here; the bus's
liveness probe runs only while nothing arrives, so its `last_probe_rtt_s`, also shown, can
be old). When the bus refuses the snapshot (`unavailable`), it is handed to this worker's
own subscribers instead, so a dashboard still sees its worker and `redis.healthy: false`.

Access, in one place each:
- `api_key_matches`: THE comparison with the API key (constant time), for `POST /publish`,
  `/dashboard` and the WebSocket.
- `presents_api_key`: a WebSocket upgrade (or page request) carries the key, as the `key`
  query parameter or as the cookie `/dashboard?key=...` sets (`COOKIE`, an HMAC of the key,
  HttpOnly, SameSite=Strict: the page's script never holds the key).
- `check_reserved_topic`: topics starting `$sys.` are the broker's: no client publishes to
  them; only a connection that presented the key subscribes; others get `forbidden`.

Snapshot (JSON, `"v": 1`), one per worker per second:

    {"v": 1, "instance": "3fa9c2d1", "worker": "0", "pid": 4242, "t": 1764650000.25,
     "interval_s": 1.0, "connections": 7, "subscriptions": 9, "topics": 3,
     "top_topics": [["chat.lobby", 5], ...],   # at most TOP_TOPICS, most subscribers first
     "totals": {"publishes": 120, "deliveries": 600, ...},   # since the worker started
     "rates": {"publishes": 12.0, "deliveries": 60.0, ...},  # per second over interval_s
     "redis": {"healthy": true, "rtt_ms": 0.41, "probe_rtt_ms": 0.3, "reconnects": 0,
               "gaps": 0}}

`rtt_ms` is null until a publish has been timed and after one failed. The dashboard's own
traffic is in the numbers: deliveries count its `$sys.stats` messages (one per worker per
second per dashboard); `publishes` does not count the snapshots.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusError, BusUnavailable, ClientError
from broker.handshake import Request, http_response
from broker.settings import Settings
from broker.tasks import spawn
from worker import wire

if TYPE_CHECKING:
    from worker.broker_app import BrokerApp

log = logging.getLogger("redwire.dashboard")

SYS_PREFIX = wire.SYS_PREFIX  # "$sys.": reserved topics
STATS_TOPIC = SYS_PREFIX + "stats"
INTERVAL_S = 1.0  # one snapshot per worker this often
TOP_TOPICS = 20  # topics per snapshot, most subscribers first (bounds its size)
COOKIE = "redwire_admin"
INSTANCE_ENV = "REDWIRE_INSTANCE"  # the supervisor start's id (broker/supervisor.py)

# WorkerStats fields a snapshot carries as totals; the first ones as rates too.
RATE_FIELDS = ("publishes", "deliveries", "messages_in", "bytes_out")
TOTAL_FIELDS = (
    *RATE_FIELDS,
    "connections_accepted",
    "publish_errors",
    "client_errors",
    "slow_consumer_closes",
    "error_flood_closes",
    "idle_closes",
    "rate_limited",
    "gaps_announced",
    "gap_repairs",
)
# Bus counters, as totals and rates named bus_<name>.
BUS_FIELDS = ("reconnects", "gaps")
EVENT_RATES = ("slow_consumer_closes", "gaps_announced", "bus_gaps")  # per second too


# --- access ----------------------------------------------------------------------------------


def api_key_matches(api_key: str | None, given: str | None) -> bool:
    """True when `given` is the configured API key (never when none is configured).

    The one comparison with the key, in constant time (`hmac.compare_digest`)."""
    if api_key is None or given is None:
        return False
    return hmac.compare_digest(given.encode(), api_key.encode())


def cookie_value(api_key: str) -> str:
    """What the dashboard cookie holds: an HMAC of the key (not the key, which also
    publishes over HTTP); it stops working when the key changes."""
    return hmac.new(api_key.encode(), b"redwire dashboard", hashlib.sha256).hexdigest()


def _query_key(request: Request) -> str | None:
    values = parse_qs(request.query, keep_blank_values=True).get("key")
    return values[-1] if values else None


def _cookie(request: Request) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    for header in request.header_values("cookie"):
        try:
            jar.load(header)
        except CookieError:  # a malformed header holds no key
            continue
    morsel = jar.get(COOKIE)
    return None if morsel is None else morsel.value


def presents_api_key(api_key: str | None, request: Request | None) -> bool:
    """The request carries the API key: `?key=<key>`, or the dashboard cookie."""
    if api_key is None or request is None:
        return False
    if api_key_matches(api_key, _query_key(request)):
        return True
    return api_key_matches(cookie_value(api_key), _cookie(request))


def check_reserved_topic(op: str, topic: str, admin: bool) -> None:
    """ClientError `forbidden` for what a client may not do on a reserved `$sys.` topic:
    publish (never), subscribe or ask presence (without the API key). Unsubscribe is free."""
    if not topic.startswith(SYS_PREFIX):
        return
    if op == "publish":
        raise ClientError(wire.FORBIDDEN, f"{SYS_PREFIX} topics are the broker's own")
    if op in ("subscribe", "presence") and not admin:
        raise ClientError(
            wire.FORBIDDEN, f"{SYS_PREFIX} topics need the API key (the key query parameter)"
        )


# --- the page --------------------------------------------------------------------------------

_NO_STORE = [("Cache-Control", "no-store"), ("Referrer-Policy", "no-referrer")]
_CSP = ("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:")
_HTML = "text/html; charset=utf-8"
_LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Redwire dashboard</title>
<link rel="icon" href="/favicon.ico"><link rel="stylesheet" href="/dashboard.css"></head>
<body class="login"><h1>Redwire dashboard</h1><p>{note}</p>
<form method="get" action="/dashboard" autocomplete="off">
<label for="key">API key</label> <input id="key" name="key" type="password" required>
<button type="submit">Open</button></form></body></html>
"""


def page(settings: Settings, request: Request, html: bytes) -> bytes:
    """The answer to `GET /dashboard`: 404 without an API key configured; with one, `html`
    to a request with the cookie, a 303 that sets the cookie to one with `?key=` right
    (so the key leaves the address bar), 401 and a form asking for the key otherwise."""
    api_key = settings.api_key
    if api_key is None:
        body = b"the dashboard is disabled: set api_key or api_key_file (docs/operations.md)\n"
        return http_response(404, body)
    given = _query_key(request)
    if given is not None:
        if not api_key_matches(api_key, given):
            return _login(401, "Wrong key.")
        cookie = f"{COOKIE}={cookie_value(api_key)}; Path=/; HttpOnly; SameSite=Strict"
        if settings.certfile is not None:
            cookie += "; Secure"
        headers = [("Location", "/dashboard"), ("Set-Cookie", cookie), *_NO_STORE]
        return http_response(303, b"", headers=headers)
    if not api_key_matches(cookie_value(api_key), _cookie(request)):
        return _login(401, "This page needs the API key (api_key or api_key_file).")
    return http_response(200, html, content_type=_HTML, headers=[*_NO_STORE, _CSP])


def _login(status: int, note: str) -> bytes:
    body = _LOGIN.format(note=note).encode()
    return http_response(status, body, content_type=_HTML, headers=[*_NO_STORE, _CSP])


# --- snapshots -------------------------------------------------------------------------------


def topic_counts(app: BrokerApp) -> dict[str, int]:
    """Subscribers per topic on this worker (live ones and those catching up)."""
    return {name: len(s.live) + len(s.replays) for name, s in app.hub.topics.items()}


def _ms(seconds: Any) -> float | None:
    return round(seconds * 1000, 3) if isinstance(seconds, int | float) else None


@dataclass(slots=True)
class SnapshotBuilder:
    """Builds one worker's snapshots; remembers the last totals to turn them into rates.
    Pure: times and numbers come in as arguments."""

    instance: str
    worker: str
    pid: int
    top: int = TOP_TOPICS
    _last: tuple[float, dict[str, int]] | None = None

    def build(
        self,
        *,
        now_s: float,
        wall_s: float,
        stats: Mapping[str, int],
        bus: Mapping[str, Any],
        topics: Mapping[str, int],
        rtt_s: float | None,
    ) -> dict[str, Any]:
        """The snapshot at monotonic time `now_s` (`wall_s`: Unix time, for the page)."""
        totals = {name: int(stats.get(name, 0)) for name in TOTAL_FIELDS}
        for name in BUS_FIELDS:
            value = bus.get(name, 0)
            totals[f"bus_{name}"] = int(value) if isinstance(value, int | float) else 0
        last, self._last = self._last, (now_s, totals)
        interval = None if last is None else now_s - last[0]
        rates: dict[str, float] = {}
        for name in (*RATE_FIELDS, *EVENT_RATES):
            delta = 0 if last is None else totals[name] - last[1].get(name, 0)
            per_s = delta / interval if interval and interval > 0 and delta > 0 else 0.0
            rates[name] = round(per_s, 3)
        ranked = sorted(topics.items(), key=lambda item: (-item[1], item[0]))[: self.top]
        return {
            "v": 1,
            "instance": self.instance,
            "worker": self.worker,
            "pid": self.pid,
            "t": round(wall_s, 3),
            "interval_s": None if interval is None else round(interval, 3),
            "connections": int(stats.get("connections", 0)),
            "subscriptions": int(stats.get("subscriptions", 0)),
            "topics": len(topics),
            "top_topics": [[name, count] for name, count in ranked],
            "totals": totals,
            "rates": rates,
            "redis": {
                "healthy": bool(bus.get("healthy")),
                "rtt_ms": _ms(rtt_s),
                "probe_rtt_ms": _ms(bus.get("last_probe_rtt_s")),
                "reconnects": totals["bus_reconnects"],
                "gaps": totals["bus_gaps"],
            },
        }


class StatsPublisher:
    """Publishes this worker's snapshot to `$sys.stats` every `INTERVAL_S` while running."""

    def __init__(self, app: BrokerApp, interval_s: float = INTERVAL_S) -> None:
        self.app = app
        self.interval_s = interval_s
        self.builder = SnapshotBuilder(os.environ.get(INSTANCE_ENV, ""), app.worker_id, os.getpid())
        self.rtt_s: float | None = None  # the last snapshot's PUBLISH round trip
        self.published = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = spawn(self._run(), name="dashboard-stats")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def snapshot(self) -> dict[str, Any]:
        app = self.app
        return self.builder.build(
            now_s=time.monotonic(),
            wall_s=time.time(),
            stats=app.stats.as_dict(),
            bus=app.bus.stats(),
            topics=topic_counts(app),
            rtt_s=self.rtt_s,
        )

    async def publish_once(self) -> None:
        """Build and publish one snapshot; bus trouble is recorded, never raised."""
        payload = json.dumps(self.snapshot(), separators=(",", ":")).encode()
        message = BusMessage(STATS_TOPIC, payload, ENCODING_JSON, self.app.worker_id)
        started = time.perf_counter()
        try:
            await self.app.bus.publish(message)
        except BusError as exc:
            self.rtt_s = None
            if isinstance(exc, BusUnavailable):  # not published: our own dashboards get it
                self.app.hub.deliver([message])
            return
        self.rtt_s = time.perf_counter() - started
        self.published += 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                await self.publish_once()
            except Exception:  # a bug here must not stop the next snapshot
                log.exception("dashboard snapshot failed")
            due += self.interval_s
            delay = due - loop.time()
            if delay < 0:  # late (a slow publish, a busy loop): skip, do not catch up
                due, delay = loop.time(), 0.0
            await asyncio.sleep(delay)
