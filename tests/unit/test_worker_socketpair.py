"""worker.protocol over `socket.socketpair()`: timers, back-pressure, and the pub/sub session.

One end of the pair is handed to `loop.connect_accepted_socket` with a real
`worker.protocol.WebSocket` (the echo app, or the broker app on a `MemoryBus`); the test
drives the other end with raw bytes or a client-role `broker.connection.Connection`. No TCP
port, no subprocess: everything runs on the test's event loop, so the protocol object can
be inspected directly. Waits are on events with timeouts; sleeps only where the passage of
time is the behaviour under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgpack
import pytest
from support.waiting import eventually

from broker import errors
from broker.bus.memory import MemoryBus
from broker.connection import (
    BinaryMessage,
    CloseReceived,
    Connection,
    ConnectionLost,
    Event,
    Ping,
    Role,
    TextMessage,
)
from broker.deflate import PerMessageDeflate
from broker.handshake import ResponseParser, check_response, client_request, new_key
from broker.settings import Settings
from worker.broker_app import BrokerApp
from worker.echo import EchoApp
from worker.protocol import WebSocket

# Small timers so the timer tests take a fraction of a second.
FAST = Settings(
    handshake_timeout_s=0.2,
    ping_interval_s=None,
    close_timeout_s=0.3,
)
WAIT_S = 3.0  # upper bound for anything that should happen "now"


class Peer:
    """The test's end of the socketpair: raw bytes, then a client-role Connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn: Connection | None = None
        self.events: deque[Event] = deque()
        self.subprotocol: str | None = None
        self.eof = False
        self.welcome: dict[str, Any] = {}
        self.stash: deque[dict[str, Any]] = deque()  # pub/sub frames read past by `reply`

    # --- raw bytes ---

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_all(self, timeout_s: float = WAIT_S) -> bytes:
        """Everything until the server closes the connection."""
        async with asyncio.timeout(timeout_s):
            return await self.reader.read()

    # --- WebSocket ---

    async def handshake(
        self,
        *,
        subprotocols: Sequence[str] = (),
        compression: bool = True,
        path: str = "/ws",
        early: bytes = b"",
    ) -> None:
        """Upgrade; `early` bytes (frames) are sent right behind the request."""
        key = new_key()
        request = client_request(
            "redwire.test", 80, path, key=key, subprotocols=subprotocols, compression=compression
        )
        self.write(request + early)
        parser = ResponseParser()
        async with asyncio.timeout(WAIT_S):
            response = None
            while response is None:
                data = await self.reader.read(65536)
                assert data, "connection closed during the handshake"
                response = parser.feed(data)
        established = check_response(
            response, key=key, subprotocols=subprotocols, compression=compression
        )
        self.subprotocol = established.subprotocol
        deflate = None
        if established.deflate is not None:
            deflate = PerMessageDeflate(
                established.deflate,
                is_server=False,
                level=6,
                min_bytes=0,
                max_message_bytes=Settings().max_message_bytes,
            )
        self.conn = Connection(
            Role.CLIENT, max_message_bytes=Settings().max_message_bytes, deflate=deflate
        )
        if parser.leftover:
            self.events.extend(self.conn.receive_data(parser.leftover))

    async def event(self, timeout_s: float = WAIT_S) -> Event:
        """The next event; EOFError once the stream ended and nothing is left."""
        assert self.conn is not None
        async with asyncio.timeout(timeout_s):
            while not self.events:
                if self.eof:
                    raise EOFError
                data = await self.reader.read(65536)
                if not data:
                    self.eof = True
                self.events.extend(self.conn.receive_data(data))
        return self.events.popleft()

    async def message(self, timeout_s: float = WAIT_S) -> str | bytes:
        """The next data message; pings on the way are answered."""
        while True:
            event = await self.event(timeout_s)
            if isinstance(event, Ping):
                self.write(self.conn.pong(event))  # type: ignore[union-attr]
            elif isinstance(event, TextMessage | BinaryMessage):
                return event.data
            else:
                raise AssertionError(f"expected a message, got {event}")

    async def until_close(self, timeout_s: float = WAIT_S) -> CloseReceived:
        """Skip messages and pings until the server's close frame."""
        while True:
            event = await self.event(timeout_s)
            if isinstance(event, CloseReceived):
                return event
            assert not isinstance(event, ConnectionLost), "EOF without a close frame"

    async def wait_eof(self, timeout_s: float = WAIT_S) -> None:
        """Read (and drop) until the server closes the TCP connection."""
        async with asyncio.timeout(timeout_s):
            while await self.reader.read(65536):
                pass

    def send(self, data: str | bytes) -> None:
        assert self.conn is not None
        self.write(
            self.conn.send_text(data) if isinstance(data, str) else self.conn.send_binary(data)
        )

    # --- pub/sub (redwire.json or redwire.msgpack) ---

    def request(self, **fields: Any) -> None:
        if self.subprotocol == "redwire.msgpack":
            self.send(msgpack.packb(fields, use_bin_type=True))
        else:
            self.send(json.dumps(fields))

    async def frame(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        data = await self.message(timeout_s)
        if isinstance(data, bytes):
            return msgpack.unpackb(data, raw=False)
        return json.loads(data)

    async def reply(self, req_id: Any) -> dict[str, Any]:
        """The reply with this id; frames that arrive first are kept for `next_frame`."""
        while True:
            frame = await self.frame()
            if frame.get("id") == req_id and frame["op"] in ("ack", "error", "pong"):
                return frame
            self.stash.append(frame)

    async def next_frame(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        if self.stash:
            return self.stash.popleft()
        return await self.frame(timeout_s)


class Served:
    """One server-side WebSocket protocol and the peer driving it."""

    def __init__(self, protocol: WebSocket, transport: asyncio.Transport, peer: Peer) -> None:
        self.protocol = protocol
        self.transport = transport
        self.peer = peer


@contextlib.asynccontextmanager
async def served(
    app: Any,
    settings: Settings,
    *,
    factory: Callable[[Any, Settings], WebSocket] = WebSocket,
    server_sndbuf: int | None = None,
    peer_limit: int = 2**16,
) -> AsyncIterator[Served]:
    server_sock, client_sock = socket.socketpair()
    if server_sndbuf is not None:
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, server_sndbuf)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_accepted_socket(
        lambda: factory(app, settings), server_sock
    )
    reader, writer = await asyncio.open_connection(sock=client_sock, limit=peer_limit)
    try:
        yield Served(protocol, transport, Peer(reader, writer))  # type: ignore[arg-type]
    finally:
        writer.close()
        transport.abort()


# --- HTTP phase and the handshake timer ------------------------------------------------------


async def test_handshake_timeout_drops_half_a_request() -> None:
    async with served(EchoApp(), FAST) as s:
        started = time.monotonic()
        s.peer.write(b"GET /ws HTTP/1.1\r\nHost: redwire.test\r\nUpgrade: webs")
        response = await s.peer.read_all()
        elapsed = time.monotonic() - started
        assert response.startswith(b"HTTP/1.1 408 "), response
        assert elapsed >= FAST.handshake_timeout_s * 0.8
        assert s.transport.is_closing()


async def test_silent_client_is_dropped_by_the_handshake_timer() -> None:
    async with served(EchoApp(), FAST) as s:
        assert (await s.peer.read_all()).startswith(b"HTTP/1.1 408 ")


async def test_completed_handshake_is_not_timed_out() -> None:
    async with served(EchoApp(), FAST) as s:
        await s.peer.handshake()
        with pytest.raises(TimeoutError):  # the passage of time is the point here
            await s.peer.event(timeout_s=FAST.handshake_timeout_s * 2)
        s.peer.send("still here")
        assert await s.peer.message() == "still here"


async def test_healthz_answers_200_and_closes() -> None:
    async with served(EchoApp(), FAST) as s:
        s.peer.write(b"GET /healthz HTTP/1.1\r\nHost: redwire.test\r\n\r\n")
        response = await s.peer.read_all()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"Connection: close" in head
        assert json.loads(body) == {"status": "ok"}


async def test_malformed_request_gets_400_and_closes() -> None:
    async with served(EchoApp(), FAST) as s:
        s.peer.write(b"GET /ws HTTP/1.1\nHost: x\n\n")  # bare LF
        assert (await s.peer.read_all()).startswith(b"HTTP/1.1 400 ")


async def test_frames_pipelined_after_the_request_are_handled() -> None:
    """Frames sent right behind the upgrade request (before the 101) are not lost."""
    async with served(EchoApp(), FAST) as s:
        early = Connection(Role.CLIENT, max_message_bytes=1000).send_text("early")
        await s.peer.handshake(compression=False, early=early)
        assert await s.peer.message() == "early"


# --- keepalive -------------------------------------------------------------------------------

KEEPALIVE = FAST.replace(ping_interval_s=0.1, ping_timeout_s=0.2)


async def test_keepalive_peer_that_answers_stays() -> None:
    async with served(EchoApp(), KEEPALIVE) as s:
        await s.peer.handshake()
        # Five pings span 0.5 s, more than ping_timeout_s: answered, they keep it open.
        for _ in range(5):
            event = await s.peer.event()
            assert isinstance(event, Ping), event
            assert event.payload == b"redwire"
            s.peer.write(s.peer.conn.pong(event))  # type: ignore[union-attr]
        assert s.protocol.is_open
        assert not s.transport.is_closing()
        s.peer.send("alive")
        assert await s.peer.message() == "alive"


async def test_keepalive_peer_that_never_answers_is_dropped() -> None:
    async with served(EchoApp(), KEEPALIVE) as s:
        await s.peer.handshake()
        first = await s.peer.event()
        assert isinstance(first, Ping)
        pinged = time.monotonic()
        close = await s.peer.until_close()  # more pings may come first: never answered
        assert close.code == errors.CLOSE_INTERNAL_ERROR
        await s.peer.wait_eof()
        assert time.monotonic() - pinged >= KEEPALIVE.ping_timeout_s * 0.8
        assert s.transport.is_closing()
        assert not s.protocol.is_open


# --- closing handshake -----------------------------------------------------------------------


async def test_server_close_to_silent_peer_is_dropped_after_close_timeout() -> None:
    async with served(EchoApp(), FAST) as s:
        await s.peer.handshake()
        started = time.monotonic()
        s.protocol.close(errors.CLOSE_GOING_AWAY, "draining")
        close = await s.peer.event()
        assert close == CloseReceived(errors.CLOSE_GOING_AWAY, "draining")
        await s.peer.wait_eof()  # we never answer: the server drops us
        elapsed = time.monotonic() - started
        assert elapsed >= FAST.close_timeout_s * 0.8
        assert elapsed < WAIT_S


async def test_server_close_answered_closes_tcp_at_once() -> None:
    slow_timer = FAST.replace(close_timeout_s=10.0)
    async with served(EchoApp(), slow_timer) as s:
        await s.peer.handshake()
        s.protocol.close(errors.CLOSE_NORMAL)
        assert await s.peer.event() == CloseReceived(errors.CLOSE_NORMAL, "")
        s.peer.write(s.peer.conn.close_reply())  # type: ignore[union-attr]
        await s.peer.wait_eof(timeout_s=1.0)  # well before close_timeout_s


async def test_client_close_is_echoed_then_server_closes_tcp() -> None:
    async with served(EchoApp(), FAST.replace(close_timeout_s=10.0)) as s:
        await s.peer.handshake()
        s.peer.write(s.peer.conn.close(3001, "done"))  # type: ignore[union-attr]
        assert await s.peer.event() == CloseReceived(3001, "")
        await s.peer.wait_eof(timeout_s=1.0)


async def test_protocol_error_gets_1002_after_earlier_echo() -> None:
    async with served(EchoApp(), FAST) as s:
        await s.peer.handshake(compression=False)
        s.peer.send("before")
        s.peer.write(b"\x83\x80\x00\x00\x00\x00")  # reserved opcode 0x3, masked, empty
        assert await s.peer.message() == "before"
        close = await s.peer.event()
        assert isinstance(close, CloseReceived) and close.code == errors.CLOSE_PROTOCOL_ERROR
        s.peer.writer.write_eof()
        await s.peer.wait_eof()


async def test_echo_with_compression() -> None:
    async with served(EchoApp(), FAST) as s:
        await s.peer.handshake()
        assert s.peer.conn.deflate is not None  # type: ignore[union-attr]
        assert s.protocol.compress_key == 15
        text = "compress me " * 100
        s.peer.send(text)
        s.peer.send(b"\x00\x01" * 300)
        assert await s.peer.message() == text
        assert await s.peer.message() == b"\x00\x01" * 300


# --- back-pressure ---------------------------------------------------------------------------


class WatchedWebSocket(WebSocket):
    """A WebSocket that signals its flow-control callbacks to the test."""

    def __init__(self, app: Any, settings: Settings) -> None:
        super().__init__(app, settings)
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused.set()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.resumed.set()


async def test_peer_that_stops_reading_pauses_server_reading() -> None:
    settings = FAST.replace(
        write_buffer_high_bytes=64 * 1024, write_buffer_low_bytes=16 * 1024, close_timeout_s=5.0
    )
    async with served(
        EchoApp(), settings, factory=WatchedWebSocket, server_sndbuf=8192, peer_limit=4096
    ) as s:
        protocol: WatchedWebSocket = s.protocol  # type: ignore[assignment]
        await s.peer.handshake(compression=False)
        payload = os.urandom(16 * 1024)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while not protocol.paused.is_set():
                s.peer.send(payload)
                sent += 1
                await s.peer.writer.drain()

        flooder = asyncio.create_task(flood())
        try:
            async with asyncio.timeout(WAIT_S):
                await protocol.paused.wait()
        finally:
            flooder.cancel()
        assert protocol.write_paused
        assert not s.transport.is_reading()
        assert s.transport.get_write_buffer_size() >= settings.write_buffer_high_bytes
        # Reading again drains the server: it resumes and every message comes back.
        for _ in range(sent):
            assert await s.peer.message() == payload
        async with asyncio.timeout(WAIT_S):
            await protocol.resumed.wait()
        assert not protocol.write_paused
        assert s.transport.is_reading()


# --- the broker application on a MemoryBus ---------------------------------------------------

BROKER = Settings(
    redis_url="memory://",
    ping_interval_s=None,
    close_timeout_s=5.0,
    handshake_timeout_s=5.0,
    max_errors_per_window=3,
)


@contextlib.asynccontextmanager
async def broker_app(settings: Settings = BROKER) -> AsyncIterator[BrokerApp]:
    app = BrokerApp(settings, worker_id="w7", bus=MemoryBus("w7"))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def client(
    app: BrokerApp, *, msgpack_: bool = False, compression: bool = True, **kwargs: Any
) -> AsyncIterator[Served]:
    async with served(app, app.settings, **kwargs) as s:
        await s.peer.handshake(
            subprotocols=["redwire.msgpack" if msgpack_ else "redwire.json"],
            compression=compression,
        )
        welcome = await s.peer.frame()
        assert welcome["op"] == "welcome", welcome
        s.peer.welcome = welcome
        yield s


async def test_welcome() -> None:
    async with broker_app() as app, client(app) as a:
        welcome = a.peer.welcome
        assert welcome["version"] == 1
        assert welcome["worker"] == "w7"
        assert welcome["client"].startswith("w7-")
        assert welcome["heartbeat"] == {
            "interval": BROKER.heartbeat_interval_s,
            "timeout": BROKER.heartbeat_timeout_s,
        }
        assert a.peer.subprotocol == "redwire.json"
        assert len(app.sessions) == 1
        assert app.stats.connections == 1


async def test_default_subprotocol_is_json() -> None:
    async with broker_app() as app, served(app, app.settings) as s:
        await s.peer.handshake()  # no Sec-WebSocket-Protocol
        s.peer.subprotocol = None
        assert (await s.peer.frame())["op"] == "welcome"


async def test_subscribe_publish_unsubscribe() -> None:
    async with broker_app() as app, client(app) as a, client(app, msgpack_=True) as b:
        pa, pb = a.peer, b.peer
        pa.request(op="subscribe", topic="room.1", id=1)
        assert await pa.reply(1) == {"op": "ack", "id": 1}
        pb.request(op="subscribe", topic="room.1", id="s")
        assert await pb.reply("s") == {"op": "ack", "id": "s"}

        # A JSON publisher reaches itself and a msgpack subscriber.
        pa.request(op="publish", topic="room.1", data={"n": 1, "s": "é"}, id=2)
        assert await pa.reply(2) == {"op": "ack", "id": 2}
        expected = {"op": "message", "topic": "room.1", "data": {"n": 1, "s": "é"}}
        assert await pa.next_frame() == expected
        assert await pb.next_frame() == expected

        # msgpack bin data reaches the JSON subscriber as base64.
        pb.request(op="publish", topic="room.1", data=b"\x00\xff", id=3)
        assert await pb.reply(3) == {"op": "ack", "id": 3}
        assert (await pb.next_frame())["data"] == b"\x00\xff"
        assert (await pa.next_frame())["data"] == "AP8="

        # Unsubscribed: b's next publish no longer reaches a (a ping is the barrier).
        pa.request(op="unsubscribe", topic="room.1", id=4)
        assert await pa.reply(4) == {"op": "ack", "id": 4}
        pb.request(op="publish", topic="room.1", data="after", id=5)
        assert await pb.reply(5) == {"op": "ack", "id": 5}
        assert (await pb.next_frame())["data"] == "after"
        pa.request(op="ping", id=6)
        assert not pa.stash
        assert await pa.frame() == {"op": "pong", "id": 6}
        assert app.stats.subscriptions == 1
        # Unsubscribing again is acked too.
        pa.request(op="unsubscribe", topic="room.1", id=7)
        assert await pa.reply(7) == {"op": "ack", "id": 7}


async def test_requests_without_id_get_no_ack() -> None:
    async with broker_app() as app, client(app) as a:
        a.peer.request(op="subscribe", topic="t")
        a.peer.request(op="publish", topic="t", data=1)
        # In order: the subscribe completes before the publish, so the message comes back.
        assert await a.peer.frame() == {"op": "message", "topic": "t", "data": 1}


async def test_error_replies_leave_the_connection_open() -> None:
    async with broker_app() as app, client(app) as a:
        p = a.peer
        p.send("not json")
        assert (await p.frame())["code"] == "bad_request"
        p.request(op="shout", id=1)
        err = await p.frame()
        assert err["op"] == "error" and err["code"] == "unknown_op" and err["id"] == 1
        p.request(op="subscribe", topic="no spaces", id=2)
        assert (await p.frame())["code"] == "bad_topic"
        p.request(op="ping", id=3)
        assert await p.frame() == {"op": "pong", "id": 3}
        assert app.stats.client_errors == 3
        assert a.protocol.is_open


async def test_op_of_the_wrong_type_gets_an_error_reply() -> None:
    """`op` that is a list or a map is an unknown op like any other, not a dropped socket."""
    async with broker_app() as app, client(app) as a:
        a.peer.request(op=["subscribe"], id=1)
        err = await a.peer.frame()
        assert err["op"] == "error" and err["code"] == "unknown_op" and err["id"] == 1
        a.peer.request(op="ping", id=2)
        assert await a.peer.frame() == {"op": "pong", "id": 2}


async def test_binary_frame_on_json_is_bad_request() -> None:
    async with broker_app() as app, client(app) as a:
        a.peer.send(b'{"op":"ping","id":1}')
        err = await a.peer.frame()
        assert err["op"] == "error" and err["code"] == "bad_request"


async def test_error_flood_closes_1008() -> None:
    async with broker_app() as app, client(app) as a:
        p = a.peer
        limit = BROKER.max_errors_per_window
        for i in range(limit + 3):
            p.request(op="nope", id=i)
        for i in range(limit + 1):  # the one over the limit is still answered, then close
            frame = await p.frame()
            assert frame["op"] == "error" and frame["id"] == i, frame
        close = await p.event()
        assert close == CloseReceived(errors.CLOSE_POLICY_VIOLATION, "too many errors")
        assert app.stats.error_flood_closes == 1
        p.write(p.conn.close_reply())  # type: ignore[union-attr]
        await p.wait_eof()


async def test_slow_consumer_is_closed_1013() -> None:
    settings = BROKER.replace(
        max_send_buffer_bytes=32 * 1024,
        write_buffer_high_bytes=8 * 1024,
        write_buffer_low_bytes=0,
        coalesce_window_s=0.0,
    )
    async with (
        broker_app(settings) as app,
        client(app, compression=False, server_sndbuf=4096, peer_limit=1024) as slow,
        client(app) as publisher,
    ):
        slow.peer.request(op="subscribe", topic="firehose", id=1)
        assert await slow.peer.reply(1) == {"op": "ack", "id": 1}
        # From now on the slow end reads nothing: its unsent bytes pile up in the server.
        data = os.urandom(3000).hex()
        for i in range(200):
            publisher.peer.request(op="publish", topic="firehose", data=data, id=i)
            assert (await publisher.peer.reply(i))["op"] == "ack"
            if slow.protocol.conn.close_sent is not None:  # type: ignore[union-attr]
                break
        assert slow.protocol.conn.close_sent == (  # type: ignore[union-attr]
            errors.CLOSE_TRY_AGAIN_LATER,
            "slow consumer",
        )
        assert app.stats.slow_consumer_closes == 1
        # Now it reads: the messages it was sent, then the close frame.
        close = await slow.peer.until_close()
        assert close.code == errors.CLOSE_TRY_AGAIN_LATER
        # Others are unaffected.
        publisher.peer.request(op="ping", id="p")
        assert await publisher.peer.reply("p") == {"op": "pong", "id": "p"}


async def test_closed_session_leaves_the_app() -> None:
    async with broker_app() as app:
        async with client(app) as a:
            a.peer.request(op="subscribe", topic="t", id=1)
            await a.peer.reply(1)
            assert app.stats.subscriptions == 1
            a.peer.write(a.peer.conn.close(1000))  # type: ignore[union-attr]
            assert await a.peer.event() == CloseReceived(1000, "")
            await a.peer.wait_eof()
        assert app.sessions == set()
        assert app.stats.connections == 0
        assert app.stats.subscriptions == 0
        assert app.hub.topics == {}


async def test_healthz_on_broker_app() -> None:
    async with broker_app() as app, served(app, app.settings) as s:
        s.peer.write(b"GET /healthz HTTP/1.1\r\nHost: redwire.test\r\n\r\n")
        head, _, body = (await s.peer.read_all()).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        health = json.loads(body)
        assert health["status"] == "ok" and health["worker"] == "w7"


async def test_unconvertible_publish_does_not_stall_fan_out() -> None:
    """msgpack NaN has no JSON form. The publish must either be refused, or reach the msgpack
    subscriber at once while the JSON subscriber keeps receiving later messages."""
    async with (
        broker_app() as app,
        client(app) as json_sub,
        client(app, msgpack_=True) as mp_sub,
        client(app, msgpack_=True) as publisher,
    ):
        for peer in (json_sub.peer, mp_sub.peer):
            peer.request(op="subscribe", topic="t", id="sub")
            assert await peer.reply("sub") == {"op": "ack", "id": "sub"}
        publisher.peer.request(op="publish", topic="t", data=math.nan, id=1)
        answer = await publisher.peer.reply(1)
        if answer["op"] == "error":
            assert answer["code"] == "bad_request"
        else:
            got = await mp_sub.peer.next_frame(timeout_s=1.0)
            assert got["topic"] == "t" and math.isnan(got["data"])
        publisher.peer.request(op="publish", topic="t", data="next", id=2)
        assert await publisher.peer.reply(2) == {"op": "ack", "id": 2}
        assert (await json_sub.peer.next_frame(timeout_s=1.0))["data"] == "next"
        assert (await mp_sub.peer.next_frame())["data"] == "next"


class _GatedHooks:
    """Application hooks whose subscribe waits until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def on_subscribe(self, session: Any, topic: str) -> None:
        await self.gate.wait()


class _HoldWatchingWebSocket(WebSocket):
    """Tells the test when the session stops reading because its request queue is full."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests_held = asyncio.Event()

    def hold_input(self, reason: str) -> None:
        super().hold_input(reason)
        if reason == "requests":
            self.requests_held.set()


async def test_requests_queued_behind_a_slow_one_stop_reading_then_resume() -> None:
    settings = BROKER.replace(max_queued_requests=4)
    async with broker_app(settings) as app, client(app, factory=_HoldWatchingWebSocket) as a:
        gated = _GatedHooks()
        app.hooks._subscribe = gated.on_subscribe  # the hook object is the app's seam
        a.peer.request(op="subscribe", topic="slow", id="s")
        for n in range(10):
            a.peer.request(op="ping", id=n)
        protocol = a.protocol
        assert isinstance(protocol, _HoldWatchingWebSocket)
        await asyncio.wait_for(protocol.requests_held.wait(), WAIT_S)
        assert protocol._paused_reading
        gated.gate.set()
        assert await a.peer.reply("s") == {"op": "ack", "id": "s"}
        for n in range(10):
            assert await a.peer.reply(n) == {"op": "pong", "id": n}
        assert not protocol._paused_reading


async def test_publishes_in_flight_are_capped_then_reading_resumes() -> None:
    """Past `max_publishes_in_flight` publishes waiting for the bus, the connection is not
    read; as the bus answers, reading resumes and every publish gets its ack, in order."""
    settings = BROKER.replace(max_publishes_in_flight=3)
    async with broker_app(settings) as app, client(app) as a:
        gate = asyncio.Event()
        publish = app.bus.publish

        async def held(message: Any, *, key: str | None = None) -> Any:
            await gate.wait()
            return await publish(message, key=key)

        app.bus.publish = held  # type: ignore[method-assign]  # the bus is the app's seam
        for n in range(10):
            a.peer.request(op="publish", topic="t", data=n, id=n)
        protocol = a.protocol

        async def paused() -> bool:
            return protocol._paused_reading

        await eventually(paused, timeout_s=WAIT_S)
        session = next(iter(app.sessions))
        assert len(session._inflight) == 3
        gate.set()
        for n in range(10):
            assert (await a.peer.reply(n))["op"] == "ack"
        assert not protocol._paused_reading


async def test_a_bug_in_one_session_closes_only_it_with_1011(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worker import wire

    decode = wire.WireCodec.decode

    def broken(self: wire.WireCodec, frame: str | bytes) -> wire.Request:
        if frame == '{"op":"boom"}':
            raise RuntimeError("a bug")
        return decode(self, frame)

    monkeypatch.setattr(wire.WireCodec, "decode", broken)
    async with broker_app() as app, client(app) as a, client(app) as b:
        a.peer.request(op="ping", id=1)
        a.peer.send('{"op":"boom"}')
        a.peer.request(op="ping", id=2)  # read for the close reply, never answered
        assert await a.peer.frame() == {"op": "pong", "id": 1}
        assert await a.peer.event() == CloseReceived(errors.CLOSE_INTERNAL_ERROR, "")
        b.peer.request(op="ping", id=3)  # the other connection goes on
        assert await b.peer.frame() == {"op": "pong", "id": 3}
        assert "session failed" in caplog.text


async def test_unavailable_replies_never_close_a_client() -> None:
    async with broker_app() as app, client(app) as a:
        await app.bus.close()  # the bus refuses everything from now on
        for i in range(BROKER.max_errors_per_window * 2):
            a.peer.request(op="publish", topic="t", data=i, id=i)
        for i in range(BROKER.max_errors_per_window * 2):
            frame = await a.peer.frame()
            assert frame == {**frame, "op": "error", "code": "unavailable", "id": i}
        a.peer.request(op="ping", id="still")
        assert await a.peer.frame() == {"op": "pong", "id": "still"}
        assert app.stats.error_flood_closes == 0


# --- abuse limits: publish rate, connection caps, idle timeout, timers that survive ----------


async def test_publish_flood_gets_rate_limited_and_the_connection_stays() -> None:
    """Over the bucket a publish gets `rate_limited` with `retry_after`, never a close and
    never counted as a bad request; the connection is then not read until a token is
    there, so the rest of the flood waits in the socket and is answered as tokens come:
    every request gets one reply, and no more is published than the bucket allows."""
    rate, burst = 40.0, 5
    settings = BROKER.replace(publish_rate_per_s=rate, publish_burst=burst)
    async with broker_app(settings) as app, client(app) as a:
        p = a.peer
        p.request(op="subscribe", topic="t", id="s")
        assert await p.reply("s") == {"op": "ack", "id": "s"}
        flood = 5 + BROKER.max_errors_per_window * 3  # far more refusals than the flood cap
        started = time.monotonic()
        for i in range(flood):
            p.request(op="publish", topic="t", data=i, id=i)
        by_id: dict[Any, dict[str, Any]] = {}
        while len(by_id) < flood:  # refusals may overtake acks that wait for the bus
            frame = await p.frame()
            if frame["op"] in ("ack", "error"):
                by_id[frame["id"]] = frame
        elapsed = time.monotonic() - started
        replies = [by_id[i] for i in range(flood)]
        assert [r["op"] for r in replies[:burst]] == ["ack"] * burst
        refused = [r for r in replies if r["op"] == "error"]
        assert refused, "a flood past the burst is refused"
        for r in refused:
            assert r["code"] == "rate_limited", r
            assert isinstance(r["retry_after"], float) and 0 < r["retry_after"] <= 1 / rate
        acked = flood - len(refused)
        assert acked <= burst + rate * elapsed + 1  # the bucket's pace, never more
        p.request(op="ping", id="alive")
        assert await p.reply("alive") == {"op": "pong", "id": "alive"}
        assert a.protocol.is_open
        assert app.stats.rate_limited == len(refused)
        assert app.stats.error_flood_closes == 0
        assert app.stats.publishes == acked


async def test_publish_rate_limit_off() -> None:
    settings = BROKER.replace(publish_rate_per_s=None, publish_burst=1)
    async with broker_app(settings) as app, client(app) as a:
        for i in range(50):
            a.peer.request(op="publish", topic="t", data=i, id=i)
        for i in range(50):
            assert (await a.peer.reply(i))["op"] == "ack"
        assert app.stats.rate_limited == 0


def _lost_signal(lost: asyncio.Event) -> Callable[[Any, Settings], WebSocket]:
    def factory(app: Any, settings: Settings) -> WebSocket:
        return WebSocket(app, settings, on_lost=lambda ws: lost.set())

    return factory


async def _refusal(app: BrokerApp) -> bytes:
    async with served(app, app.settings) as s:
        request = client_request("redwire.test", 80, "/ws", key=new_key())
        s.peer.write(request)
        return await s.peer.read_all()


async def test_connections_over_the_per_ip_cap_get_429_before_a_session() -> None:
    settings = BROKER.replace(max_connections_per_ip=2)
    async with broker_app(settings) as app:
        lost = asyncio.Event()
        async with client(app, factory=_lost_signal(lost)), client(app):
            response = await _refusal(app)
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429 "), head
            assert body == b"too many connections from this address\n"
            assert len(app.sessions) == 2
            assert app.stats.refused_per_ip == 1
            assert app.stats.connections_accepted == 2
        await asyncio.wait_for(lost.wait(), WAIT_S)
        # The slots are given back when connections go: a new one is accepted again.
        async with client(app):
            assert app.limits.by_ip == {"local": app.limits.open}


async def test_connections_over_the_worker_cap_get_503() -> None:
    settings = BROKER.replace(max_connections_per_worker=1, max_connections_per_ip=None)
    async with broker_app(settings) as app, client(app):
        head = (await _refusal(app)).partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"Retry-After: 1" in head
        assert app.stats.refused_worker_full == 1
        assert len(app.sessions) == 1
        text = app.metrics.render()[0].decode()
        assert 'redwire_connections_refused_total{reason="worker_full",worker="w7"} 1.0' in text


async def test_plain_http_does_not_take_a_connection_slot() -> None:
    settings = BROKER.replace(max_connections_per_worker=1)
    async with broker_app(settings) as app, client(app), served(app, app.settings) as s:
        s.peer.write(b"GET /healthz HTTP/1.1\r\nHost: redwire.test\r\n\r\n")
        assert (await s.peer.read_all()).startswith(b"HTTP/1.1 200 ")


IDLE = BROKER.replace(idle_timeout_s=0.2)


async def test_a_client_that_sends_nothing_and_subscribes_to_nothing_is_closed_idle() -> None:
    async with broker_app(IDLE) as app, client(app) as a:
        started = time.monotonic()
        close = await a.peer.until_close()
        assert close == CloseReceived(errors.CLOSE_POLICY_VIOLATION, "idle")
        assert time.monotonic() - started >= IDLE.idle_timeout_s * 0.8  # type: ignore[operator]
        assert app.stats.idle_closes == 1


async def test_a_subscribed_listener_is_not_idle() -> None:
    async with broker_app(IDLE) as app, client(app) as a:
        a.peer.request(op="subscribe", topic="t", id="s")
        assert await a.peer.reply("s") == {"op": "ack", "id": "s"}
        with pytest.raises(TimeoutError):  # the passage of time is the point here
            await a.peer.event(timeout_s=IDLE.idle_timeout_s * 3)  # type: ignore[operator]
        assert a.protocol.is_open and app.stats.idle_closes == 0
        # Unsubscribed and silent: now it is idle.
        a.peer.request(op="unsubscribe", topic="t", id="u")
        assert await a.peer.reply("u") == {"op": "ack", "id": "u"}
        close = await a.peer.until_close()
        assert close == CloseReceived(errors.CLOSE_POLICY_VIOLATION, "idle")


async def test_idle_timeout_off_by_none() -> None:
    async with broker_app(BROKER.replace(idle_timeout_s=None)) as app, client(app) as a:
        assert a.protocol._idle_timer is None


async def test_idle_echo_connection_is_closed_too() -> None:
    async with served(EchoApp(), FAST.replace(idle_timeout_s=0.2)) as s:
        await s.peer.handshake()
        assert await s.peer.until_close() == CloseReceived(errors.CLOSE_POLICY_VIOLATION, "idle")


async def test_a_timer_that_raises_is_logged_and_the_keepalive_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with served(EchoApp(), KEEPALIVE) as s:
        await s.peer.handshake()
        conn = s.protocol.conn
        assert conn is not None
        send_ping = conn.send_ping
        calls = 0

        def failing_once(payload: bytes) -> bytes:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OSError("no buffer space")
            return send_ping(payload)

        conn.send_ping = failing_once  # type: ignore[method-assign]
        event = await s.peer.event()  # the second ping still comes
        assert isinstance(event, Ping), event
        assert calls == 2
        assert "timer _send_ping failed" in caplog.text


async def test_per_ip_cap_over_real_tcp_counts_the_peer_address() -> None:
    """Loopback TCP: the cap is keyed by the peer's IP; the worker keeps serving."""
    from worker.server import Server

    settings = BROKER.replace(host="127.0.0.1", port=0, max_connections_per_ip=2)
    async with broker_app(settings) as app:
        server = Server(app, settings)
        host, port = await server.start()
        streams = []
        try:
            for _ in range(3):
                reader, writer = await asyncio.open_connection(host, port)
                streams.append((reader, writer))
                writer.write(client_request("redwire.test", port, "/ws", key=new_key()))
                async with asyncio.timeout(WAIT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                if len(streams) < 3:
                    assert head.startswith(b"HTTP/1.1 101 "), head
            assert head.startswith(b"HTTP/1.1 429 "), head
            assert app.limits.by_ip == {"127.0.0.1": 2}
            reader, writer = await asyncio.open_connection(host, port)
            streams.append((reader, writer))
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: redwire.test\r\n\r\n")
            async with asyncio.timeout(WAIT_S):
                assert (await reader.read()).startswith(b"HTTP/1.1 200 ")
        finally:
            for _, writer in streams:
                writer.close()
            await server.drain(timeout_s=1.0)


async def test_a_publish_body_over_the_limit_is_a_json_413() -> None:
    settings = BROKER.replace(max_http_body_bytes=1000)
    async with broker_app(settings) as app, served(app, settings) as s:
        s.peer.write(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n"
        )
        head, _, body = (await s.peer.read_all()).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"application/json" in head.lower()
        reply = json.loads(body)
        assert reply["error"] == "too_large" and reply["reason"]
