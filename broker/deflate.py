"""permessage-deflate (RFC 7692): header parsing, negotiation, and the per-message codec.

Sans-I/O: strings in, parameters out; bytes in, bytes out. Both roles share it all.

Theory of operation:
- The server always answers with `server_no_context_takeover` (RFC 7692 section 7.1.1.1
  lets it), so every message it sends is independent of earlier ones. A broadcast is then
  compressed once by `shared_compress` (one process-wide compressobj per window size and
  level, reset by Z_FULL_FLUSH after each message) and the same bytes go to every client.
- The server also always answers with `client_no_context_takeover`, asked for or not
  (section 7.1.1.2 lets it), so what a client sends never refers to an earlier message and
  the server keeps no inflate window between messages: each message gets a fresh
  decompressobj, dropped when it is inflated. A connection that once sent a compressed
  message then holds no zlib state (~40 KiB with a 32 KiB window) while it is idle.
  A fresh object per message costs about what a `copy()` of a pristine shared one does
  (docs/performance.md); one inflater shared across connections without a reset would be
  unsafe: a message referring back past its own start must fail, not read another
  client's data.
- zlib objects are created lazily, on the first message that needs one, and dropped after
  each message when the sender has no context takeover: idle connections stay small.
- Inflation is bounded: a message never inflates past `max_message_bytes` (zip bombs).
- zlib cannot produce an 8-bit raw deflate window (madler/zlib#171), so we never agree to
  compress with one; an 8-bit peer window is inflated with 9 bits, which decodes it.
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from broker.errors import HandshakeError, PayloadTooBig, ProtocolError

EXTENSION_NAME = "permessage-deflate"
Extension = tuple[str, list[tuple[str, str | None]]]

# RFC 7692 section 7.2.1: a sync flush ends with this empty stored block; senders strip it,
# receivers put it back (section 7.2.2).
_TAIL = b"\x00\x00\xff\xff"
# RFC 7692 section 7.2.3.6: an empty message compresses to a single 0x00 octet.
_EMPTY_BLOCK = b"\x00"
# RFC 7692 section 7.1.2: window bits are 8..15, decimal, no leading zeros.
_WINDOW_BITS = {str(n): n for n in range(8, 16)}
_PARAM_NAMES = frozenset(
    (
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    )
)


@dataclass(frozen=True, slots=True)
class DeflateParams:
    """The agreed parameters (RFC 7692 section 7.1); window bits are 8..15."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15

    def __post_init__(self) -> None:
        for bits in (self.server_max_window_bits, self.client_max_window_bits):
            if not 8 <= bits <= 15:
                raise ValueError(f"window bits must be 8..15, got {bits}")


# --- Sec-WebSocket-Extensions grammar (RFC 6455 section 9.1, RFC 7230 section 3.2.6) ---

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_QUOTED = re.compile(r'"((?:[\t !#-\[\]-~]|\\[\t -~])*)"')
_UNESCAPE = re.compile(r"\\(.)")
_OWS = re.compile(r"[ \t]*")


def parse_extensions(values: Iterable[str]) -> list[Extension]:
    """Parse Sec-WebSocket-Extensions header values into `(name, [(param, value)])` pairs.

    `value` is None for a parameter without one; quoted values are unescaped. Raises
    HandshakeError(400) on malformed syntax.
    """
    result: list[Extension] = []
    for value in values:
        result.extend(_parse_value(value))
    return result


def _parse_value(header: str) -> list[Extension]:
    # extension-list = 1#extension; extension = token *( ";" extension-param )
    items: list[Extension] = []
    end = len(header)
    pos = _skip_ows(header, 0)
    while True:
        # RFC 7230 section 7: a recipient ignores empty list elements.
        while pos < end and header[pos] == ",":
            pos = _skip_ows(header, pos + 1)
        if pos == end:
            break
        name, pos = _token(header, pos)
        params: list[tuple[str, str | None]] = []
        while pos < end and header[pos] == ";":
            param, pos = _token(header, _skip_ows(header, pos + 1))
            value: str | None = None
            if pos < end and header[pos] == "=":
                pos = _skip_ows(header, pos + 1)
                if pos < end and header[pos] == '"':
                    match = _QUOTED.match(header, pos)
                    if match is None:
                        raise _malformed("bad quoted-string", pos)
                    value = _UNESCAPE.sub(r"\1", match.group(1))
                    # RFC 6455 section 9.1: the unescaped value MUST be a token.
                    if _TOKEN.fullmatch(value) is None:
                        raise _malformed("quoted value is not a token", pos)
                    pos = _skip_ows(header, match.end())
                else:
                    value, pos = _token(header, pos)
            params.append((param, value))
        items.append((name, params))
        if pos < end and header[pos] != ",":
            raise _malformed("expected ',' or ';'", pos)
    if not items:
        raise _malformed("no extension", 0)
    return items


def _token(header: str, pos: int) -> tuple[str, int]:
    match = _TOKEN.match(header, pos)
    if match is None:
        raise _malformed("expected a token", pos)
    return match.group(), _skip_ows(header, match.end())


def _skip_ows(header: str, pos: int) -> int:
    match = _OWS.match(header, pos)
    return match.end() if match else pos


def _malformed(what: str, pos: int) -> HandshakeError:
    return HandshakeError(400, f"malformed Sec-WebSocket-Extensions: {what} at {pos}")


# --- negotiation (RFC 7692 section 7.1) ---


class _BadParams(ValueError):
    """Parameters that make an offer declined (section 5) or a response invalid."""


def _read_params(params: list[tuple[str, str | None]], *, in_offer: bool) -> dict[str, int | None]:
    """Check names, duplicates and values; map name -> window bits or None (no value)."""
    seen: dict[str, int | None] = {}
    for name, value in params:
        if name not in _PARAM_NAMES:
            raise _BadParams(f"unknown parameter {name}")
        if name in seen:
            raise _BadParams(f"duplicate parameter {name}")
        if name.endswith("_no_context_takeover"):
            if value is not None:
                raise _BadParams(f"{name} takes no value")
            seen[name] = None
        elif value is None and in_offer and name == "client_max_window_bits":
            seen[name] = None  # section 7.1.2.2: "I support it", only in offers
        elif value in _WINDOW_BITS:
            seen[name] = _WINDOW_BITS[value]
        else:
            raise _BadParams(f"invalid {name} value {value!r}")
    return seen


def _check_own_bits(max_window_bits: int) -> None:
    if not 9 <= max_window_bits <= 15:
        raise ValueError(f"max_window_bits must be 9..15, got {max_window_bits}")


def negotiate_server(
    offer_values: Iterable[str], *, max_window_bits: int
) -> tuple[DeflateParams, str] | None:
    """Pick the first acceptable permessage-deflate offer: `(params, response value)` or None.

    The answer always holds server_no_context_takeover and client_no_context_takeover.
    Raises HandshakeError(400) if the header is malformed. Offers with unknown, duplicate or
    invalid parameters are declined (RFC 7692 section 5), and so is server_max_window_bits=8.
    """
    _check_own_bits(max_window_bits)
    for name, params in parse_extensions(offer_values):
        if name != EXTENSION_NAME:
            continue
        try:
            offer = _read_params(params, in_offer=True)
        except _BadParams:
            continue
        # Section 7.1.2.1: answer with the same or a smaller value; we may add one unasked.
        asked = offer.get("server_max_window_bits")
        if asked == 8:
            continue
        server_bits = min(asked or 15, max_window_bits)
        # Sections 7.1.1.1 and 7.1.1.2: the server may always declare both, asked or not;
        # without client context takeover it keeps no inflate window between messages.
        response = [EXTENSION_NAME, "server_no_context_takeover", "client_no_context_takeover"]
        if asked is not None or server_bits < 15:
            response.append(f"server_max_window_bits={server_bits}")
        # Section 7.1.2.2: a valued offer is only a hint until we echo it; echoing lets us
        # inflate with the smaller window. Without the parameter we must not send it.
        client_bits = offer.get("client_max_window_bits")
        if client_bits is not None:
            response.append(f"client_max_window_bits={client_bits}")
        agreed = DeflateParams(
            server_no_context_takeover=True,
            client_no_context_takeover=True,
            server_max_window_bits=server_bits,
            client_max_window_bits=client_bits or 15,
        )
        return agreed, "; ".join(response)
    return None


def client_offer(*, max_window_bits: int = 15) -> str:
    """The client's Sec-WebSocket-Extensions offer; below 15 bits it limits both directions."""
    _check_own_bits(max_window_bits)
    if max_window_bits == 15:
        return f"{EXTENSION_NAME}; client_max_window_bits"
    return (
        f"{EXTENSION_NAME}; server_max_window_bits={max_window_bits}"
        f"; client_max_window_bits={max_window_bits}"
    )


def accept_client_response(
    values: Iterable[str], *, max_window_bits: int = 15
) -> DeflateParams | None:
    """Check the server's answer to `client_offer(max_window_bits=...)`.

    None if the server accepted no extension. Anything invalid raises HandshakeError with
    status 101 (the status received): the client then fails the connection (RFC 6455 4.1).
    """
    _check_own_bits(max_window_bits)
    try:
        extensions = parse_extensions(values)
    except HandshakeError as exc:
        raise HandshakeError(101, exc.reason) from None
    if not extensions:
        return None
    if len(extensions) > 1 or extensions[0][0] != EXTENSION_NAME:
        names = ", ".join(name for name, _ in extensions)
        raise _refused(f"server accepted extensions we did not offer: {names}")
    try:
        answer = _read_params(extensions[0][1], in_offer=False)
    except _BadParams as exc:
        raise _refused(str(exc)) from None
    server_bits = answer.get("server_max_window_bits")
    if max_window_bits < 15:
        # Section 7.1.2.1: accepting our server_max_window_bits means echoing it, <= ours.
        if server_bits is None or server_bits > max_window_bits:
            raise _refused(f"server_max_window_bits={server_bits} does not honour our offer")
    # Section 7.1.2.2: the server may limit our window, never widen what we offered.
    client_bits = answer.get("client_max_window_bits")
    if client_bits == 8:
        raise _refused("client_max_window_bits=8 is not supported (zlib limitation)")
    if client_bits is not None and client_bits > max_window_bits:
        raise _refused(f"client_max_window_bits={client_bits} exceeds our offer")
    return DeflateParams(
        server_no_context_takeover="server_no_context_takeover" in answer,
        client_no_context_takeover="client_no_context_takeover" in answer,
        server_max_window_bits=server_bits or 15,
        client_max_window_bits=min(client_bits or 15, max_window_bits),
    )


def _refused(reason: str) -> HandshakeError:
    return HandshakeError(101, f"invalid permessage-deflate response: {reason}")


# --- compression (RFC 7692 section 7.2) ---

_shared: dict[tuple[int, int], zlib._Compress] = {}
_shared_lock = threading.Lock()


def shared_compress(data: bytes, *, window_bits: int, level: int) -> bytes:
    """Compress one message independently of any other, tail stripped (section 7.2.1).

    One compressobj per (window_bits, level) serves the whole process: Z_FULL_FLUSH resets
    its history after each message, which costs far less than a new deflateInit.
    """
    if not data:
        return _EMPTY_BLOCK
    key = (window_bits, level)
    with _shared_lock:
        compressor = _shared.get(key)
        if compressor is None:
            _check_own_bits(window_bits)
            compressor = _shared[key] = zlib.compressobj(level, zlib.DEFLATED, -window_bits)
        try:
            out = compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
        except BaseException:
            del _shared[key]  # possibly mid-message: never reuse it
            raise
    return out[:-4]


class PerMessageDeflate:
    """Compression state of one connection for one role."""

    __slots__ = (
        "_compressor",
        "_decompressor",
        "_level",
        "_own_bits",
        "_own_no_context",
        "_peer_bits",
        "_peer_no_context",
        "max_message_bytes",
        "min_bytes",
    )

    def __init__(
        self,
        params: DeflateParams,
        *,
        is_server: bool,
        level: int,
        min_bytes: int,
        max_message_bytes: int,
    ) -> None:
        if is_server:
            own_bits, peer_bits = params.server_max_window_bits, params.client_max_window_bits
            self._own_no_context = params.server_no_context_takeover
            self._peer_no_context = params.client_no_context_takeover
        else:
            own_bits, peer_bits = params.client_max_window_bits, params.server_max_window_bits
            self._own_no_context = params.client_no_context_takeover
            self._peer_no_context = params.server_no_context_takeover
        _check_own_bits(own_bits)
        self._own_bits = own_bits
        self._peer_bits = max(9, peer_bits)  # a larger inflate window decodes a smaller one
        self._level = level
        self.min_bytes = min_bytes
        self.max_message_bytes = max_message_bytes
        self._compressor: zlib._Compress | None = None
        self._decompressor: zlib._Decompress | None = None

    def compress(self, data: bytes) -> bytes | None:
        """The compressed payload to send with RSV1 set, or None to send `data` as it is."""
        size = len(data)
        if size < self.min_bytes or size == 0:
            return None
        if self._own_no_context:
            out = shared_compress(data, window_bits=self._own_bits, level=self._level)
            return out if len(out) < size else None
        compressor = self._compressor
        if compressor is None:
            compressor = self._compressor = zlib.compressobj(
                self._level, zlib.DEFLATED, -self._own_bits
            )
        out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        if len(out) - 4 < size:
            return out[:-4]
        # Sent uncompressed, so the peer's window never holds this message: a full flush
        # makes the next message refer to nothing before this point.
        compressor.flush(zlib.Z_FULL_FLUSH)
        return None

    def decompress(self, data: bytes) -> bytes:
        """Inflate one whole message payload (all its frames joined), at most max_message_bytes.

        Raises PayloadTooBig (1009) past the limit, ProtocolError (1002) on corrupt data.
        """
        if self._peer_no_context:
            # Section 7.1.1.2: nothing refers to earlier messages, so nothing is kept.
            decompressor = zlib.decompressobj(-self._peer_bits)
        else:
            decompressor = self._decompressor
            if decompressor is None:
                decompressor = self._decompressor = zlib.decompressobj(-self._peer_bits)
        limit = self.max_message_bytes
        try:
            # Section 7.2.2: append the tail; inflate at most one byte past the limit.
            out = decompressor.decompress(b"".join((data, _TAIL)), limit + 1)
        except zlib.error as exc:
            self._decompressor = None
            raise ProtocolError(f"invalid compressed data: {exc}") from None
        if decompressor.unconsumed_tail or len(out) > limit:
            self._decompressor = None
            raise PayloadTooBig(f"message inflates past {limit} bytes")
        # Section 7.2.3.4: a block with BFINAL set ends the stream; start afresh next time.
        if decompressor.eof:
            self._decompressor = None
        return out
