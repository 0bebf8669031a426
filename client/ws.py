"""An asyncio WebSocket client on Redwire's own Sans-I/O core (client role: masking).

    ws = await connect("ws://127.0.0.1:8765/", subprotocols=["redwire.json"])
    await ws.send("hello")
    reply = await ws.recv()
    await ws.close()

The opening handshake is `broker.handshake` in client role, frames go through
`broker.connection.Connection(Role.CLIENT)`. Received messages wait in a bounded queue;
when it is full the client stops reading from the socket (back-pressure). Every wait has a
timeout; a lost connection raises `ConnectionClosedError` with the close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from urllib.parse import urlsplit

from broker import errors
from broker.connection import (
    BinaryMessage,
    CloseReceived,
    Connection,
    ConnectionFailed,
    ConnectionLost,
    Ping,
    Pong,
    Role,
    State,
    TextMessage,
)
from broker.deflate import PerMessageDeflate
from broker.errors import ConnectionClosedError, HandshakeError
from broker.handshake import ResponseParser, check_response, client_request, new_key
from broker.settings import Settings

_DEFAULTS = Settings()


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, max_queue: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.parser: ResponseParser | None = ResponseParser()
        self.response = None
        self.conn: Connection | None = None
        self.messages: deque[str | bytes] = deque()
        self.max_queue = max_queue
        self.readable = asyncio.Event()
        self.closed = asyncio.Event()
        self.pongs: deque[tuple[bytes, asyncio.Future[None]]] = deque()
        self.paused = False
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.conn is None:
            assert self.parser is not None
            try:
                response = self.parser.feed(data)
            except HandshakeError as exc:
                if not self.handshake.done():
                    self.handshake.set_exception(exc)
                return
            if response is not None and not self.handshake.done():
                self.response = response
                self.handshake.set_result(self.parser.leftover)
            return
        self.feed(data)

    def feed(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        transport = self.transport
        for event in conn.receive_data(data):
            kind = type(event)
            if kind is TextMessage or kind is BinaryMessage:
                self.messages.append(event.data)
                if len(self.messages) >= self.max_queue and not self.paused:
                    self.paused = True
                    self.transport.pause_reading()  # type: ignore[union-attr]
            elif kind is Ping:
                if transport is not None:
                    transport.write(conn.pong(event))
            elif kind is Pong:
                while self.pongs:
                    payload, waiter = self.pongs.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
                    if payload == event.payload:
                        break
            elif kind is CloseReceived:
                if transport is not None:
                    transport.write(conn.close_reply())
                self.closed.set()
            elif kind is ConnectionFailed:
                if transport is not None:
                    transport.write(conn.fail_frame(event))
                    transport.close()
                self.closed.set()
            elif kind is ConnectionLost:
                self.closed.set()
        self.readable.set()

    def eof_received(self) -> bool | None:
        if self.conn is not None:
            self.feed(b"")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(
                ConnectionClosedError(errors.CLOSE_ABNORMAL, "connection lost during handshake")
            )
        if self.conn is not None:
            self.conn.state = State.CLOSED
        self.closed.set()
        self.readable.set()
        self.writable.set()
        for _, waiter in self.pongs:
            if not waiter.done():
                waiter.set_exception(ConnectionClosedError(*self.close_info()))
        self.pongs.clear()

    def close_info(self) -> tuple[int, str]:
        conn = self.conn
        if conn is not None and conn.close_received is not None:
            return conn.close_received
        return errors.CLOSE_ABNORMAL, ""


class WebSocketClient:
    """An open client connection. Use `connect()` to make one."""

    def __init__(self, protocol: _ClientProtocol, subprotocol: str | None, close_timeout_s: float):
        self._p = protocol
        self.subprotocol = subprotocol
        self.close_timeout_s = close_timeout_s

    @property
    def conn(self) -> Connection:
        assert self._p.conn is not None
        return self._p.conn

    @property
    def open(self) -> bool:
        return self.conn.state is State.OPEN

    @property
    def close_code(self) -> int | None:
        return self._p.close_info()[0] if self._p.closed.is_set() else None

    @property
    def close_reason(self) -> str:
        return self._p.close_info()[1]

    def _write(self, data: bytes) -> None:
        transport = self._p.transport
        if transport is None or transport.is_closing():
            raise ConnectionClosedError(*self._p.close_info())
        transport.write(data)

    async def send(self, data: str | bytes) -> None:
        """Send one message: text for str, binary for bytes."""
        self.send_nowait(data)
        await self.drain()

    def send_nowait(self, data: str | bytes) -> None:
        """Write one message without waiting for the write buffer to drain (call `drain()`
        afterwards): the message is written, or ConnectionClosedError says it was not."""
        try:
            frame = (
                self.conn.send_text(data) if isinstance(data, str) else self.conn.send_binary(data)
            )
        except ConnectionClosedError:
            raise ConnectionClosedError(*self._p.close_info()) from None
        self._write(frame)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if not self._p.writable.is_set():
            async with asyncio.timeout(self.close_timeout_s * 12):
                await self._p.writable.wait()

    async def recv(self, timeout_s: float | None = None) -> str | bytes:
        """The next message; ConnectionClosedError once the connection is closed."""
        p = self._p
        async with asyncio.timeout(timeout_s):
            while not p.messages:
                if p.closed.is_set():
                    raise ConnectionClosedError(*p.close_info())
                p.readable.clear()
                await p.readable.wait()
        message = p.messages.popleft()
        if p.paused and len(p.messages) < p.max_queue // 2:
            p.paused = False
            if p.transport is not None:
                p.transport.resume_reading()
        return message

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosedError:
                return

    async def ping(self, payload: bytes = b"", timeout_s: float = 10.0) -> None:
        """Send a ping and wait for its pong."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._p.pongs.append((payload, waiter))
        self._write(self.conn.send_ping(payload))
        async with asyncio.timeout(timeout_s):
            await waiter

    async def close(self, code: int = errors.CLOSE_NORMAL, reason: str = "") -> None:
        """Closing handshake: send close, wait for the server's, then for TCP to end."""
        p = self._p
        if p.conn is not None and p.conn.state is State.OPEN and p.transport is not None:
            p.transport.write(p.conn.close(code, reason))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.close_timeout_s):
                await p.closed.wait()
        if p.transport is not None:
            # Section 7.1.1: the server closes TCP first; we stop waiting after a bound.
            if p.conn is not None and p.conn.state is not State.CLOSED:
                p.transport.abort()
            else:
                p.transport.close()

    async def __aenter__(self) -> WebSocketClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def connect(
    url: str,
    *,
    subprotocols: Sequence[str] = (),
    compression: bool = True,
    max_message_bytes: int = _DEFAULTS.max_message_bytes,
    open_timeout_s: float = _DEFAULTS.handshake_timeout_s,
    close_timeout_s: float = _DEFAULTS.close_timeout_s,
    max_queue: int = 4096,
    origin: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
    ssl: ssl_module.SSLContext | None = None,
) -> WebSocketClient:
    """Open a WebSocket to a `ws://` or `wss://` URL. For wss://, `ssl` is the context
    that checks the server's certificate (None: the system's trusted CAs, host name
    checked); giving one for a ws:// URL is a ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use ws:// or wss://")
    secure = parts.scheme == "wss"
    if ssl is not None and not secure:
        raise ValueError("an ssl context was given for a ws:// URL: use wss://")
    context = (ssl or ssl_module.create_default_context()) if secure else None
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    key = new_key()
    async with asyncio.timeout(open_timeout_s):
        transport, protocol = await loop.create_connection(
            lambda: _ClientProtocol(max_queue),
            host,
            port,
            ssl=context,
            server_hostname=host if secure else None,
        )
        try:
            transport.write(
                client_request(
                    host,
                    port,
                    path,
                    key=key,
                    subprotocols=subprotocols,
                    compression=compression,
                    origin=origin,
                    extra_headers=extra_headers,
                )
            )
            leftover = await protocol.handshake
            established = check_response(
                protocol.response, key=key, subprotocols=subprotocols, compression=compression
            )
        except BaseException:
            transport.abort()
            raise
    deflate = None
    if established.deflate is not None:
        deflate = PerMessageDeflate(
            established.deflate,
            is_server=False,
            level=_DEFAULTS.compression_level,
            min_bytes=_DEFAULTS.compression_min_bytes,
            max_message_bytes=max_message_bytes,
        )
    protocol.conn = Connection(Role.CLIENT, max_message_bytes=max_message_bytes, deflate=deflate)
    protocol.parser = None
    if leftover:
        protocol.feed(leftover)
    return WebSocketClient(protocol, established.subprotocol, close_timeout_s)
