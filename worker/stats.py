"""Plain counters of one worker, bumped on the hot path; `worker.metrics` exports them."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class WorkerStats:
    connections: int = 0  # open WebSocket sessions now
    connections_accepted: int = 0
    subscriptions: int = 0  # (session, topic) pairs now
    messages_in: int = 0  # messages read from the bus
    deliveries: int = 0  # message frames queued to clients
    bytes_out: int = 0  # bytes written to clients by the fan-out
    frames_in: int = 0  # client requests received
    publishes: int = 0  # publishes accepted onto the bus
    publish_errors: int = 0
    client_errors: int = 0  # error replies sent to clients
    slow_consumer_closes: int = 0
    error_flood_closes: int = 0
    undeliverable: int = 0  # messages a subscriber encoding could not carry (skipped)
    gap_repairs: int = 0  # topic gaps filled (or tried) from history
    gaps_announced: int = 0  # gap frames sent because history could not fill a gap
    recoveries: int = 0  # subscribes with `since` answered recovered: true
    recoveries_failed: int = 0  # ... answered recovered: false
    rate_limited: int = 0  # publishes refused with rate_limited (publish_rate_per_s)
    refused_worker_full: int = 0  # upgrades refused 503: max_connections_per_worker
    refused_per_ip: int = 0  # upgrades refused 429: max_connections_per_ip
    refused_rate: int = 0  # upgrades refused 503: connection_rate_per_s
    idle_closes: int = 0  # WebSockets closed 1008 "idle" (idle_timeout_s)
    partial_input_closes: int = 0  # closed 1013: max_partial_input_bytes_per_worker reached
    tokens_refused: int = 0  # upgrades refused 401/503: a bad or missing connection token
    token_refreshes: int = 0  # `refresh` requests that replaced a connection's token
    token_expired_closes: int = 0  # closed 4001: no new token by exp
    forbidden: int = 0  # requests refused with forbidden (topic rules, token claims)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
