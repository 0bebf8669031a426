"""A worker's listening side: accept connections, track them, drain them on shutdown.

`Server.start` listens on a socket handed over by the supervisor (inherited file
descriptor), or binds `host:port` itself (with SO_REUSEPORT when several workers share a
port). `Server.drain` is the graceful stop: stop accepting, send close 1001 to every open
WebSocket, wait for them to go, and drop what is left when `drain_timeout_s` runs out.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from broker import errors
from broker.settings import Settings
from worker.protocol import ServerApp, WebSocket

log = logging.getLogger("redwire.worker")


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
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(
                self._make_protocol, sock=sock, backlog=self.settings.listen_backlog
            )
        else:
            self._server = await loop.create_server(
                self._make_protocol,
                host=self.settings.host,
                port=self.settings.port,
                reuse_port=reuse_port or None,
                backlog=self.settings.listen_backlog,
            )
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop accepting, close every client with 1001, wait, then drop the rest."""
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        if self._server is not None:
            self._server.close()
        for ws in list(self.connections):
            if ws.is_open:
                ws.close(errors.CLOSE_GOING_AWAY, "server shutting down")
            elif ws.conn is None:
                ws.abort()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain timeout: dropping %d connection(s)", len(self.connections))
            for ws in list(self.connections):
                ws.abort()
