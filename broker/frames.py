"""Sans-I/O WebSocket frame codec (RFC 6455 section 5): bytes in, `Frame`s out, and back.

`FrameParser` is fed arbitrary chunks (one byte at a time works) and returns every complete
frame; it checks everything a single frame header can break (reserved opcodes, RSV bits,
masking by role, control-frame rules, the 63-bit length, the size limit) as soon as the
header is in, before the payload arrives. Message-level rules (fragmentation order, UTF-8,
compression) belong to `broker.connection`. `serialize_frame` builds one frame's bytes with
the payload copied once. Nothing here does I/O; server and client roles share it all.
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum
from typing import NamedTuple

from broker.errors import PayloadTooBig, ProtocolError
from broker.masking import apply_mask


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 section 5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA

    @property
    def is_control(self) -> bool:
        return self >= 0x8


_OPCODES: dict[int, Opcode] = {int(op): op for op in Opcode}


class Frame(NamedTuple):
    """One WebSocket frame, unmasked."""

    opcode: Opcode
    payload: bytes
    fin: bool = True
    rsv1: bool = False
    rsv2: bool = False
    rsv3: bool = False


MAX_CONTROL_PAYLOAD = 125  # RFC 6455 section 5.5
_FIN = 0x80
_RSV1 = 0x40
_RSV2 = 0x20
_RSV3 = 0x10
_MASK_BIT = 0x80
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


class FrameParser:
    """Incremental frame parser for one direction of one connection.

    `mask_required` is True on the server (clients MUST mask, RFC 6455 section 5.1) and
    False on the client (servers MUST NOT mask). `allow_rsv1` is set once a negotiated
    extension (permessage-deflate) gives RSV1 a meaning. Frames whose payload exceeds
    `max_payload_bytes` raise `PayloadTooBig` as soon as their header is read, and so do
    continuation frames longer than `continuation_bytes` when it is set (the connection sets
    it to what the fragmented message in progress has left of its limit).
    """

    __slots__ = (
        "_buf",
        "_need",
        "allow_rsv1",
        "continuation_bytes",
        "error",
        "mask_required",
        "max_payload_bytes",
    )

    def __init__(
        self, *, mask_required: bool, max_payload_bytes: int, allow_rsv1: bool = False
    ) -> None:
        self.mask_required = mask_required
        self.max_payload_bytes = max_payload_bytes
        self.allow_rsv1 = allow_rsv1
        self.continuation_bytes: int | None = None
        self._buf = bytearray()
        self._need = 0  # buffered bytes the pending frame needs before parsing can progress
        # An error found after complete frames in the same chunk: those frames are returned
        # first (they arrived first), then the error is raised by the next `feed`.
        self.error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return the frames they complete (possibly none).

        Raises ProtocolError for a broken frame; when complete frames preceded it in this
        chunk, they are returned and the error is kept in `error` (raised by the next call).
        """
        if self.error is not None:
            raise self.error
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []  # still inside the pending frame: nothing to parse yet
            src: bytes | bytearray = buf
        else:
            src = bytes(data) if not isinstance(data, bytes) else data
        frames: list[Frame] = []
        try:
            pos = self._parse(src, frames)
        except ProtocolError as exc:
            self.error = exc
            if not frames:
                raise
            return frames
        if src is buf:
            del buf[:pos]
        elif pos < len(src):
            buf += memoryview(src)[pos:]
        return frames

    def _parse(self, src: bytes | bytearray, frames: list[Frame]) -> int:
        end = len(src)
        pos = 0
        need = 0
        view = memoryview(src)
        try:
            while True:
                if end - pos < 2:
                    need = 2
                    break
                b0 = src[pos]
                b1 = src[pos + 1]
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if end - head < 2:
                        self._check_header(b0, b1, None)
                        need = 4
                        break
                    length = _U16.unpack_from(src, head)[0]
                    head += 2
                    if length < 126:
                        raise ProtocolError("frame length not in its minimal form")
                elif length == 127:
                    if end - head < 8:
                        self._check_header(b0, b1, None)
                        need = 10
                        break
                    length = _U64.unpack_from(src, head)[0]
                    head += 8
                    if length >> 63:
                        raise ProtocolError("frame length has its most significant bit set")
                    if length < 65536:
                        raise ProtocolError("frame length not in its minimal form")
                opcode = self._check_header(b0, b1, length)
                if b1 & _MASK_BIT:
                    stop = head + 4 + length
                    if stop > end:
                        need = stop - pos
                        break
                    mask = src[head : head + 4]
                    payload = apply_mask(view[head + 4 : stop], mask) if length else b""
                else:
                    stop = head + length
                    if stop > end:
                        need = stop - pos
                        break
                    payload = bytes(view[head:stop])
                frames.append(
                    Frame(opcode, payload, bool(b0 & _FIN), bool(b0 & _RSV1), False, False)
                )
                pos = stop
        finally:
            view.release()
        self._need = need
        return pos

    def check_pending(self) -> None:
        """PayloadTooBig if the frame still arriving is a continuation frame longer than
        `continuation_bytes` as it is now: the connection lowers it as fragments arrive,
        possibly after this frame's header was read in the same chunk as the one before."""
        buf = self._buf
        n = len(buf)
        limit = self.continuation_bytes
        if n < 2 or limit is None or buf[0] & 0x0F != Opcode.CONTINUATION:
            return
        length = buf[1] & 0x7F
        if length == 126:
            length = _U16.unpack_from(buf, 2)[0] if n >= 4 else 0
        elif length == 127:
            length = _U64.unpack_from(buf, 2)[0] if n >= 10 else 0
        if length > limit:
            raise PayloadTooBig(f"frame of {length} bytes exceeds {limit}")

    def pending_opcode(self) -> tuple[Opcode | None, bool] | None:
        """(opcode, rsv1) of the incomplete frame still buffered, None if nothing is."""
        buf = self._buf
        if not buf:
            return None
        return _OPCODES.get(buf[0] & 0x0F), bool(buf[0] & _RSV1)

    def pending_payload(self, start: int) -> tuple[Opcode, bool, bytes] | None:
        """The incomplete frame still buffered: (opcode, rsv1, its payload from byte `start`
        up to what has arrived, unmasked), or None while its header is incomplete.

        Lets the connection check a text frame's UTF-8 while the frame is still arriving.
        """
        buf = self._buf
        n = len(buf)
        if n < 2:
            return None
        b0, b1 = buf[0], buf[1]
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if n < 4:
                return None
            length = _U16.unpack_from(buf, 2)[0]
            head = 4
        elif length == 127:
            if n < 10:
                return None
            length = _U64.unpack_from(buf, 2)[0]
            head = 10
        opcode = _OPCODES.get(b0 & 0x0F)
        if opcode is None:
            return None
        mask = b""
        if b1 & _MASK_BIT:
            if n < head + 4:
                return None
            mask = bytes(buf[head : head + 4])
            head += 4
        begin, end = head + start, min(n, head + length)
        chunk = bytes(buf[begin:end]) if begin < end else b""
        if mask and chunk:
            turn = start % 4
            chunk = apply_mask(chunk, mask[turn:] + mask[:turn])
        return opcode, bool(b0 & _RSV1), chunk

    def _check_header(self, b0: int, b1: int, length: int | None) -> Opcode:
        """Validate what the first bytes of a frame say; `length` is None if not yet known."""
        opcode = _OPCODES.get(b0 & 0x0F)
        if opcode is None:
            raise ProtocolError(f"reserved opcode {b0 & 0x0F:#x}")
        if b0 & (_RSV2 | _RSV3):
            raise ProtocolError("reserved bit RSV2/RSV3 set without a negotiated extension")
        if b0 & _RSV1 and not self.allow_rsv1:
            raise ProtocolError("reserved bit RSV1 set without a negotiated extension")
        masked = bool(b1 & _MASK_BIT)
        if masked != self.mask_required:
            raise ProtocolError(
                "client frame is not masked" if self.mask_required else "server frame is masked"
            )
        if opcode >= 0x8:
            if not b0 & _FIN:
                raise ProtocolError("fragmented control frame")
            if (b1 & 0x7F) > MAX_CONTROL_PAYLOAD:
                raise ProtocolError("control frame payload longer than 125 bytes")
            if b0 & _RSV1:
                raise ProtocolError("RSV1 set on a control frame")
        if length is not None:
            limit = self.max_payload_bytes
            if opcode is Opcode.CONTINUATION and self.continuation_bytes is not None:
                limit = min(limit, self.continuation_bytes)
            if length > limit:
                raise PayloadTooBig(f"frame of {length} bytes exceeds {limit}")
        return opcode


_SHORT_HEADERS: dict[int, list[bytes]] = {}


def _short_header(b0: int, length: int) -> bytes:
    table = _SHORT_HEADERS.get(b0)
    if table is None:
        table = _SHORT_HEADERS[b0] = [bytes((b0, n)) for n in range(126)]
    return table[length]


def serialize_frame(
    opcode: int,
    payload: bytes | bytearray | memoryview = b"",
    *,
    fin: bool = True,
    rsv1: bool = False,
    mask: bool = False,
) -> bytes:
    """Return one frame's bytes. `mask=True` (client role) masks with a fresh random key."""
    b0 = (_FIN if fin else 0) | (_RSV1 if rsv1 else 0) | opcode
    n = len(payload)
    if opcode >= 0x8 and (n > MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames must be final and carry at most 125 bytes")
    if mask:
        key = os.urandom(4)
        body = apply_mask(payload, key) if n else b""
        if n < 126:
            return b"".join((bytes((b0, n | _MASK_BIT)), key, body))
        if n < 65536:
            return b"".join((_HEAD16.pack(b0, 126 | _MASK_BIT, n), key, body))
        return b"".join((_HEAD64.pack(b0, 127 | _MASK_BIT, n), key, body))
    if n < 126:
        return _short_header(b0, n) + payload
    if n < 65536:
        return b"".join((_HEAD16.pack(b0, 126, n), payload))
    return b"".join((_HEAD64.pack(b0, 127, n), payload))


def frame_header(opcode: int, payload_bytes: int) -> bytes:
    """The header of an unmasked final frame (server role) carrying `payload_bytes`: put in
    front of the payload's pieces, the frame is built with one join."""
    b0 = _FIN | opcode
    if payload_bytes < 126:
        return _short_header(b0, payload_bytes)
    if payload_bytes < 65536:
        return _HEAD16.pack(b0, 126, payload_bytes)
    return _HEAD64.pack(b0, 127, payload_bytes)


def frame_header_size(payload_bytes: int, *, masked: bool = False) -> int:
    """Bytes a frame header takes for a payload of this size."""
    size = 2 if payload_bytes < 126 else 4 if payload_bytes < 65536 else 10
    return size + 4 if masked else size
