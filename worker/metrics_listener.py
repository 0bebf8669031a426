"""`/metrics` on its own address (`metrics_listen`, e.g. 127.0.0.1:9100), off the public port.

Every worker listens there with SO_REUSEPORT, as on the public port, and any of them answers
a scrape with every worker's series (prometheus multiprocess mode, worker/metrics.py). The
connection is the same `worker.protocol.WebSocket` with its HTTP parser, limits and
timeouts, serving an app with two routes: `GET /metrics` (the exposition, built in a thread)
and `GET /healthz` (this worker's health, for a probe that must not use the public port).
Anything else is a 404, an upgrade included: no WebSocket is served here. No TLS and no
`allowed_hosts` check on this address: it is meant for a private network or loopback.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from broker.errors import ConfigError, HandshakeError
from broker.handshake import Request, http_response
from worker.protocol import WebSocket

if TYPE_CHECKING:
    from worker.broker_app import BrokerApp


class MetricsApp:
    """The ServerApp of the metrics address (worker.protocol.ServerApp)."""

    subprotocols: tuple[str, ...] = ()
    default_subprotocol: str | None = None

    def __init__(self, broker: BrokerApp) -> None:
        self.broker = broker

    async def http(self, request: Request) -> bytes:
        if request.method not in ("GET", "HEAD"):
            return http_response(405, b"method not allowed\n", headers=[("Allow", "GET, HEAD")])
        if request.path == "/metrics":
            text, content_type = await self.broker.metrics.render_async()
            response = http_response(200, text, content_type=content_type)
        elif request.path == "/healthz":
            ok, _ = self.broker.health()
            response = http_response(200 if ok else 503, b"ok\n" if ok else b"unavailable\n")
        else:
            response = http_response(404, b"not found: this address serves /metrics\n")
        if request.method == "HEAD":
            return response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        return response

    async def authorize(self, request: Request) -> Any:
        raise HandshakeError(404, "no WebSocket here: this address serves /metrics")

    def open_session(self, ws: WebSocket) -> Any:  # never reached: authorize refuses
        raise HandshakeError(404, "no WebSocket here")


def split_listen(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def start(broker: BrokerApp) -> asyncio.AbstractServer:
    """Listen on `metrics_listen` (SO_REUSEPORT: every worker does). ConfigError when the
    address cannot be bound."""
    settings = broker.settings
    assert settings.metrics_listen is not None
    host, port = split_listen(settings.metrics_listen)
    plain = settings.replace(certfile=None, keyfile=None, allowed_hosts=())
    app = MetricsApp(broker)
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            lambda: WebSocket(app, plain), host=host, port=port, reuse_port=True, backlog=128
        )
    except OSError as exc:
        raise ConfigError(
            f"metrics_listen {settings.metrics_listen}: cannot listen there: {exc.strerror or exc}"
        ) from None
