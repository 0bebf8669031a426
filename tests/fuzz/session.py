"""The `session` fuzz target: pub/sub request frames (or HTTP) into a real worker.

Where the `wire` target stops at the decoded `Request`, this one sends the frames to a
`worker.broker_app.BrokerApp` on a `MemoryBus`, through the real `worker.protocol.WebSocket`
over a `socket.socketpair()`, as tests/unit/test_worker_socketpair.py does, and asks what
any client may ask: whatever it sends, the session answers (a `ping` after the frames gets
its `pong`), never fails (a 1011 close) and logs no error. One app and one connection per
encoding serve many inputs (a fresh connection every `RECONNECT_EVERY` inputs, or after
the server closed one), so a run keeps some state between inputs: a finding may need
the inputs before it (replay the saved one alone to see).

Input: flags byte (bit 0 msgpack, bit 1 permessage-deflate, bit 2 frames of the other
type, bit 3 raw frames), then records `[length][bytes]`, each one frame (JSON: the bytes as
UTF-8 text, undecodable bytes replaced); raw: records `[first byte][length][payload]`, sent
masked as they are (bad opcodes, fragments, RSV1 without deflate...): the worker may close
the connection (1002, 1007, 1009), but never fail it (1011) nor log an error. Flags bit 4:
the rest is one plain HTTP request on a new connection (the app has an API key and a
`static_dir`): never a 500, never closed without an answer, nothing logged.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import socket
from collections.abc import Coroutine
from typing import Any

from broker.bus.memory import MemoryBus
from broker.connection import (
    BinaryMessage,
    CloseReceived,
    Connection,
    ConnectionFailed,
    ConnectionLost,
    Ping,
    Role,
    TextMessage,
)
from broker.deflate import PerMessageDeflate
from broker.envelope import msgpack_dumps, msgpack_loads
from broker.errors import CLOSE_INTERNAL_ERROR, HandshakeError
from broker.handshake import (
    RequestParser,
    ResponseParser,
    check_response,
    client_request,
    new_key,
)
from broker.masking import apply_mask
from broker.settings import Settings, TopicRule
from worker import wire
from worker.broker_app import BrokerApp
from worker.protocol import WebSocket

from .common import MASK_KEY, STATIC_DIR, Finding, Reader

API_KEY = "fuzz-api-key"
SETTINGS = Settings(
    redis_url="memory://",
    ping_interval_s=None,
    idle_timeout_s=None,
    publish_rate_per_s=None,
    max_errors_per_window=1_000_000,
    max_subscriptions_per_connection=50,
    api_key=API_KEY,
    static_dir=str(STATIC_DIR),
    topics=(
        TopicRule("h.*", history_size=8),
        TopicRule("p.*", presence=True, join_leave=True),
        TopicRule("closed.*", allow_subscribe="none", allow_publish="none"),
    ),
)
DEADLINE_S = 60.0  # a hang guard only: an answer takes milliseconds
RECONNECT_EVERY = 200


class RawFrame(bytes):
    """Frame bytes written as they are (any first byte: opcode, FIN, RSV bits)."""

    @classmethod
    def build(cls, b0: int, payload: bytes) -> RawFrame:
        n = len(payload)
        head = bytes((b0, 0x80 | n)) if n < 126 else bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
        return cls(head + MASK_KEY + (apply_mask(payload, MASK_KEY) if payload else b""))


class _ErrorLog(logging.Handler):
    """Every ERROR (or worse) record the broker logs while an input runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Client:
    """Our end of one socketpair: a client-role Connection over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn: Connection | None = None
        self.binary = False
        self.closed: int | None = None  # the close code, once the server closed
        self.pending: list[Any] = []  # events read with the handshake's response

    async def handshake(self, *, binary: bool, compression: bool) -> None:
        key = new_key()
        protocols = [wire.SUBPROTOCOL_MSGPACK if binary else wire.SUBPROTOCOL_JSON]
        request = client_request(
            "fuzz.test", 80, "/ws", key=key, subprotocols=protocols, compression=compression
        )
        self.writer.write(request)
        parser = ResponseParser()
        response = None
        while response is None:
            data = await self.reader.read(65536)
            if not data:
                raise Finding("the worker closed during the handshake")
            response = parser.feed(data)
        established = check_response(
            response, key=key, subprotocols=protocols, compression=compression
        )
        deflate = None
        if established.deflate is not None:
            deflate = PerMessageDeflate(
                established.deflate,
                is_server=False,
                level=1,
                min_bytes=0,
                max_message_bytes=SETTINGS.max_message_bytes,
            )
        self.conn = Connection(
            Role.CLIENT, max_message_bytes=SETTINGS.max_message_bytes, deflate=deflate
        )
        self.binary = binary
        self.pending = list(self.conn.receive_data(parser.leftover)) if parser.leftover else []

    def send(self, data: str | bytes) -> None:
        assert self.conn is not None
        if self.closed is None:
            if isinstance(data, RawFrame):
                self.writer.write(data)
                return
            send = self.conn.send_text if isinstance(data, str) else self.conn.send_binary
            self.writer.write(send(data))  # type: ignore[arg-type]

    def request(self, obj: dict[str, Any]) -> None:
        self.send(msgpack_dumps(obj) if self.binary else wire._dumps(obj))

    async def until_reply(self, req_id: str | None) -> None:
        """Read (and drop) what arrives until the reply with `req_id` (None: the welcome),
        or the close."""
        assert self.conn is not None
        while self.closed is None:
            events, self.pending = self.pending, []
            if not events:
                data = await self.reader.read(65536)
                events = self.conn.receive_data(data)
            for event in events:
                if isinstance(event, Ping):
                    self.writer.write(self.conn.pong(event))
                elif isinstance(event, TextMessage | BinaryMessage):
                    data = event.data
                    frame = msgpack_loads(data) if isinstance(data, bytes) else wire._loads(data)
                    op = frame.get("op") if isinstance(frame, dict) else None
                    if req_id is None and op == "welcome":
                        return
                    if op in ("pong", "error") and frame.get("id") == req_id is not None:
                        return
                elif isinstance(event, CloseReceived | ConnectionFailed | ConnectionLost):
                    self.closed = event.code
                    return


class _Live:
    """The app and the connections kept between inputs, on one event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.log = _ErrorLog()
        self.app = self.loop.run_until_complete(self._start())
        self.clients: dict[tuple[bool, bool], tuple[_Client, asyncio.Transport, int]] = {}
        self.ids = itertools.count()
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the app and its tasks (at exit: nothing left pending)."""
        for client, transport, _ in self.clients.values():
            client.writer.close()
            transport.abort()
        self.clients.clear()
        self.loop.run_until_complete(self.app.stop())
        self.loop.close()

    async def _start(self) -> BrokerApp:
        app = BrokerApp(SETTINGS, worker_id="fz", bus=MemoryBus("fz"))  # on its own loop
        await app.start()
        return app

    async def _connect(self, binary: bool, compression: bool) -> tuple[_Client, Any]:
        server_sock, client_sock = socket.socketpair()
        transport, _ = await self.loop.connect_accepted_socket(
            lambda: WebSocket(self.app, SETTINGS), server_sock
        )
        reader, writer = await asyncio.open_connection(sock=client_sock)
        client = _Client(reader, writer)
        await client.handshake(binary=binary, compression=compression)
        return client, transport

    async def _drop(self, key: tuple[bool, bool]) -> None:
        client, transport, _ = self.clients.pop(key)
        client.writer.close()
        transport.abort()
        await asyncio.sleep(0)  # one loop turn: the server side sees the close

    async def http(self, raw: bytes) -> int | None:
        """Plain HTTP on a fresh connection: the response's status; None for a request our
        own parser (the worker's) finds incomplete: it would wait for its timeout."""
        try:
            if RequestParser.from_settings(SETTINGS).feed(raw) is None:
                return None
        except HandshakeError:
            pass  # refused at once: the refusal is looked at too
        server_sock, client_sock = socket.socketpair()
        transport, _ = await self.loop.connect_accepted_socket(
            lambda: WebSocket(self.app, SETTINGS), server_sock
        )
        reader, writer = await asyncio.open_connection(sock=client_sock)
        writer.write(raw)
        parser = ResponseParser(max_header_bytes=1 << 16, max_headers=1000)
        response = None
        try:
            async with asyncio.timeout(DEADLINE_S):
                while response is None:
                    data = await reader.read(65536)
                    if not data:
                        raise Finding("the worker closed without an HTTP response")
                    response = parser.feed(data)
        finally:
            writer.close()
            transport.abort()
        await asyncio.sleep(0)  # one loop turn: the server side sees the close
        return None if response is None else response.status

    async def run(
        self, binary: bool, compression: bool, frames: list[str | bytes], *, echo_ok: bool
    ) -> None:
        key = (binary, compression)
        entry = self.clients.get(key)
        if entry is not None and (entry[0].closed is not None or entry[2] >= RECONNECT_EVERY):
            await self._drop(key)
            entry = None
        if entry is None:
            client, transport = await self._connect(binary, compression)
            await client.until_reply(None)  # the welcome
            entry = (client, transport, 0)
        client, transport, uses = entry
        self.clients[key] = (client, transport, uses + 1)
        for frame in frames:
            client.send(frame)
        req_id = f"fz-{next(self.ids)}"
        client.request({"op": "ping", "id": req_id})
        async with asyncio.timeout(DEADLINE_S):
            await client.until_reply(req_id)
        if client.closed == CLOSE_INTERNAL_ERROR and not echo_ok:
            raise Finding("the session failed: closed 1011")


_live: _Live | None = None


def fuzz_session(data: bytes) -> None:
    """Frames a client sends into a live session: answered, never 1011, nothing logged.
    With flags bit 4, plain HTTP instead (/healthz, POST /publish, static files, upgrades):
    never a 500, nothing logged."""
    global _live
    if _live is None:
        _live = _Live()
    r = Reader(data)
    flags = r.byte()
    work: Coroutine[Any, Any, Any]
    if flags & 0x10:
        work = _live.http(r.rest())
    else:
        binary, compression, wrong = bool(flags & 1), bool(flags & 2), bool(flags & 4)
        frames: list[str | bytes] = []
        echo_ok = False  # we sent a close frame: its code comes back, 1011 included
        while r.left:
            if flags & 8:  # raw frames: [first byte][length][payload], whatever they break
                b0 = r.byte()
                frames.append(RawFrame.build(b0, r.take(r.byte())))
                echo_ok = echo_ok or b0 & 0x0F == 0x8
                continue
            raw = r.take(r.byte())
            text = raw.decode("utf-8", "replace")
            frames.append(text if binary == wrong else raw)
        work = _live.run(binary, compression, frames, echo_ok=echo_ok)
    log = _live.log
    log.records.clear()
    root = logging.getLogger()
    root.addHandler(log)
    try:
        status = _live.loop.run_until_complete(work)
    except TimeoutError:
        raise Finding(f"no answer within {DEADLINE_S:g} s") from None
    finally:
        root.removeHandler(log)
    if log.records:
        raise Finding("the worker logged an error:\n" + logging.Formatter().format(log.records[0]))
    if status == 500:
        raise Finding("HTTP 500")
