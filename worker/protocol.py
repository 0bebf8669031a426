"""`asyncio.Protocol` for one TCP connection: HTTP request, then maybe a WebSocket.

Drives `broker.handshake` until a request is complete. A plain HTTP request goes to the
application's `http` handler and the connection closes after the response. An upgrade
request is checked, optionally authorized by the application, answered with 101, and from
then on bytes go through a `broker.connection.Connection` whose events reach a `Session`.
This module owns every timer of a connection: handshake timeout, keepalive ping and its
pong timeout, idle timeout, closing timeout; each callback runs through `_run_timer`, so
an exception in one is logged and the loop (and the connection's other timers) go on.
Before an upgrade makes a session, the application's optional `admit(ip)` takes a
connection slot or refuses with its HTTP status; the slot is given back when the
connection goes. Idle (`idle_timeout_s`): a peer that sent nothing at all for that long,
whose session does not `keeps_alive` (no subscription, no request pending), is closed
1008 "idle" (through the session's `close_idle`, if it has one). The pub/sub session
writes through its ordered outbox (`worker.outbox`), which asks `frame` for the bytes and
`write_frame` to write them; RFC 6455 control frames and the close frame are written here
directly. The transport's
high/low water marks pause reading from a peer we cannot write to fast enough, and call
`on_writable` when it drains.

Fairness. One connection's input is handled in slices: at most `read_slice_bytes` of
received bytes are parsed, and at most `read_slice_messages` messages handed to the
session, per turn of the event loop. What is left waits in `_backlog` (bytes) and
`_pending_events` (parsed), the connection stops being read (input hold "slice"), and the
next slice runs from `call_soon`: after every callback already ready, other connections'
reads and timers included, so a flooding client gets its turn like everybody else, in
order, and no client's burst delays the others by more than one slice. A slice waits
while something else holds the input (the session's request queue or publishes in
flight, the write buffer), but not for a drain: what was read before it is handed over
(`input_pending` until then), so it is answered. An EOF that arrives behind a backlog is
handled after it.

Anything unexpected raised while a session handles a message closes that one connection
with 1011 (`_session_failed`), never the worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from broker import errors
from broker.client_address import (
    forwarded_client,
    parse_proxy_header,
    starts_like_proxy_header,
    trusted_proxies,
)
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
from broker.handshake import (
    Request,
    RequestParser,
    accept_upgrade,
    check_host,
    error_response,
)
from broker.settings import Settings
from broker.tasks import spawn

log = logging.getLogger("redwire.worker")
# Input holds a pending slice does not wait for: its own, and a drain (what was read before
# the drain is still handed to the session).
_SLICE_GOES_ON = frozenset({"slice", "drain"})


class Session(Protocol):
    """The application side of one open WebSocket connection."""

    def on_message(self, data: str | bytes) -> None: ...

    def on_close(self, code: int, reason: str) -> None: ...


class ServerApp(Protocol):
    """What a worker serves: HTTP routes, an upgrade check and a session per WebSocket."""

    subprotocols: tuple[str, ...]
    default_subprotocol: str | None

    async def http(self, request: Request) -> bytes: ...

    async def authorize(self, request: Request) -> Any:
        """Return an identity (any value) or raise HandshakeError to refuse. An app with an
        `authenticate(request) -> (identity, auth)` coroutine is asked that instead (the
        broker: connection token, then hooks); `auth` is kept as `WebSocket.auth`."""

    def open_session(self, ws: WebSocket) -> Session: ...


class WebSocket(asyncio.Protocol):
    """One TCP connection: HTTP first, then (after a 101) one WebSocket."""

    __slots__ = (
        "_backlog",
        "_backlog_at",
        "_close_timer",
        "_eof_pending",
        "_failed",
        "_first_bytes",
        "_handshake_timer",
        "_held_input",
        "_idle_timer",
        "_input_budget",
        "_input_holds",
        "_last_activity",
        "_parser",
        "_paused_reading",
        "_pending_events",
        "_ping_timer",
        "_pong_timer",
        "_proxy_buffer",
        "_release_slot",
        "_slice_scheduled",
        "_slice_waiting",
        "app",
        "auth",
        "client_ip",
        "compress_key",
        "conn",
        "identity",
        "loop",
        "on_lost",
        "on_writable",
        "request",
        "session",
        "settings",
        "subprotocol",
        "transport",
        "write_paused",
    )

    def __init__(
        self,
        app: ServerApp,
        settings: Settings,
        on_lost: Callable[[WebSocket], None] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.on_lost = on_lost
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser: RequestParser | None = RequestParser.from_settings(settings)
        self.request: Request | None = None
        self.conn: Connection | None = None
        self.session: Session | None = None
        self.subprotocol: str | None = None
        self.identity: Any = None
        self.auth: Any = None  # the app's `authenticate` result (broker.auth.Auth), if it has one
        self.compress_key: int | None = None  # window bits when this peer gets compressed frames
        self.write_paused = False
        self.on_writable: Callable[[], None] | None = None  # the transport drained
        self._paused_reading = False
        self._input_holds: set[str] = set()
        self._failed = False  # the session raised: close 1011 sent, messages ignored
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0  # loop time of the last bytes received on the WebSocket
        self._release_slot: Callable[[], None] | None = None  # from the app's admit()
        # The client's address (broker/client_address.py): the TCP peer's, or what a trusted
        # proxy says in its PROXY header (read into _proxy_buffer first) or X-Forwarded-For.
        self.client_ip = "local"
        self._proxy_buffer: bytearray | None = None
        self._first_bytes = True  # nothing of the request received yet
        # The worker's partial-input budget (the app's `input_budget`, if it has one) and
        # what this connection holds of it now.
        self._input_budget: Any = None
        self._held_input = 0
        # Input not handled yet (see Fairness above).
        self._backlog: bytes | None = None  # received bytes from _backlog_at on: not parsed
        self._backlog_at = 0
        self._pending_events: list[Any] | None = None  # parsed, not handled
        self._slice_scheduled = False  # a _next_slice call is pending
        self._slice_waiting = False  # _next_slice found another input hold: release resumes
        self._eof_pending = False  # the peer's EOF came behind a backlog

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        s = self.settings
        self.transport.set_write_buffer_limits(s.write_buffer_high_bytes, s.write_buffer_low_bytes)
        self._handshake_timer = self._call_later(s.handshake_timeout_s, self._handshake_expired)
        self.client_ip = self._peer_ip()
        if s.proxy_protocol and trusted_proxies(s.trusted_proxies).contains(self.client_ip):
            self._proxy_buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            self._last_activity = self.loop.time()
            self._receive_ws(conn, data)
        elif self._proxy_buffer is not None:
            self._receive_proxy_header(data)
        elif self._parser is not None:
            self._receive_http(data)
        # else: a request is being handled asynchronously; ignore further bytes until then.

    def eof_received(self) -> bool | None:
        if self.conn is not None:
            if self._backlog is not None or self._pending_events is not None:
                self._eof_pending = True  # handled after what came before it
                return True  # keep the transport: the replies to the backlog go out first
            self._handle_events(self.conn.receive_data(b""))
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._give_back_slot()
        if self._held_input:
            self._input_budget.change(-self._held_input)
            self._held_input = 0
        conn = self.conn
        if conn is not None and self.session is not None:
            if conn.close_received is not None:
                code, reason = conn.close_received
            else:
                code, reason = errors.CLOSE_ABNORMAL, ""
            conn.state = State.CLOSED
            session, self.session = self.session, None
            session.on_close(code, reason)
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.hold_input("write")

    def resume_writing(self) -> None:
        self.write_paused = False
        self.release_input("write")
        if self.on_writable is not None:
            self.on_writable()

    def hold_input(self, reason: str) -> None:
        """Stop reading from the peer (back-pressure) until every reason is released."""
        held = self._input_holds
        transport = self.transport
        if not held and transport is not None and not transport.is_closing():
            if not self._paused_reading:
                self._paused_reading = True
                transport.pause_reading()
        held.add(reason)

    def hold_input_for(self, reason: str, delay_s: float) -> None:
        """`hold_input(reason)`, released by itself `delay_s` later (once, if held again)."""
        if reason in self._input_holds:
            return
        self.hold_input(reason)
        self._call_later(delay_s, lambda: self.release_input(reason))

    def release_input(self, reason: str) -> None:
        held = self._input_holds
        held.discard(reason)
        if self._slice_waiting and held <= _SLICE_GOES_ON:
            self._slice_waiting = False
            self._schedule_slice()
        transport = self.transport
        if not held and self._paused_reading and transport is not None:
            self._paused_reading = False
            if not transport.is_closing():
                transport.resume_reading()

    # --- PROXY header and HTTP phase ----------------------------------------------------------

    def _receive_proxy_header(self, data: bytes) -> None:
        """A trusted load balancer's PROXY header, before the request: it names the client."""
        buffer = self._proxy_buffer
        assert buffer is not None
        buffer += data
        try:
            header = parse_proxy_header(bytes(buffer))
        except HandshakeError as exc:
            self._proxy_buffer = None
            self._refuse(exc)
            return
        if header is None:
            return
        self._proxy_buffer = None
        if header.source is not None:
            self.client_ip = header.source
        rest = bytes(buffer[header.length :])
        if rest:
            self._receive_http(rest)

    def _receive_http(self, data: bytes) -> None:
        assert self._parser is not None
        s = self.settings
        if self._first_bytes:
            self._first_bytes = False
            if s.proxy_protocol and starts_like_proxy_header(data):
                self._refuse(HandshakeError(400, "PROXY header from an address not trusted"))
                return
        try:
            request = self._parser.feed(data)
            if request is not None:
                check_host(request, s.allowed_hosts)
                if not s.proxy_protocol and s.trusted_proxies:
                    self._forwarded_client(request)
        except HandshakeError as exc:
            self._refuse(exc, self._parser.target)
            return
        if request is None:
            return
        leftover = self._parser.leftover
        self._parser = None
        self.request = request
        if request.is_upgrade:
            spawn(self._upgrade(request, leftover), name="upgrade")
        else:
            spawn(self._serve_http(request), name="http")

    async def _serve_http(self, request: Request) -> None:
        try:
            response = await self.app.http(request)
        except HandshakeError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("HTTP handler failed for %s %s", request.method, request.path)
            response = error_response(HandshakeError(500, "internal error"))
        self._cancel_timers()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _refuse(self, exc: HandshakeError, target: str | None = None) -> None:
        """Answer `exc` and close. `target` (the request line's, when known) lets the
        application shape the answer (`POST /publish` refusals are JSON)."""
        self._cancel_timers()
        self._give_back_slot()
        if self.transport is not None and not self.transport.is_closing():
            shape = getattr(self.app, "refusal", None)
            self.transport.write(shape(target, exc) if shape else error_response(exc))
            self.transport.close()

    def _give_back_slot(self) -> None:
        release, self._release_slot = self._release_slot, None
        if release is not None:
            release()

    def _forwarded_client(self, request: Request) -> None:
        """From a trusted proxy, the client X-Forwarded-For names (else the peer stays)."""
        trusted = trusted_proxies(self.settings.trusted_proxies)
        if trusted.contains(self.client_ip):
            values = request.header_values("X-Forwarded-For")
            if values:
                self.client_ip = forwarded_client(values, self.client_ip, trusted)

    def _peer_ip(self) -> str:
        """The TCP peer's address; "local" for a Unix socket."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return "local"

    async def _upgrade(self, request: Request, leftover: bytes) -> None:
        s = self.settings
        app = self.app
        admit: Callable[[str], Callable[[], None]] | None = getattr(app, "admit", None)
        try:
            if admit is not None:  # connection caps: refused before any hook or session
                self._release_slot = admit(self.client_ip)
            accepted = accept_upgrade(
                request,
                allowed_origins=s.allowed_origins,
                subprotocols=app.subprotocols,
                default_subprotocol=app.default_subprotocol,
                compression=s.compression,
                max_window_bits=s.max_window_bits,
            )
            authenticate = getattr(app, "authenticate", None)
            if authenticate is not None:  # a connection token first, then the app's hook
                self.identity, self.auth = await authenticate(request)
            else:
                self.identity = await app.authorize(request)
        except HandshakeError as exc:
            self._refuse(exc)
            return
        except Exception:
            log.exception("authorize hook failed")
            self._refuse(HandshakeError(500, "internal error"))
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        deflate = None
        if accepted.deflate is not None:
            deflate = PerMessageDeflate(
                accepted.deflate,
                is_server=True,
                level=s.compression_level,
                min_bytes=s.compression_min_bytes,
                max_message_bytes=s.max_message_bytes,
            )
            self.compress_key = accepted.deflate.server_max_window_bits
        self.subprotocol = accepted.subprotocol
        self._input_budget = getattr(app, "input_budget", None)
        self.conn = Connection(Role.SERVER, max_message_bytes=s.max_message_bytes, deflate=deflate)
        transport.write(accepted.response)
        try:
            self.session = app.open_session(self)
        except Exception:
            log.exception("open_session failed")
            self.close(errors.CLOSE_INTERNAL_ERROR)
            return
        self._schedule_ping()
        if s.idle_timeout_s is not None:
            self._last_activity = self.loop.time()
            self._idle_timer = self._call_later(s.idle_timeout_s, self._idle_check)
        if leftover:
            self._receive_ws(self.conn, leftover)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.conn is None and self.transport is not None:
            log.debug("handshake timeout")
            self._refuse(HandshakeError(408, "request timeout"))

    # --- WebSocket phase ---------------------------------------------------------------------

    def _receive_ws(self, conn: Connection, data: bytes) -> None:
        """Received bytes: parsed and handled a slice at a time (Fairness, above)."""
        backlog = self._backlog
        if backlog is not None:  # reading resumed (a close clears the holds): queue behind
            self._backlog = backlog[self._backlog_at :] + data
            self._backlog_at = 0
            self.hold_input("slice")
            return
        self._feed_slice(conn, data)

    def _schedule_slice(self) -> None:
        if not self._slice_scheduled:
            self._slice_scheduled = True
            self.hold_input("slice")
            self.loop.call_soon(self._next_slice)

    def _next_slice(self) -> None:
        self._slice_scheduled = False
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or transport.is_closing():
            self._backlog = self._pending_events = None
            return
        if self._input_holds - _SLICE_GOES_ON:
            self._slice_waiting = True  # release_input schedules the next slice
            return
        try:
            events, self._pending_events = self._pending_events, None
            if events is not None:
                self._handle_events(events)
            elif self._backlog is not None:
                data, at = self._backlog, self._backlog_at
                self._backlog = None
                self._feed_slice(conn, data[at:] if at else data)
                return
            self._after_slice()
        except Exception:
            log.exception("handling a slice of input failed")
            self.abort()

    @property
    def input_pending(self) -> bool:
        """Bytes read from the peer are still waiting for their slice."""
        return self._backlog is not None or self._pending_events is not None

    def _resume_slices(self) -> None:
        """The input holds were cleared (closing): go on with the backlog, where the peer's
        close frame may be."""
        if self._backlog is not None or self._pending_events is not None:
            self._slice_waiting = False
            self._schedule_slice()

    def _after_slice(self) -> None:
        if self._pending_events is not None or self._backlog is not None:
            self._schedule_slice()
            return
        if "slice" in self._input_holds:
            self.release_input("slice")
        if self._eof_pending and self.conn is not None:
            self._eof_pending = False
            self._handle_events(self.conn.receive_data(b""))

    def _feed_slice(self, conn: Connection, data: bytes) -> None:
        limit = self.settings.read_slice_bytes
        if len(data) > limit:
            self._backlog, self._backlog_at = data, limit
            data = data[:limit]
        events = conn.receive_data(data)
        budget = self._input_budget
        if budget is not None:
            held = conn.buffered_in_bytes
            if held != self._held_input:
                if not budget.change(held - self._held_input):
                    self._over_input_budget(conn)
                    return
                self._held_input = held
        if events:
            self._handle_events(events)
        self._after_slice()

    def _over_input_budget(self, conn: Connection) -> None:
        """The worker holds all the partial input it may: this connection, whose input
        grew past it, is closed 1013 at once (what it had buffered is given back when the
        connection goes), and what it had completed in this chunk is not handled."""
        log.info("partial input budget full: closing a connection with 1013")
        transport = self.transport
        if transport is not None and conn.can_send:
            transport.write(conn.close(errors.CLOSE_TRY_AGAIN_LATER, "server busy: retry later"))
        self._end(flush=True)

    def _handle_events(self, events: list[Any]) -> None:
        """Handle events in order, so replies leave in the order their causes arrived."""
        session = self.session
        conn = self.conn
        transport = self.transport
        assert conn is not None
        room = self.settings.read_slice_messages
        for i, event in enumerate(events):
            kind = type(event)
            if kind is TextMessage or kind is BinaryMessage:
                held = self._input_holds
                if not room or (held and not held <= _SLICE_GOES_ON):
                    # The slice is used up, or the session (or the writer) asked for no
                    # more input: the rest waits for the next slice (Fairness, above).
                    self._pending_events = events[i:]
                    return
                room -= 1
                if session is not None and not self._failed:
                    try:
                        session.on_message(event.data)
                    except Exception:
                        self._session_failed()
                        return
            elif kind is Ping:
                if transport is not None:
                    transport.write(conn.pong(event))
            elif kind is Pong:
                if self._pong_timer is not None:
                    self._pong_timer.cancel()
                    self._pong_timer = None
            elif kind is CloseReceived:
                if transport is not None:
                    flush = getattr(session, "flush", None)
                    if flush is not None:
                        flush()  # what was queued before the peer's close leaves first
                    transport.write(conn.close_reply())
                # Section 7.1.1: once the closing handshake is done, the server closes TCP.
                self._end(flush=True)
            elif kind is ConnectionFailed:
                log.debug("failing connection: %s %s", event.code, event.reason)
                if transport is not None:
                    transport.write(conn.fail_frame(event))
                self._linger()
            elif kind is ConnectionLost:
                # The peer's EOF (no close frame: 1006 for the session). It may still read:
                # what was queued for it goes out, then the socket closes (as asyncio would).
                flush = getattr(session, "flush", None)
                if flush is not None:
                    flush()
                self._end(flush=True)

    def _session_failed(self) -> None:
        """The one place a session's unexpected error ends up: close 1011, this connection
        only; no internal detail goes on the wire."""
        log.exception("session failed; closing the connection with 1011")
        self._failed = True  # later messages are read (for the close reply) and ignored
        fail = getattr(self.session, "fail", None)
        if fail is not None:
            fail()  # the session closes through its outbox and stops queueing
        self.close(errors.CLOSE_INTERNAL_ERROR)

    def frame(self, data: str | bytes) -> bytes | None:
        """One message serialized as a frame to write later (None when we cannot send)."""
        conn = self.conn
        if conn is None or not conn.can_send:
            return None
        return conn.send_text(data) if isinstance(data, str) else conn.send_binary(data)

    def send(self, data: str | bytes) -> None:
        """Send one message (text for str, binary for bytes) if the connection is open."""
        conn = self.conn
        if conn is None or not conn.can_send or self.transport is None:
            return
        if isinstance(data, str):
            frame = conn.send_text(data)
        else:
            frame = conn.send_binary(data)
        self.transport.write(frame)

    def write_frame(self, frame: bytes) -> None:
        """Write an already-encoded server frame (a broadcast encoded once for many)."""
        conn = self.conn
        if conn is not None and conn.can_send and self.transport is not None:
            self.transport.write(frame)

    def write_before_end(self, frames: bytes) -> None:
        """Frames queued before the peer's close frame or EOF: written while our close
        frame is not out, even though the stream has ended (the peer may still read)."""
        conn, transport = self.conn, self.transport
        if conn is not None and conn.close_sent is None and transport is not None:
            if not transport.is_closing():
                transport.write(frames)

    def close(self, code: int = errors.CLOSE_NORMAL, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection is dropped after close_timeout_s."""
        conn = self.conn
        if conn is None or self.transport is None:
            if self.transport is not None:
                self.transport.close()
            return
        try:
            frame = conn.close(code, reason)
        except ConnectionClosedError:
            return
        if frame:
            self.transport.write(frame)
            # Read again whatever held input (back-pressure, a drain): the peer's close
            # reply must get through, and nothing else will be answered now.
            self._input_holds.clear()
            if self._paused_reading:
                self._paused_reading = False
                self.transport.resume_reading()
            self._resume_slices()
            if self._close_timer is None:
                self._close_timer = self._call_later(
                    self.settings.close_timeout_s, self._close_expired
                )

    def abort(self) -> None:
        """Drop the TCP connection now, without a closing handshake."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_open(self) -> bool:
        return self.conn is not None and self.conn.state is State.OPEN

    def buffered_bytes(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _close_expired(self) -> None:
        self._close_timer = None
        log.debug("closing handshake timed out")
        self.abort()

    def _linger(self) -> None:
        """After failing the connection: send our close frame and half-close, then read and
        discard until the peer closes (or close_timeout_s), so a peer still writing a large
        message reads our close frame instead of a connection reset."""
        self._cancel_timers()
        transport = self.transport
        if transport is None:
            return
        self._input_holds.clear()
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()
        self._resume_slices()
        if transport.can_write_eof():
            transport.write_eof()
        self._close_timer = self._call_later(self.settings.close_timeout_s, self._close_expired)

    def _end(self, *, flush: bool) -> None:
        self._cancel_timers()
        if self.transport is None:
            return
        if flush:
            self.transport.close()
            # A peer that never reads must not keep the socket (and its buffer) forever.
            self._close_timer = self._call_later(self.settings.close_timeout_s, self._close_expired)
        else:
            self.transport.abort()

    # --- timers: keepalive, idle ---------------------------------------------------------------

    def _call_later(self, delay_s: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return self.loop.call_later(delay_s, self._run_timer, callback)

    @staticmethod
    def _run_timer(callback: Callable[[], None]) -> None:
        """Every timer callback runs here: an exception (an OSError from a dying socket, a
        bug) is logged and the loop goes on; the callbacks reschedule before they write."""
        try:
            callback()
        except Exception:
            log.exception("timer %s failed", getattr(callback, "__name__", callback))

    def _schedule_ping(self) -> None:
        interval = self.settings.ping_interval_s
        if interval is not None:
            self._ping_timer = self._call_later(interval, self._send_ping)

    def _send_ping(self) -> None:
        self._ping_timer = None
        if not self.is_open or self.transport is None:
            return
        self._schedule_ping()
        if self._pong_timer is None:
            self._pong_timer = self._call_later(self.settings.ping_timeout_s, self._pong_expired)
        self.transport.write(self.conn.send_ping(b"redwire"))  # type: ignore[union-attr]

    def _pong_expired(self) -> None:
        self._pong_timer = None
        log.debug("no pong within ping_timeout_s; dropping connection")
        try:
            if self.conn is not None and self.transport is not None:
                self.transport.write(self.conn.close(errors.CLOSE_INTERNAL_ERROR, ""))
        finally:
            self.abort()

    def _idle_check(self) -> None:
        """Close a connection that sent nothing for idle_timeout_s and keeps nothing alive
        (no subscription, no request pending); otherwise look again when it could be."""
        self._idle_timer = None
        timeout_s = self.settings.idle_timeout_s
        if timeout_s is None or not self.is_open:
            return
        quiet_s = self.loop.time() - self._last_activity
        session = self.session
        if quiet_s < timeout_s:
            self._idle_timer = self._call_later(timeout_s - quiet_s, self._idle_check)
            return
        if session is not None and getattr(session, "keeps_alive", False):
            self._idle_timer = self._call_later(timeout_s, self._idle_check)
            return
        log.debug("idle for %.0fs; closing 1008", quiet_s)
        close_idle: Callable[[], None] | None = getattr(session, "close_idle", None)
        if close_idle is not None:
            close_idle()
        else:
            self.close(errors.CLOSE_POLICY_VIOLATION, "idle")

    def _cancel_timers(self) -> None:
        for name in (
            "_handshake_timer",
            "_ping_timer",
            "_pong_timer",
            "_close_timer",
            "_idle_timer",
        ):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)
