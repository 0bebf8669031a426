"""The echo application: every message comes back as it was sent (`redwire echo`).

It runs on exactly the broker's code path (handshake, codec, state machine, compression),
so it is the target of the conformance and interop tests and the smallest runnable example.
"""

from __future__ import annotations

from typing import Any

from broker.handshake import Request, http_response
from worker.protocol import WebSocket

_PAGE = b"""<!doctype html><meta charset="utf-8"><title>redwire echo</title>
<p>redwire echo server: open a WebSocket to this address and every message comes back.</p>
"""


class EchoSession:
    __slots__ = ("ws",)

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    def on_message(self, data: str | bytes) -> None:
        self.ws.send(data)

    def on_close(self, code: int, reason: str) -> None:
        pass


class EchoApp:
    subprotocols: tuple[str, ...] = ()
    default_subprotocol: str | None = None

    async def http(self, request: Request) -> bytes:
        if request.path == "/healthz":
            return http_response(200, b'{"status":"ok"}', content_type="application/json")
        if request.path == "/" and request.method in ("GET", "HEAD"):
            return http_response(200, _PAGE, content_type="text/html; charset=utf-8")
        return http_response(404, b"not found\n")

    async def authorize(self, request: Request) -> Any:
        return None

    def open_session(self, ws: WebSocket) -> EchoSession:
        return EchoSession(ws)
