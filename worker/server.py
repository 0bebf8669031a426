"""A worker's listening side: accept connections, track them, drain them on shutdown.

`Server.start` listens on a socket handed over by the supervisor (inherited file
descriptor), or binds `host:port` itself (with SO_REUSEPORT when several workers share a
port). `Server.drain` is the graceful stop: stop accepting, send close 1001 to every open
WebSocket, wait for them to go, and drop what is left when `drain_timeout_s` runs out.

`ConnectionLimits` is the worker's connection caps: `admit(ip)` takes a slot for one
WebSocket upgrade or raises the HTTP refusal (503 worker full, 429 too many from that
address, 503 over the upgrade rate), before any session exists; the slot is given back by
the callable it returns.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable
from typing import Any

from broker import errors
from broker.errors import HandshakeError
from broker.settings import Settings
from broker.tls import server_context
from broker.token_bucket import TokenBucket
from worker.protocol import ServerApp, WebSocket
from worker.stats import WorkerStats

log = logging.getLogger("redwire.worker")


class ConnectionLimits:
    """Open WebSockets per worker and per client IP (the TCP peer's address), capped by
    `max_connections_per_worker` and `max_connections_per_ip` (None: no cap)."""

    def __init__(self, settings: Settings, stats: WorkerStats) -> None:
        rate = settings.connection_rate_per_s
        self.rate = None if rate is None else TokenBucket(rate, settings.connection_burst)
        self.max_per_worker = settings.max_connections_per_worker
        self.max_per_ip = settings.max_connections_per_ip
        self.stats = stats
        self.open = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> Callable[[], None]:
        """Take a slot for a connection from `ip`; the returned callable gives it back
        (once, however often it is called). HandshakeError 503/429 when over a cap."""
        if self.max_per_worker is not None and self.open >= self.max_per_worker:
            self.stats.refused_worker_full += 1
            raise HandshakeError(
                503, "worker full: too many connections, retry later", [("Retry-After", "1")]
            )
        count = self.by_ip.get(ip, 0)
        if self.max_per_ip is not None and count >= self.max_per_ip:
            self.stats.refused_per_ip += 1
            raise HandshakeError(429, "too many connections from this address")
        wait_s = self.rate.take() if self.rate is not None else 0.0
        if wait_s > 0:
            self.stats.refused_rate += 1
            retry = str(max(1, math.ceil(wait_s)))
            raise HandshakeError(
                503, "too many new connections, retry later", [("Retry-After", retry)]
            )
        self.open += 1
        self.by_ip[ip] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            left = self.by_ip[ip] - 1
            if left:
                self.by_ip[ip] = left
            else:
                del self.by_ip[ip]

        return release


class InputBudget:
    """Bytes of partial input (incomplete frames and messages) all of the worker's
    WebSockets hold together, capped by `max_partial_input_bytes_per_worker` (None: no cap).
    Each connection reports its own holding as it changes (`change`); one that would pass
    the cap is refused (False), and the protocol closes it 1013."""

    def __init__(self, settings: Settings, stats: WorkerStats) -> None:
        self.cap = settings.max_partial_input_bytes_per_worker
        self.stats = stats
        self.held = 0

    def change(self, delta: int) -> bool:
        """Add `delta` (negative: released) to the total; False, adding nothing, when a
        growth would pass the cap."""
        if delta > 0 and self.cap is not None and self.held + delta > self.cap:
            self.stats.partial_input_closes += 1
            return False
        self.held += delta
        return True


class Server:
    def __init__(self, app: ServerApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.connections: set[WebSocket] = set()
        self._server: asyncio.AbstractServer | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def _make_protocol(self) -> WebSocket:
        ws = WebSocket(self.app, self.settings, on_lost=self._lost)
        self.connections.add(ws)
        self._idle.clear()
        return ws

    def _lost(self, ws: WebSocket) -> None:
        self.connections.discard(ws)
        if not self.connections:
            self._idle.set()

    async def start(
        self, *, sock: socket.socket | None = None, reuse_port: bool = False
    ) -> tuple[str, int]:
        """Listen; with `certfile` set, TLS on the same port (broker/tls.py), the TLS
        handshake bounded by `handshake_timeout_s` like the HTTP one."""
        loop = asyncio.get_running_loop()
        context = server_context(self.settings)
        tls: dict[str, Any] = {}
        if context is not None:
            tls = {"ssl": context, "ssl_handshake_timeout": self.settings.handshake_timeout_s}
        if sock is not None:
            self._server = await loop.create_server(
                self._make_protocol, sock=sock, backlog=self.settings.listen_backlog, **tls
            )
        else:
            self._server = await loop.create_server(
                self._make_protocol,
                host=self.settings.host,
                port=self.settings.port,
                reuse_port=reuse_port or None,
                backlog=self.settings.listen_backlog,
                **tls,
            )
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop accepting; let sessions answer what they took (publishes in flight get their
        acks), within half the timeout; close every client with 1001 after what is queued
        for it; wait for them to go, then drop the rest when the timeout runs out."""
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._server is not None:
            self._server.close()
        sessions = [ws.session for ws in self.connections if ws.is_open and ws.session]
        waits = [s.drain() for s in sessions if hasattr(s, "drain")]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), timeout_s / 2)
            except TimeoutError:
                log.warning("drain: some requests still unanswered after %.1fs", timeout_s / 2)
        for ws in list(self.connections):
            session = ws.session
            if ws.is_open and session is not None and hasattr(session, "close"):
                session.close(errors.CLOSE_GOING_AWAY, "server shutting down")
            elif ws.is_open:
                ws.close(errors.CLOSE_GOING_AWAY, "server shutting down")
            elif ws.conn is None:
                ws.abort()
        try:
            await asyncio.wait_for(self._idle.wait(), max(deadline - loop.time(), 0.0))
        except TimeoutError:
            log.warning("drain timeout: dropping %d connection(s)", len(self.connections))
            for ws in list(self.connections):
                ws.abort()
