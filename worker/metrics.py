"""Prometheus metrics for every worker, whichever worker answers the scrape.

The supervisor points `PROMETHEUS_MULTIPROC_DIR` at a directory shared by its workers
(prometheus_client's multiprocess mode); each worker copies its plain `WorkerStats` and
bus counters into prometheus metrics once a second (and at each scrape), so the hot path
never touches prometheus. A worker run on its own (no such directory) exports just itself.
Every series carries a `worker` label, and every one in the tables below exists (at 0)
from the first scrape, so an alert on it always has a series to look at.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.stats import WorkerStats

_COUNTERS = {
    "connections_accepted": "WebSocket connections accepted",
    "messages_in": "messages received from the bus",
    "deliveries": "message frames sent to subscribers",
    "bytes_out": "bytes of message frames sent to subscribers",
    "frames_in": "requests received from clients",
    "publishes": "publishes accepted onto the bus",
    "publish_errors": "publishes refused because the bus failed",
    "client_errors": "error replies sent to clients",
    "slow_consumer_closes": "clients closed with 1013 for falling behind",
    "error_flood_closes": "clients closed with 1008 for sending too many bad requests",
    "undeliverable": "messages skipped for subscribers whose encoding cannot carry them",
    "gap_repairs": "topic gaps filled from history (or tried)",
    "gaps_announced": "gap frames sent because history could not fill a gap",
    "recoveries": "subscribes with since that recovered every missed message",
    "recoveries_failed": "subscribes with since answered recovered: false",
    "rate_limited": "publishes refused with rate_limited (over publish_rate_per_s)",
    "idle_closes": "WebSockets closed 1008 idle (nothing sent for idle_timeout_s)",
    "partial_input_closes": "WebSockets closed 1013: the worker's partial input bytes were full",
    "tokens_refused": "WebSocket upgrades refused for a bad or missing connection token",
    "token_refreshes": "connection tokens replaced by a refresh request",
    "token_expired_closes": "WebSockets closed 4001: no new token by its exp",
    "forbidden": "requests refused with forbidden (topic rules or token claims)",
}
# Counters with a `reason` label as well: metric -> (help, {reason: WorkerStats field}).
_REASON_COUNTERS = {
    "connections_refused": (
        "WebSocket upgrades refused by a connection cap",
        {
            "worker_full": "refused_worker_full",
            "per_ip": "refused_per_ip",
            "rate": "refused_rate",
        },
    ),
}
_GAUGES = {
    "connections": "open WebSocket connections",
    "subscriptions": "client subscriptions",
}
_BUS_COUNTERS = {
    "reconnects": "bus reconnections",
    "gaps": "bus subscription interruptions that may have lost messages",
}


class Metrics:
    def __init__(
        self, worker_id: str, stats: WorkerStats, bus_stats: Callable[[], dict[str, object]]
    ) -> None:
        self.worker_id = worker_id
        self.stats = stats
        self.bus_stats = bus_stats
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._counters = {
            name: Counter(f"redwire_{_strip_total(name)}", doc, ["worker"], registry=reg)
            for name, doc in _COUNTERS.items()
        }
        self._bus_counters = {
            name: Counter(f"redwire_bus_{name}", doc, ["worker"], registry=reg)
            for name, doc in _BUS_COUNTERS.items()
        }
        self._gauges = {
            name: Gauge(
                f"redwire_{name}", doc, ["worker"], registry=reg, multiprocess_mode="livesum"
            )
            for name, doc in _GAUGES.items()
        }
        self._reason_counters = {
            name: Counter(f"redwire_{name}", doc, ["worker", "reason"], registry=reg)
            for name, (doc, _) in _REASON_COUNTERS.items()
        }
        self._bus_healthy = Gauge(
            "redwire_bus_healthy",
            "1 when the worker's bus subscription is live",
            ["worker"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self._seen: dict[str, float] = {}
        # Every series at 0 now: a labelled metric has no series until its labels are used.
        for metric in (
            *self._counters.values(),
            *self._bus_counters.values(),
            *self._gauges.values(),
            self._bus_healthy,
        ):
            metric.labels(worker_id)
        for name, (_, reasons) in _REASON_COUNTERS.items():
            for reason in reasons:
                self._reason_counters[name].labels(worker_id, reason)

    def sync(self) -> None:
        """Copy the plain counters into prometheus metrics (increments since last sync)."""
        wid = self.worker_id
        values = self.stats.as_dict()
        for name, counter in self._counters.items():
            self._add(name, counter, values[name], wid)
        bus = self.bus_stats()
        for name, counter in self._bus_counters.items():
            self._add("bus_" + name, counter, float(bus.get(name, 0)), wid)  # type: ignore[arg-type]
        for name, (_, reasons) in _REASON_COUNTERS.items():
            counter = self._reason_counters[name]
            for reason, field in reasons.items():
                delta = values[field] - self._seen.get(field, 0)
                if delta > 0:
                    counter.labels(wid, reason).inc(delta)
                    self._seen[field] = values[field]
        for name, gauge in self._gauges.items():
            gauge.labels(wid).set(values[name])
        self._bus_healthy.labels(wid).set(1 if bus.get("healthy") else 0)

    def _add(self, key: str, counter: Counter, value: float, wid: str) -> None:
        delta = value - self._seen.get(key, 0)
        if delta > 0:
            counter.labels(wid).inc(delta)
            self._seen[key] = value

    def render(self) -> tuple[bytes, str]:
        """The exposition text: every worker's metrics in multiprocess mode, else our own."""
        self.sync()
        return self._exposition(), CONTENT_TYPE_LATEST

    async def render_async(self) -> tuple[bytes, str]:
        """`render`, with the exposition built in a thread: in multiprocess mode it reads
        and parses every worker's files, which must not stall this worker's clients. The
        sync (our own counters into prometheus) stays on the loop, where the stats live."""
        self.sync()
        return await asyncio.to_thread(self._exposition), CONTENT_TYPE_LATEST

    def _exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def series_names() -> list[str]:
    """The name of every series this module exports (counters with their `_total`)."""
    names = [f"redwire_{_strip_total(n)}_total" for n in _COUNTERS]
    names += [f"redwire_bus_{n}_total" for n in _BUS_COUNTERS]
    names += [f"redwire_{n}_total" for n in _REASON_COUNTERS]
    names += [f"redwire_{n}" for n in _GAUGES]
    return [*names, "redwire_bus_healthy"]


def _strip_total(name: str) -> str:
    return name[: -len("_total")] if name.endswith("_total") else name
