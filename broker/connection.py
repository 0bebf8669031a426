"""Sans-I/O WebSocket connection (RFC 6455 sections 5-7): bytes in, events out.

Theory of operation. A `Connection` exists once the opening handshake succeeded; it is the
same class for the server and the client role (only masking differs). The I/O layer feeds
every received chunk to `receive_data` and handles the events in order. Replies the
protocol requires are asked for while handling the event that calls for them:
`pong(event)` for a `Ping`, `close_reply()` for `CloseReceived`, `fail_frame(event)` for
`ConnectionFailed`. So what goes out follows what came in: a message echoed before a bad
frame leaves before the close frame (section 5.5.1: no data frame after a close frame), and
a pong to a ping between fragments leaves before the message's reply. Application sends
(`send_text`, `send_binary`, `send_ping`, `close`) return the bytes to write; they work
until our close frame has been produced. Timers (keepalive, closing timeout) belong to the
I/O layer: they only need `send_ping` and `close`.

Receiving states and transitions, all of them:

    state          on                          → state          event
    OPEN           close() by us               → LOCAL_CLOSING  (close frame returned)
    OPEN           peer's close frame          → CLOSED         CloseReceived (reply it)
    LOCAL_CLOSING  peer's close frame          → CLOSED         CloseReceived (no reply)
    OPEN/LOCAL_*   protocol error from peer    → CLOSED         ConnectionFailed
    any but CLOSED end of stream (EOF)         → CLOSED         ConnectionLost (1006)
    CLOSED         anything                    → CLOSED         ignored

After CLOSED the server closes the TCP connection first (section 7.1.1); a client waits
for the server to do so. Messages received in LOCAL_CLOSING are still delivered.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from enum import Enum

from broker import errors
from broker.deflate import PerMessageDeflate, shared_compress
from broker.errors import (
    ConnectionClosedError,
    InvalidUTF8,
    PayloadTooBig,
    ProtocolError,
)
from broker.frames import Frame, FrameParser, Opcode, serialize_frame


class Role(Enum):
    SERVER = "server"
    CLIENT = "client"


class State(Enum):
    OPEN = "open"
    LOCAL_CLOSING = "local-closing"
    CLOSED = "closed"


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextMessage:
    data: str


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """The peer pinged; answer with `Connection.pong(event)`."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer sent a close frame (code 1005 when it carried none).

    Answer with `Connection.close_reply()` (b"" when we had sent ours first)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke the protocol: send `Connection.fail_frame(event)`, then drop the TCP."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The byte stream ended before the closing handshake completed (1006)."""

    code: int = errors.CLOSE_ABNORMAL


Event = (
    TextMessage | BinaryMessage | Ping | Pong | CloseReceived | ConnectionFailed | ConnectionLost
)


# Close codes a peer may send (RFC 6455 section 7.4.1 and the IANA registry; 3000-4999 are
# for libraries and applications). 1005, 1006 and 1015 must never appear on the wire.
_VALID_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


def is_valid_close_code(code: int) -> bool:
    return code in _VALID_CLOSE_CODES or 3000 <= code <= 4999


def close_payload(code: int | None, reason: str = "") -> bytes:
    """Payload of a close frame: 2-byte code + UTF-8 reason, cut to fit 125 bytes."""
    if code is None:
        return b""
    raw = reason.encode("utf-8")
    if len(raw) > 123:
        raw = raw[:123].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + raw


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """Decode a received close frame payload (RFC 6455 section 5.5.1) or raise."""
    if not payload:
        return errors.CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame payload of 1 byte")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidUTF8("close reason is not valid UTF-8") from None
    return code, reason


_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class Connection:
    """One WebSocket connection's protocol state, for either role."""

    def __init__(
        self,
        role: Role,
        *,
        max_message_bytes: int,
        deflate: PerMessageDeflate | None = None,
    ) -> None:
        self.role = role
        self.state = State.OPEN
        self.max_message_bytes = max_message_bytes
        self.deflate = deflate
        self._mask = role is Role.CLIENT
        # A compressed frame may be slightly larger than the data it carries.
        limit = max_message_bytes + (max_message_bytes >> 6) + 64 if deflate else max_message_bytes
        self._parser = FrameParser(
            mask_required=role is Role.SERVER,
            max_payload_bytes=limit,
            allow_rsv1=deflate is not None,
        )
        # The message being reassembled.
        self._msg_opcode: Opcode | None = None
        self._msg_compressed = False
        self._msg_parts: list[bytes] = []
        self._msg_text: list[str] = []
        self._msg_size = 0
        self._msg_decoder: codecs.IncrementalDecoder | None = None
        self.close_sent: tuple[int, str] | None = None
        self.close_received: tuple[int, str] | None = None
        self._lost = False
        # UTF-8 checked ahead in a text frame still arriving (section 8.1: fail fast).
        self._partial_checked = 0
        self._partial_decoder: codecs.IncrementalDecoder | None = None
        self._partial_text: list[str] = []

    # --- receiving ---------------------------------------------------------------------------

    @property
    def buffered_in_bytes(self) -> int:
        """Received bytes held for what is not complete yet: the frame being received plus
        the parts of the message being reassembled (compressed size when compressed)."""
        return self._parser.buffered_bytes + self._msg_size

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes; return what happened. Empty `data` means end of stream."""
        if self.state is State.CLOSED:
            return []
        if not data:
            self.state = State.CLOSED
            self._lost = True
            return [ConnectionLost()]
        events: list[Event] = []
        parser = self._parser
        try:
            for frame in parser.feed(data):
                self._handle_frame(frame, events)
                if self.state is State.CLOSED:
                    return events
            if parser.error is not None:
                raise parser.error
            if parser.buffered_bytes:
                parser.check_pending()  # against what the message has left of the limit
                self._check_partial_text()
        except ProtocolError as exc:
            events.append(self._fail(exc.close_code, exc.reason))
        return events

    def _handle_frame(self, frame: Frame, events: list[Event]) -> None:
        opcode = frame.opcode
        if opcode >= 0x8:
            self._handle_control(frame, events)
            return
        if opcode is Opcode.CONTINUATION:
            if self._msg_opcode is None:
                raise ProtocolError("continuation frame without a message to continue")
            if frame.rsv1:
                raise ProtocolError("RSV1 set on a continuation frame")  # RFC 7692 section 6.1
        else:
            if self._msg_opcode is not None:
                raise ProtocolError("new data frame inside a fragmented message")
            if frame.fin and not frame.rsv1 and not self._partial_checked:
                # Fast path: a whole uncompressed message in one frame.
                self._check_size(len(frame.payload))
                events.append(self._deliver(opcode, frame.payload))
                return
            self._msg_opcode = opcode
            self._msg_compressed = frame.rsv1
            if opcode is Opcode.TEXT and not frame.rsv1:
                # Take over what was decoded while this frame arrived (if anything).
                self._msg_decoder = self._partial_decoder or _utf8_decoder()
                self._msg_text, self._partial_text = self._partial_text, []
                self._partial_decoder = None
        self._append(frame.payload, frame.fin)
        if frame.fin:
            events.append(self._finish_message())

    def _check_size(self, size: int) -> None:
        if size > self.max_message_bytes:
            raise PayloadTooBig(f"message of {size} bytes exceeds {self.max_message_bytes}")

    def _append(self, payload: bytes, final: bool) -> None:
        self._msg_size += len(payload)
        if not self._msg_compressed:
            self._check_size(self._msg_size)
        elif self._msg_size > self._parser.max_payload_bytes:
            raise PayloadTooBig("compressed message exceeds the message size limit")
        if not final:
            # The next fragment may bring only what is left of the limit: the parser refuses
            # a longer one from its header (1009) instead of buffering it first.
            cap = self._parser.max_payload_bytes if self._msg_compressed else self.max_message_bytes
            self._parser.continuation_bytes = cap - self._msg_size
        decoder = self._msg_decoder
        if decoder is not None:
            checked = self._partial_checked
            if checked:  # the start of this frame was decoded while it arrived
                payload = payload[checked:]
                self._partial_checked = 0
            try:
                self._msg_text.append(decoder.decode(payload, final))
            except UnicodeDecodeError:
                raise InvalidUTF8() from None
        else:
            self._msg_parts.append(payload)

    def _check_partial_text(self) -> None:
        """Decode the arrived part of a text frame still incomplete, to fail on bad UTF-8
        now rather than when the whole frame is in (section 8.1; Autobahn 6.4.3/6.4.4)."""
        parser = self._parser
        head = parser.pending_opcode()
        if head is None or head[1]:
            return
        opcode = head[0]
        if opcode is Opcode.TEXT and self._msg_opcode is None:
            pending = parser.pending_payload(self._partial_checked)
            if pending is None or not pending[2]:
                return
            if self._partial_decoder is None:
                self._partial_decoder = _utf8_decoder()
            decoder, out = self._partial_decoder, self._partial_text
        elif opcode is Opcode.CONTINUATION and self._msg_decoder is not None:
            pending = parser.pending_payload(self._partial_checked)
            if pending is None or not pending[2]:
                return
            decoder, out = self._msg_decoder, self._msg_text
        else:
            return
        chunk = pending[2]
        try:
            out.append(decoder.decode(chunk, False))
        except UnicodeDecodeError:
            raise InvalidUTF8() from None
        self._partial_checked += len(chunk)

    def _finish_message(self) -> Event:
        opcode = self._msg_opcode
        assert opcode is not None
        text_parts, parts = self._msg_text, self._msg_parts
        compressed = self._msg_compressed
        self._msg_opcode = None
        self._msg_compressed = False
        self._msg_decoder = None
        self._msg_parts = []
        self._msg_text = []
        self._msg_size = 0
        self._parser.continuation_bytes = None
        if opcode is Opcode.TEXT and not compressed:
            return TextMessage("".join(text_parts))
        payload = b"".join(parts)
        if compressed:
            assert self.deflate is not None
            payload = self.deflate.decompress(payload)
        return self._deliver(opcode, payload)

    def _deliver(self, opcode: Opcode, payload: bytes) -> Event:
        if opcode is Opcode.TEXT:
            try:
                return TextMessage(payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidUTF8() from None
        return BinaryMessage(payload)

    def _handle_control(self, frame: Frame, events: list[Event]) -> None:
        opcode = frame.opcode
        if opcode is Opcode.PING:
            events.append(Ping(frame.payload))
        elif opcode is Opcode.PONG:
            events.append(Pong(frame.payload))
        else:
            code, reason = parse_close_payload(frame.payload)
            self.close_received = (code, reason)
            self.state = State.CLOSED
            events.append(CloseReceived(code, reason))

    def _fail(self, code: int, reason: str) -> ConnectionFailed:
        self.state = State.CLOSED
        return ConnectionFailed(code, reason)

    # --- replies the protocol requires, produced in event order -----------------------------

    def pong(self, ping: Ping) -> bytes:
        """The pong answering `ping` (section 5.5.2), or b"" once our close frame is out."""
        if self.close_sent is not None:
            return b""
        return serialize_frame(Opcode.PONG, ping.payload, mask=self._mask)

    def close_reply(self) -> bytes:
        """The close frame answering the peer's (section 5.5.1), b"" if we sent ours first.

        It echoes the peer's code; a close without a code gets one without.
        """
        if self.close_sent is not None or self.close_received is None:
            return b""
        code = self.close_received[0]
        reply = None if code == errors.CLOSE_NO_STATUS else code
        self.close_sent = (reply or errors.CLOSE_NO_STATUS, "")
        return serialize_frame(Opcode.CLOSE, close_payload(reply), mask=self._mask)

    def fail_frame(self, failure: ConnectionFailed) -> bytes:
        """The close frame that fails the connection (section 7.1.7), b"" if one was sent.

        Internal details never go on the wire for 1011.
        """
        if self.close_sent is not None:
            return b""
        code = failure.code
        reason = "" if code == errors.CLOSE_INTERNAL_ERROR else failure.reason
        self.close_sent = (code, reason)
        return serialize_frame(Opcode.CLOSE, close_payload(code, reason), mask=self._mask)

    # --- sending -----------------------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """Data may still be sent: our close frame is not out and the stream did not end."""
        return self.close_sent is None and not self._lost

    def _check_open(self) -> None:
        if self.close_sent is not None or self._lost:
            code, reason = self.close_sent or self.close_received or (errors.CLOSE_ABNORMAL, "")
            raise ConnectionClosedError(code, reason)

    def send_text(self, text: str) -> bytes:
        return self.send_data(Opcode.TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes | bytearray | memoryview) -> bytes:
        return self.send_data(Opcode.BINARY, data)

    def send_data(self, opcode: Opcode, payload: bytes | bytearray | memoryview) -> bytes:
        """One whole message as one frame, compressed when negotiated and worthwhile."""
        self._check_open()
        if self.deflate is not None:
            compressed = self.deflate.compress(bytes(payload))
            if compressed is not None:
                return serialize_frame(opcode, compressed, rsv1=True, mask=self._mask)
        return serialize_frame(opcode, payload, mask=self._mask)

    def send_ping(self, payload: bytes = b"") -> bytes:
        self._check_open()
        return serialize_frame(Opcode.PING, payload, mask=self._mask)

    def send_pong(self, payload: bytes = b"") -> bytes:
        self._check_open()
        return serialize_frame(Opcode.PONG, payload, mask=self._mask)

    def close(self, code: int = errors.CLOSE_NORMAL, reason: str = "") -> bytes:
        """Start the closing handshake; returns the close frame (b"" if already closing)."""
        if self.state is not State.OPEN or self.close_sent is not None:
            return b""
        self.state = State.LOCAL_CLOSING
        self.close_sent = (code, reason)
        return serialize_frame(Opcode.CLOSE, close_payload(code, reason), mask=self._mask)


def encode_broadcast(
    opcode: Opcode,
    payload: bytes,
    *,
    compress_window_bits: int | None = None,
    level: int = 6,
    min_bytes: int = 0,
) -> bytes:
    """A server-role message frame to write, unchanged, to many connections.

    With `compress_window_bits`, the payload is deflated statelessly (every connection we
    accept negotiates `server_no_context_takeover`, so one compressed frame fits them all).
    """
    if compress_window_bits is not None and len(payload) >= min_bytes:
        compressed = shared_compress(payload, window_bits=compress_window_bits, level=level)
        if len(compressed) < len(payload):
            return serialize_frame(opcode, compressed, rsv1=True)
    return serialize_frame(opcode, payload)
