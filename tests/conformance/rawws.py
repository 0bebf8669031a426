"""A tiny raw-socket WebSocket client and an Autobahn-style grader, for conformance tests.

Written with `socket`, `struct` and `zlib` only, independent of `broker.frames`: it must be
able to send what our serializer never would (reserved opcodes and bits, bad lengths, broken
UTF-8, fragmented control frames), masked as RFC 6455 section 5.3 requires of clients, whole,
coalesced or chopped into pieces, and it reads the server's frames strictly (section 5.1: a
server MUST NOT mask; RSV1 only on the first frame of a compressed message, RFC 7692 section
6.1), decompressing with exactly the window the server agreed to (RFC 7692 section 7.1.2.1).

`Peer` plays the role of Autobahn|Testsuite's fuzzing client: it records what the server sent
as Autobahn does (`("message", data, binary)`, `("pong", payload)`, `("ping", payload)`, plus
`("timeout", tag)` marks a case adds), answers the server's close frame, and notes who sent
the first close frame, whether the closing handshake completed and who dropped TCP.
`run_case` runs one `Case` and `grade` turns the record into OK / NON-STRICT / FAILED the way
`autobahntestsuite/case/case.py` does (see README.md for the mapping).
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
TAIL = b"\x00\x00\xff\xff"  # RFC 7692 section 7.2.1

OK = "OK"
NON_STRICT = "NON-STRICT"
FAILED = "FAILED"
INFORMATIONAL = "INFORMATIONAL"
UNIMPLEMENTED = "UNIMPLEMENTED"
# Autobahn's closing-behaviour grades (case.py).
WRONG_CODE = "WRONG CODE"
UNCLEAN = "UNCLEAN"
FAILED_BY_CLIENT = "FAILED BY CLIENT"

CLOSE_TIMEOUT_S = 1.0  # Autobahn: closeHandshakeTimeout
DROP_TIMEOUT_S = 1.0  # Autobahn: serverConnectionDropTimeout

Event = tuple[Any, ...]


# --- frames -------------------------------------------------------------------------------


def mask_bytes(data: bytes, key: bytes) -> bytes:
    """XOR `data` with the 4-byte `key` repeated (RFC 6455 section 5.3), via big integers."""
    n = len(data)
    if not n:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def frame_header(
    opcode: int, length: int, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """Header bytes (without the masking key) for a frame of `length` payload bytes."""
    b0 = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    mbit = 0x80 if masked else 0
    if length < 126:
        return struct.pack("!BB", b0, mbit | length)
    if length < 65536:
        return struct.pack("!BBH", b0, mbit | 126, length)
    return struct.pack("!BBQ", b0, mbit | 127, length)


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    key: bytes | None = None,
) -> bytes:
    """One frame, masked with a random key unless `mask` is False. Anything goes: no checks."""
    head = frame_header(opcode, len(payload), fin=fin, rsv=rsv, masked=mask)
    if not mask:
        return head + payload
    key = os.urandom(4) if key is None else key
    return head + key + mask_bytes(payload, key)


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason


# --- permessage-deflate (RFC 7692), client side ----------------------------------------------


@dataclass(frozen=True)
class DeflateParams:
    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15
    raw: str = ""  # the response value, for reports


def parse_deflate_response(value: str) -> DeflateParams:
    """The server's permessage-deflate response parameters; ValueError if it is invalid."""
    name, *params = [part.strip() for part in value.split(";")]
    if name != "permessage-deflate":
        raise ValueError(f"server accepted an extension we did not offer: {value!r}")
    seen: dict[str, str | None] = {}
    for param in params:
        key, _, val = param.partition("=")
        key = key.strip()
        if key in seen:
            raise ValueError(f"duplicate parameter {key}")  # RFC 7692 section 7.1
        seen[key] = val.strip().strip('"') or None
    unknown = set(seen) - {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}")

    def bits(key: str) -> int:
        val = seen.get(key)
        if key not in seen:
            return 15
        if val is None or not val.isdigit() or not 8 <= int(val) <= 15:
            raise ValueError(f"invalid {key}={val!r}")  # RFC 7692 section 7.1.2
        return int(val)

    return DeflateParams(
        server_no_context_takeover="server_no_context_takeover" in seen,
        client_no_context_takeover="client_no_context_takeover" in seen,
        server_max_window_bits=bits("server_max_window_bits"),
        client_max_window_bits=bits("client_max_window_bits"),
        raw=value,
    )


def _params(element: str) -> dict[str, str | None]:
    _, *params = [part.strip() for part in element.split(";")]
    out: dict[str, str | None] = {}
    for param in params:
        key, _, val = param.partition("=")
        out[key.strip()] = val.strip().strip('"') or None
    return out


def response_misfit(offers: str, response: str) -> str | None:
    """Why the response fits none of the offers (RFC 7692 section 7.1), or None if it fits.

    server_no_context_takeover and client_no_context_takeover may always be added (sections
    7.1.1.1, 7.1.1.2); server_max_window_bits must be echoed, same or smaller, when offered
    (7.1.2.1); client_max_window_bits MUST NOT appear unless offered, and not larger than an
    offered value (7.1.2.2).
    """
    got = _params(response)
    problems = []
    for offer in offers.split(","):
        if not offer.strip().startswith("permessage-deflate"):
            continue
        want = _params(offer)
        problem = None
        if "server_max_window_bits" in want:
            value = got.get("server_max_window_bits")
            if value is None or int(value) > int(want["server_max_window_bits"] or 15):
                problem = f"server_max_window_bits={value} does not honour the offer"
        if "client_max_window_bits" in got:
            if "client_max_window_bits" not in want:
                problem = "client_max_window_bits in the response but not in the offer"
            elif want["client_max_window_bits"] is not None and int(
                got["client_max_window_bits"] or 16
            ) > int(want["client_max_window_bits"]):
                problem = "client_max_window_bits larger than offered"
        if problem is None:
            return None
        problems.append(f"{offer.strip()!r}: {problem}")
    return f"response {response!r} fits no offer: " + "; ".join(problems)


class ClientDeflate:
    """Compress what we send, inflate what the server sends, with the agreed windows."""

    def __init__(self, params: DeflateParams) -> None:
        self.params = params
        # zlib cannot deflate with an 8-bit raw window (madler/zlib#171); 9 is the floor.
        self._send_bits = max(9, params.client_max_window_bits)
        # Inflating with exactly the server's agreed window catches a server that used more.
        self._recv_bits = max(9, params.server_max_window_bits)
        self._compressor: Any = None
        self._decompressor: Any = None

    def compress(self, data: bytes) -> bytes:
        if self._compressor is None or self.params.client_no_context_takeover:
            self._compressor = zlib.compressobj(6, zlib.DEFLATED, -self._send_bits)
        out = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        assert out.endswith(TAIL)
        return out[:-4] or b"\x00"

    def decompress(self, data: bytes) -> bytes:
        if self._decompressor is None or self.params.server_no_context_takeover:
            self._decompressor = zlib.decompressobj(-self._recv_bits)
        out = self._decompressor.decompress(data + TAIL)
        if self._decompressor.eof:  # a final block ends the stream (RFC 7692 section 7.2.3)
            self._decompressor = None
        return out


# --- the fuzzing peer ----------------------------------------------------------------------


class HandshakeFailed(Exception):
    """The server did not answer the opening handshake with a valid 101."""


def open_connection(
    host: str, port: int, *, extensions: str | None = None, timeout_s: float = 5.0
) -> tuple[socket.socket, dict[str, str], bytes]:
    """TCP connect and RFC 6455 section 4.1 handshake: (socket, response headers, leftover)."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET / HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            raise HandshakeFailed(f"connection closed during the handshake: {buf!r}")
        buf += chunk
    head, _, leftover = buf.partition(b"\r\n\r\n")
    status, *fields = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in fields:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    if not status.startswith("HTTP/1.1 101") or headers.get("sec-websocket-accept") != accept:
        sock.close()
        raise HandshakeFailed(f"bad handshake response: {head!r}")
    return sock, headers, leftover


class Peer:
    """One WebSocket connection driven by a test case, recording everything Autobahn records."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        leftover: bytes = b"",
        deflate: ClientDeflate | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> None:
        self.sock = sock
        self.deflate = deflate
        self.response_headers = response_headers or {}
        self.received: list[Event] = []
        self.violations: list[str] = []
        self.close_received: tuple[int | None, bytes] | None = None
        self.close_sent = False
        self.closed_by_me = False  # we sent the first close frame
        self.eof = False  # the server closed (or reset) TCP
        self.dropped_by_me = False
        self.killed = False  # nothing ended the connection in time: we dropped it
        self.behavior_override: str | None = None
        self.note = ""
        self.compressed_in = 0  # messages the server sent compressed
        self._inbuf = bytearray(leftover)
        self._outbuf = bytearray()
        self._msg_opcode: int | None = None
        self._msg_compressed = False
        self._msg_parts: list[bytes] = []
        self._barrier_seq = 0
        self._barrier_waiting: bytes | None = None

    @classmethod
    def connect(cls, host: str, port: int, *, extensions: str | None = None) -> Peer:
        sock, headers, leftover = open_connection(host, port, extensions=extensions)
        deflate = None
        value = headers.get("sec-websocket-extensions")
        peer = cls(sock, leftover=leftover, response_headers=headers)
        if value:
            try:
                params = parse_deflate_response(value)
            except ValueError as exc:
                peer.violations.append(f"invalid Sec-WebSocket-Extensions response: {exc}")
            else:
                deflate = ClientDeflate(params)
                problem = response_misfit(extensions or "", value)
                if problem:
                    peer.violations.append(problem)
        peer.deflate = deflate
        return peer

    # --- state ------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self.close_sent or self.close_received is not None or self.eof

    @property
    def remote_close_code(self) -> int | None:
        return self.close_received[0] if self.close_received else None

    @property
    def was_clean(self) -> bool:
        """Autobahn's wasClean: close frames both ways, then the server dropped TCP."""
        return (
            self.close_sent
            and self.close_received is not None
            and self.eof
            and not self.dropped_by_me
        )

    # --- sending ----------------------------------------------------------------------------

    def send(self, data: bytes, *, chop: int | None = None, sync: bool = False) -> None:
        """Queue raw bytes. Like Autobahn (Twisted), queued writes go out together at the next
        read; `sync` flushes now, `chop` sends now in separate writes of `chop` bytes."""
        if chop:
            self.flush()
            for i in range(0, len(data), chop):
                self._write(data[i : i + chop])
        else:
            self._outbuf += data
            if sync:
                self.flush()

    def flush(self) -> None:
        if self._outbuf:
            data = bytes(self._outbuf)
            self._outbuf.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.eof or self.dropped_by_me:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # the server is gone; reading will tell

    def send_frame(
        self,
        opcode: int,
        payload: bytes | str = b"",
        *,
        fin: bool = True,
        rsv: int = 0,
        chop: int | None = None,
        sync: bool = False,
        mask: bool = True,
    ) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        self.send(build_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask), chop=chop, sync=sync)

    def send_message(
        self,
        opcode: int,
        payload: bytes | str,
        *,
        frag_size: int | None = None,
        chop: int | None = None,
        compress: bool | None = None,
    ) -> None:
        """A whole message, compressed when negotiated (unless `compress` is False), cut into
        frames of `frag_size` payload bytes (RFC 6455 section 5.4, RFC 7692 section 6.1)."""
        if isinstance(payload, str):
            payload = payload.encode()
        rsv = 0
        if self.deflate is not None and compress is not False:
            payload = self.deflate.compress(payload)
            rsv = 4  # RSV1
        size = frag_size or max(1, len(payload))
        pieces = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        for i, piece in enumerate(pieces):
            self.send_frame(
                opcode if i == 0 else CONT,
                piece,
                fin=i == len(pieces) - 1,
                rsv=rsv if i == 0 else 0,
                chop=chop,
            )

    def send_close(
        self, code: int | None = 1000, reason: bytes = b"", *, raw: bytes | None = None, **kw: Any
    ) -> None:
        """A close frame that starts (or answers) the closing handshake, as Autobahn's
        sendClose does: it counts for `closed_by_me` and `close_sent`. `raw` is the payload
        as it is (e.g. 1 byte)."""
        if self.close_received is None and not self.close_sent:
            self.closed_by_me = True
        self.close_sent = True
        self.send_frame(CLOSE, close_payload(code, reason) if raw is None else raw, **kw)

    def mark(self, tag: str) -> None:
        self.received.append(("timeout", tag))

    # --- receiving --------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> bool:
        """Flush, then read once (at most `timeout_s`) and handle whatever frames arrived.
        False on timeout or once the connection is gone."""
        self.flush()
        if self.eof or self.dropped_by_me:
            return False
        self.sock.settimeout(max(timeout_s, 0.0) or 0.000001)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            data = b""  # ECONNRESET: the server dropped TCP
        if not data:
            self.eof = True
            self._check_eof()
            return False
        self._inbuf += data
        self._parse()
        return True

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.eof or self.dropped_by_me):
                return predicate()
            self.poll(remaining)
        return True

    def barrier(self, timeout_s: float = 5.0) -> bool:
        """Ping and wait for its pong: True once the server has handled everything sent so far
        and is still open. The pong is not recorded. False if it closed instead."""
        if self.closing:
            return False
        self._barrier_seq += 1
        token = f"redwire-barrier-{self._barrier_seq}".encode()
        self._barrier_waiting = token
        self.send_frame(PING, token)
        done = self.wait_for(lambda: self._barrier_waiting is None or self.closing, timeout_s)
        return done and self._barrier_waiting is None and not self.closing

    def wait_closed(self, timeout_s: float) -> None:
        """Run the closing phase like Autobahn: answer the server's close, give it
        CLOSE_TIMEOUT_S to answer ours and DROP_TIMEOUT_S to drop TCP, else drop it."""
        handshake_done = lambda: self.close_sent and self.close_received is not None  # noqa: E731
        if not self.wait_for(lambda: self.eof or handshake_done(), timeout_s):
            if self.close_sent and self.close_received is None:
                self.note += "no close reply from the server; "
            else:
                self.killed = True
                self.note += f"connection still open after {timeout_s}s; "
            self.drop()
            return
        if not self.eof and not self.wait_for(lambda: self.eof, DROP_TIMEOUT_S):
            self.note += "server did not drop TCP after the closing handshake; "
            self.drop()

    def drop(self) -> None:
        if not self.eof:
            self.dropped_by_me = True
        self.close_socket()

    def close_socket(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _check_eof(self) -> None:
        if self._inbuf:
            self.violations.append(f"TCP closed inside a frame ({len(self._inbuf)} bytes)")

    def _parse(self) -> None:
        buf = self._inbuf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            length = b1 & 0x7F
            pos = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length = struct.unpack_from("!H", buf, 2)[0]
                pos = 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length = struct.unpack_from("!Q", buf, 2)[0]
                pos = 10
            masked = bool(b1 & 0x80)
            if masked:
                pos += 4
            if len(buf) < pos + length:
                return
            payload = bytes(buf[pos : pos + length])
            if masked:
                self.violations.append("server frame is masked (RFC 6455 section 5.1)")
                payload = mask_bytes(payload, bytes(buf[pos - 4 : pos]))
            del buf[: pos + length]
            self._frame(b0 & 0x0F, payload, bool(b0 & 0x80), (b0 >> 4) & 0x7)

    def _frame(self, opcode: int, payload: bytes, fin: bool, rsv: int) -> None:
        if self.close_received is not None:
            self.violations.append(f"frame (opcode {opcode}) after the server's close frame")
            return
        if opcode >= 0x8:
            if not fin or len(payload) > 125 or rsv:
                self.violations.append("invalid control frame from the server")
            if opcode == PING:
                self.received.append(("ping", payload))
                if not self.close_sent:
                    self.send_frame(PONG, payload)
            elif opcode == PONG:
                if self._barrier_waiting is not None and payload == self._barrier_waiting:
                    self._barrier_waiting = None
                else:
                    self.received.append(("pong", payload))
            elif opcode == CLOSE:
                self._close_frame(payload)
            else:
                self.violations.append(f"reserved control opcode {opcode:#x} from the server")
            return
        if opcode not in (CONT, TEXT, BINARY):
            self.violations.append(f"reserved data opcode {opcode:#x} from the server")
            return
        if rsv & 0x3 or (rsv & 0x4 and (self.deflate is None or opcode == CONT)):
            self.violations.append(f"RSV bits {rsv:03b} on a frame from the server")
        if opcode == CONT:
            if self._msg_opcode is None:
                self.violations.append("continuation frame from the server with no message")
                return
        else:
            if self._msg_opcode is not None:
                self.violations.append("new message from the server inside a fragmented one")
            self._msg_opcode = opcode
            self._msg_compressed = bool(rsv & 0x4)
            self._msg_parts = []
        self._msg_parts.append(payload)
        if fin:
            self._message(self._msg_opcode, b"".join(self._msg_parts), self._msg_compressed)
            self._msg_opcode = None
            self._msg_parts = []

    def _message(self, opcode: int, data: bytes, compressed: bool) -> None:
        if compressed and self.deflate is not None:
            self.compressed_in += 1
            try:
                data = self.deflate.decompress(data)
            except zlib.error as exc:
                self.violations.append(f"server sent data we cannot inflate: {exc}")
                return
        if opcode == TEXT:
            try:
                self.received.append(("message", data.decode("utf-8"), False))
            except UnicodeDecodeError:
                self.violations.append("server sent a text message that is not UTF-8")
        else:
            self.received.append(("message", data, True))

    def _close_frame(self, payload: bytes) -> None:
        code: int | None = None
        reason = b""
        if len(payload) == 1:
            self.violations.append("server close frame with a 1-byte payload")
        elif payload:
            code = struct.unpack("!H", payload[:2])[0]
            reason = payload[2:]
            # RFC 6455 section 7.4: 1005/1006/1015 and unassigned codes never go on the wire.
            if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
                self.violations.append(f"server sent close code {code}")
            try:
                reason.decode("utf-8")
            except UnicodeDecodeError:
                self.violations.append("server close reason is not UTF-8")
        self.close_received = (code, reason)
        if not self.close_sent:
            self.close_sent = True  # Autobahn answers with 1000 (echoCloseCodeReason=False)
            self.send_frame(CLOSE, close_payload(1000), sync=True)


# --- cases and grading ----------------------------------------------------------------------


@dataclass(frozen=True)
class CloseExpect:
    """Autobahn's `expectedClose`: who sends the first close frame, acceptable codes from the
    server (None = no code, always acceptable), whether the closing handshake must be clean."""

    closed_by_me: bool
    codes: tuple[int, ...]
    require_clean: bool
    wrong_endpoint_fatal: bool = False  # closedByWrongEndpointIsFatal (6.x)


@dataclass(frozen=True)
class Case:
    id: str
    description: str
    run: Callable[[Peer], None]
    expected: dict[str, list[Event]]
    close: CloseExpect
    extensions: str | None = None  # Sec-WebSocket-Extensions offer
    timeout_s: float = 1.0  # Autobahn's killAfter
    suppress_close: bool = False  # the case sends its own close frame(s)
    wrong_code_fatal: bool = False  # 7.x: a wrong close code fails the case
    informational: bool = False
    acceptable: frozenset[str] = field(default_factory=lambda: frozenset({OK}))


@dataclass
class Verdict:
    case: str
    result: str
    behavior: str
    behavior_close: str
    received: list[Event]
    remote_close: tuple[int | None, bytes] | None
    detail: str = ""

    def summary(self) -> str:
        received = [_short(e) for e in self.received]
        return (
            f"{self.case}: {self.result} (behavior {self.behavior}, close {self.behavior_close},"
            f" server close {self.remote_close}, received {received}) {self.detail}"
        )


def _short(event: Event) -> Event:
    return tuple(
        f"{x[:40]!r}...<{len(x)} long>" if isinstance(x, str | bytes) and len(x) > 48 else x
        for x in event
    )


def run_case(case: Case, host: str, port: int) -> Verdict:
    """Connect, run the case's script, finish the connection like Autobahn, grade."""
    peer = Peer.connect(host, port, extensions=case.extensions)
    try:
        case.run(peer)
        ec = case.close
        if ec.closed_by_me and not case.suppress_close and not peer.closing:
            # Autobahn's finishWhenDone: close once the expected events are all in.
            expected_ok = case.expected.get(OK)
            peer.wait_for(lambda: peer.received == expected_ok or peer.closing, case.timeout_s)
            if not peer.closing:
                peer.send_close(ec.codes[0], sync=True)
        peer.wait_closed(case.timeout_s)
    finally:
        peer.close_socket()
    return grade(case, peer)


def grade(case: Case, peer: Peer) -> Verdict:
    """Autobahn's Case.onConnectionLost, plus the combined result (README.md explains it)."""
    ec = case.close
    behavior = FAILED
    for name, events in case.expected.items():
        if peer.received == events:
            behavior = name
            break
    if peer.behavior_override is not None:
        behavior = peer.behavior_override
    if ec.closed_by_me != peer.closed_by_me:
        behavior_close = FAILED  # "The connection was failed by the wrong endpoint"
    elif ec.require_clean and not peer.was_clean:
        behavior_close = UNCLEAN
    elif peer.remote_close_code is not None and peer.remote_close_code not in ec.codes:
        behavior_close = WRONG_CODE
    elif peer.dropped_by_me:
        behavior_close = FAILED_BY_CLIENT  # "It is preferred that the server close TCP"
    else:
        behavior_close = OK
    if ec.wrong_endpoint_fatal and ec.closed_by_me != peer.closed_by_me:
        behavior = FAILED
    if case.wrong_code_fatal and behavior_close == WRONG_CODE:
        behavior = FAILED
    detail = peer.note
    if peer.violations:
        behavior = FAILED
        detail += "server violations: " + "; ".join(peer.violations)
    if not ec.closed_by_me and peer.killed:
        # Stricter than Autobahn (which reports this as FAILED BY CLIENT): the RFC says the
        # server MUST fail the connection, and it never did.
        behavior_close = FAILED
        detail += "the server never failed the connection; "
    if case.informational:
        result = INFORMATIONAL if behavior_close in (OK, INFORMATIONAL) else FAILED
    elif behavior == FAILED or behavior_close in (FAILED, UNCLEAN):
        result = FAILED
    elif behavior == UNIMPLEMENTED:
        result = UNIMPLEMENTED
    elif behavior == NON_STRICT or behavior_close in (WRONG_CODE, FAILED_BY_CLIENT):
        result = NON_STRICT
    else:
        result = OK
    return Verdict(
        case.id, result, behavior, behavior_close, peer.received, peer.close_received, detail
    )


def run_cases(cases: Iterable[Case], host: str, port: int) -> list[Verdict]:
    return [run_case(case, host, port) for case in cases]
