"""Fuzz targets: one function per parser, each taking one input's bytes and returning None.

A target passes an input when every call it makes returns normally or raises one of the
typed errors its module documents (broker/errors.py): `ProtocolError` (turned into a
`ConnectionFailed` event with its close code by `Connection`), `HandshakeError` with an
HTTP status, `ClientError` with a wire code, `EnvelopeError`, or `ValueError` where a
function says so. Anything else escaping (TypeError, IndexError, RecursionError,
MemoryError, ...) is a finding, and so is a broken property, raised as `Finding`:
limits that buffers must stay within, delivered messages over `max_message_bytes`, the
same bytes giving different events when split differently, a round trip that changes data.

Limits are small (`MAX_MESSAGE` bytes per message, small HTTP limits) so the bounds are
cheap to reach and to check. The first byte(s) of an input choose the mode (role,
deflate parameters, how the bytes are split); the layout is in each target's docstring
and tests/fuzz/README.md. Nothing here imports atheris: the same functions run under
atheris (tests/fuzz/run.py), under hypothesis, and as the corpus replay in test_fuzz.py.
"""

from __future__ import annotations

import ipaddress
import json
import zlib
from collections.abc import Callable, Iterator

from broker import auth, envelope
from broker import deflate as pmd
from broker import errors as err
from broker.client_address import (
    MAX_HEADER_BYTES,
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
    Event,
    Ping,
    Pong,
    Role,
    State,
    TextMessage,
    close_payload,
    encode_broadcast,
    parse_close_payload,
)
from broker.deflate import DeflateParams, PerMessageDeflate
from broker.errors import (
    ClientError,
    EnvelopeError,
    HandshakeError,
    PayloadTooBig,
    ProtocolError,
)
from broker.frames import MAX_CONTROL_PAYLOAD, Opcode
from broker.handshake import (
    Request,
    RequestParser,
    ResponseParser,
    accept_upgrade,
    check_host,
    check_response,
    error_response,
    host_allowed,
    origin_allowed,
    same_origin,
    split_authority,
)
from worker import wire
from worker.http_routes import _static_file, decode_path

from .common import STATIC_DIR, STATIC_FILES, Finding, Reader, check, chunks, frame
from .session import fuzz_session

MAX_MESSAGE = 256  # max_message_bytes of every connection and codec under test
HEADER_SLACK = 14  # the largest frame header: 2 + 8 (length) + 4 (mask)
# Codes a Connection may fail with on received bytes (ProtocolError and its subclasses).
FAIL_CODES = frozenset({err.CLOSE_PROTOCOL_ERROR, err.CLOSE_INVALID_DATA, err.CLOSE_TOO_BIG})
VALID_CLOSE_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4000, 4999)


# --- 1. frames: the Connection's receive path, both roles -----------------------------------

Norm = tuple[object, ...]


def _norm(event: Event) -> Norm:
    if isinstance(event, TextMessage):
        return ("text", event.data)
    if isinstance(event, BinaryMessage):
        return ("binary", event.data)
    if isinstance(event, Ping):
        return ("ping", event.payload)
    if isinstance(event, Pong):
        return ("pong", event.payload)
    if isinstance(event, CloseReceived):
        return ("close", event.code, event.reason)
    if isinstance(event, ConnectionFailed):
        return ("failed", event.code)
    if isinstance(event, ConnectionLost):
        return ("lost",)
    raise Finding(f"unknown event {event!r}")


def _held_bytes(conn: Connection) -> int:
    """What the connection holds for the message and frame in progress (bytes or chars)."""
    held = conn._parser.buffered_bytes
    held += sum(len(p) for p in getattr(conn, "_msg_parts", ()))
    held += sum(len(t) for t in getattr(conn, "_msg_text", ()))
    held += sum(len(t) for t in getattr(conn, "_partial_text", ()))
    return held


def _check_events(conn: Connection, events: list[Event], chunk: int = 0) -> None:
    """Bounds on what `conn` holds after a `receive_data` of `chunk` bytes gave `events`.

    The limit is the message's (`max_message_bytes`; with deflate, the compressed frame
    bound). A partial message, the frame in progress included, holds at most the limit plus
    a frame header, plus the chunk being read (the frames a chunk completes are parsed
    before the first of them is handled)."""
    m = conn.max_message_bytes
    limit = m + (m >> 6) + 64 if conn.deflate is not None else m
    # Once failed, the parser may still hold the chunk it stopped in (dropped with it).
    buffered = conn._parser.buffered_bytes
    slack = HEADER_SLACK + (chunk if conn.state is State.CLOSED else 0)
    check(buffered <= limit + slack, f"parser holds {buffered} > {limit} + {slack} bytes")
    # What the worker's partial-input cap counts: the frame plus the message so far.
    accounted = getattr(conn, "buffered_in_bytes", buffered + conn._msg_size)
    slack = HEADER_SLACK + chunk
    check(accounted <= limit + slack, f"partial message holds {accounted} > {limit} + {slack}")
    # Also counting the text decoded ahead (UTF-8 checked as a frame arrives): one more frame.
    held = _held_bytes(conn)
    check(held <= 2 * limit + slack, f"connection holds {held} > 2 * {limit} + {slack} bytes")
    for i, event in enumerate(events):
        if isinstance(event, TextMessage):
            size = len(event.data.encode("utf-8"))
            check(size <= conn.max_message_bytes, f"text message of {size} bytes delivered")
        elif isinstance(event, BinaryMessage):
            size = len(event.data)
            check(size <= conn.max_message_bytes, f"binary message of {size} bytes delivered")
        elif isinstance(event, Ping | Pong):
            check(len(event.payload) <= MAX_CONTROL_PAYLOAD, "control payload over 125 bytes")
        elif isinstance(event, ConnectionFailed):
            check(event.code in FAIL_CODES, f"failed with unexpected code {event.code}")
        if isinstance(event, CloseReceived | ConnectionFailed | ConnectionLost):
            check(i == len(events) - 1, "events after the connection closed")
            check(conn.state is State.CLOSED, "terminal event but the state is not CLOSED")


def _answer(conn: Connection, events: list[Event], peer: Connection) -> None:
    """Make the replies the I/O layer makes; the peer's parser must accept every one."""
    out = b""
    for event in events:
        if isinstance(event, Ping):
            out += conn.pong(event)
        elif isinstance(event, CloseReceived):
            out += conn.close_reply()
        elif isinstance(event, ConnectionFailed):
            out += conn.fail_frame(event)
    if out and peer.state is not State.CLOSED:
        got = peer.receive_data(out)
        for event in got:
            check(not isinstance(event, ConnectionFailed), f"our reply broke the peer: {event}")


def _params(flags: int, bits: int) -> DeflateParams:
    return DeflateParams(
        server_no_context_takeover=not flags & 0x08,
        client_no_context_takeover=not flags & 0x08,
        server_max_window_bits=9 + (bits & 0x07) % 7,
        client_max_window_bits=9 + (bits >> 3 & 0x07) % 7,
    )


def _connection(role: Role, params: DeflateParams | None) -> Connection:
    deflate = None
    if params is not None:
        deflate = PerMessageDeflate(
            params,
            is_server=role is Role.SERVER,
            level=1,
            min_bytes=0,
            max_message_bytes=MAX_MESSAGE,
        )
    return Connection(role, max_message_bytes=MAX_MESSAGE, deflate=deflate)


def _feed(conn: Connection, parts: Iterator[bytes], peer: Connection) -> list[Norm]:
    seen: list[Norm] = []
    for part in parts:
        events = conn.receive_data(part)
        _check_events(conn, events, len(part))
        _answer(conn, events, peer)
        seen.extend(_norm(e) for e in events)
        if conn.state is State.CLOSED:
            check(conn.receive_data(b"\x81\x00") == [], "events after CLOSED")
            break
    return seen


def _same_events(whole: list[Norm], split: list[Norm]) -> bool:
    if whole == split:
        return True
    # Checks made as a frame arrives (fail fast, RFC 6455 section 8.1) may fail split bytes
    # where the whole frame failed for another reason, or vice versa: UTF-8 (1007), and the
    # size a fragment's header announces against what its message has left (1009).
    if not (whole and split and whole[-1][0] == "failed" and split[-1][0] == "failed"):
        return False
    codes = {whole[-1][1], split[-1][1]}
    early = codes & {err.CLOSE_INVALID_DATA, err.CLOSE_TOO_BIG}
    return bool(early) and whole[:-1] == split[:-1]


def fuzz_frames(data: bytes) -> None:
    """Bytes from the peer into a `Connection`, fed whole and split, both compared.

    Input: flags byte (bit 0 client role, bit 1 permessage-deflate, bit 2 structured,
    bit 3 peer keeps its compression context, bits 4-7 how to split), window-bits byte
    (bits 0-5 the two windows, bit 6: we send our close frame first), then the stream:
    raw bytes, or (structured) records built into well-formed frames by `_build_stream`,
    whose expected events are known (checked when nothing was garbage).
    """
    r = Reader(data)
    flags, bits = r.byte(), r.byte()
    role = Role.CLIENT if flags & 0x01 else Role.SERVER
    params = _params(flags, bits) if flags & 0x02 else None
    if flags & 0x04:
        stream, expected = _build_stream(r, role, params)
    else:
        stream, expected = r.rest(), None
    results = []
    for pattern in (None, flags >> 4):
        conn = _connection(role, params)
        peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        peer = _connection(peer_role, params)
        if bits & 0x40:  # LOCAL_CLOSING: what arrives is still delivered, nothing answered
            closing = peer.receive_data(conn.close(1001, "bye"))
            check(closing == [CloseReceived(1001, "bye")], f"our close frame gave {closing}")
        parts = iter([stream] if stream else []) if pattern is None else chunks(stream, pattern)
        results.append(_feed(conn, parts, peer))
    whole, split = results
    check(_same_events(whole, split), f"whole {whole!r} != split {split!r}")
    if expected is not None:
        check(whole == expected, f"events {whole!r} != expected {expected!r}")


def _build_stream(
    r: Reader, role: Role, params: DeflateParams | None
) -> tuple[bytes, list[Norm] | None]:
    """Records [kind][length][payload] into frames the peer of `role` would send.

    kind bits 0-2: 0 text, 1 binary, 2 ping, 3 pong, 4 close, 5 raw bytes (garbage),
    6 fragmented text, 7 fragmented binary; bit 3 compress (when negotiated); bits 4-5
    fragments - 1; bit 6 a ping between fragments; bit 7 payload repeated 4 times (over
    MAX_MESSAGE: 1009 expected).
    """
    mask = role is Role.SERVER  # a client peer masks
    peer_deflate = None
    if params is not None:
        peer_deflate = PerMessageDeflate(
            params,
            is_server=role is Role.CLIENT,
            level=6,
            min_bytes=0,
            max_message_bytes=1 << 20,
        )
    limit = MAX_MESSAGE + (MAX_MESSAGE >> 6) + 64 if params is not None else MAX_MESSAGE
    out: list[bytes] = []
    expected: list[Norm] | None = []
    while r.left:
        kind, length = r.byte(), r.byte()
        payload = r.take(length)
        if kind & 0x80:
            payload *= 4
        op = kind & 0x07
        if op == 5:
            out.append(payload)
            expected = None
            continue
        if op in (2, 3):
            opcode = Opcode.PING if op == 2 else Opcode.PONG
            body = payload[:MAX_CONTROL_PAYLOAD]
            out.append(frame(opcode, body, mask=mask))
            if expected is not None:
                expected.append(("ping" if op == 2 else "pong", body))
            continue
        if op == 4:
            code = VALID_CLOSE_CODES[payload[0] % len(VALID_CLOSE_CODES)] if payload else None
            body = close_payload(code, payload[1:].decode("utf-8", "replace"))
            out.append(frame(Opcode.CLOSE, body, mask=mask))
            if expected is not None:
                expected.append(("close", *parse_close_payload(body)))
            break
        text = op in (0, 6)
        opcode = Opcode.TEXT if text else Opcode.BINARY
        message = payload.decode("utf-8", "replace").encode("utf-8") if text else payload
        fragments = 1 if op in (0, 1) else (kind >> 4 & 0x03) + 1
        body, rsv1 = message, False
        if kind & 0x08 and peer_deflate is not None:
            compressed = peer_deflate.compress(message)
            if compressed is not None:
                body, rsv1 = compressed, True
        step = -(-len(body) // fragments) if body else 0
        pieces = [body[i * step : (i + 1) * step] for i in range(fragments)] if step else []
        pieces = pieces or [b""]
        failed_at = None  # index of the piece whose arrival must fail 1009
        total = 0
        for i, piece in enumerate(pieces):
            total += len(piece)
            if total > (limit if rsv1 else MAX_MESSAGE):
                failed_at = i
                break
        if failed_at is None and len(message) > MAX_MESSAGE:
            failed_at = len(pieces) - 1  # inflates past the limit once complete
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            first_opcode = opcode if i == 0 else Opcode.CONTINUATION
            out.append(frame(first_opcode, piece, fin=last, rsv1=rsv1 and i == 0, mask=mask))
            if i == failed_at:
                if expected is not None:
                    expected.append(("failed", err.CLOSE_TOO_BIG))
                return b"".join(out), expected
            if kind & 0x40 and not last:
                out.append(frame(Opcode.PING, b"p", mask=mask))
                if expected is not None:
                    expected.append(("ping", b"p"))
        if expected is not None:
            expected.append(("text", message.decode()) if text else ("binary", message))
    return b"".join(out), expected


# --- 2. handshake: request parsing + upgrade checks, response parsing + client checks -------

REQUEST_LIMITS = {
    "max_request_line_bytes": 200,
    "max_header_bytes": 1024,
    "max_headers": 24,
    "max_body_bytes": 256,
}
PARSE_STATUSES = frozenset({400, 413, 414, 431, 501, 505})
UPGRADE_STATUSES = frozenset({400, 403, 405, 426})
CLIENT_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's sample key
ORIGINS = ((), ("https://app.example",), ("*",), ("null", "http://localhost:3000"))
HOSTS = ((), ("broker.example",), (".example", "localhost:8765"))


JWT_SECRET = "fuzz-harness-secret: 48 bytes or more, for HS384 too"
VERIFIER = auth.TokenVerifier(algorithms=("HS256", "HS384"), secrets=(JWT_SECRET,))
TOKEN_STATUSES = frozenset({401})
TRUSTED = trusted_proxies(("10.0.0.0/8", "::1"))
PEER = "10.1.2.3"


def fuzz_handshake(data: bytes) -> None:
    """Input: flags byte (bits 0-1 mode: 0 server request, 1 PROXY header then a server
    request, 2 client response, 3 policy strings; bits 2-3 allowed_origins, bit 4
    compression off, bits 5-6 allowed_hosts), a split-pattern byte, then the bytes (mode 3:
    newline-separated strings)."""
    r = Reader(data)
    flags, pattern = r.byte(), r.byte() & 0x0F
    mode = flags & 0x03
    if mode == 2:
        _client_response(r.rest(), pattern, compression=not flags & 0x10)
    elif mode == 3:
        _policy(r.rest(), ORIGINS[flags >> 2 & 0x03], HOSTS[(flags >> 5 & 0x03) % len(HOSTS)])
    elif mode == 1:
        rest = _proxy_header(r.rest(), pattern)
        if rest is not None:
            _server_request(rest, pattern, flags)
    else:
        _server_request(r.rest(), pattern, flags)


def _proxy_header(raw: bytes, pattern: int) -> bytes | None:
    """What the worker does on a trusted peer with `proxy_protocol`: buffer, parse the
    buffer again on each chunk; the bytes after the header, or None (refused, incomplete)."""
    check(isinstance(starts_like_proxy_header(raw[:12] or b"x"), bool), "starts_like")
    buffer = b""
    for part in chunks(raw, pattern):
        buffer += part
        try:
            header = parse_proxy_header(buffer)
        except HandshakeError as exc:
            check(exc.status == 400, f"PROXY header refused with {exc.status}")
            _refusal(exc)
            return None
        if header is None:
            check(len(buffer) < MAX_HEADER_BYTES, f"{len(buffer)} bytes buffered, no header")
            continue
        check(0 < header.length <= min(len(buffer), MAX_HEADER_BYTES), "header length")
        if header.source is not None:
            ipaddress.ip_address(header.source)
        return buffer[header.length :] + raw[len(buffer) :]
    return None


def _parse_whole(raw: bytes) -> object:
    """The request `raw` holds, fed at once: a Request, None (incomplete) or a status."""
    try:
        return RequestParser(**REQUEST_LIMITS).feed(raw) if raw else None
    except HandshakeError as exc:
        return exc.status


def _server_request(raw: bytes, pattern: int, flags: int) -> None:
    whole = _parse_whole(raw)
    request = _parse_split(raw, pattern)
    # Split, a line may fail as too long before its LF shows it is also malformed: the
    # status may differ, the outcome may not.
    if isinstance(whole, int) or request is None:
        check(request is None, f"split bytes parsed, whole gave {whole!r}")
        return
    check(whole == request, f"whole {whole!r} != split {request!r}")
    _check_request(request, flags)


def _parse_split(raw: bytes, pattern: int) -> Request | None:
    """The request fed in chunks (bounds checked after each), None if refused/incomplete."""
    parser = RequestParser(**REQUEST_LIMITS)
    bound = sum(REQUEST_LIMITS[k] for k in ("max_request_line_bytes", "max_header_bytes"))
    request = None
    try:
        for part in chunks(raw, pattern):
            request = parser.feed(part)
            held = len(parser._buf) + len(parser._body)
            check(
                held <= bound + REQUEST_LIMITS["max_body_bytes"] + len(part) + 8,
                f"request parser holds {held} bytes",
            )
            if request is not None:
                break
    except HandshakeError as exc:
        check(exc.status in PARSE_STATUSES, f"parser refused with status {exc.status}")
        _refusal(exc)
        return None
    return request


def _check_request(request: Request, flags: int) -> None:
    check(len(request.body) <= REQUEST_LIMITS["max_body_bytes"], "body over the limit")
    decoded = decode_path(request.path)
    check(decoded is None or isinstance(decoded, str), "decode_path returned a non-str")
    if decoded is not None:
        check(not any(c < " " or c == "\x7f" for c in decoded), "control char in path")
        # `static_dir`: only a file inside it is served (no `..`, no symlink out of it).
        found = _static_file(str(STATIC_DIR), "/" if request.path == "/" else decoded)
        check(found is None or found[0] in STATIC_FILES, f"served from outside: {found!r}")
    _ = request.keep_alive, request.is_upgrade
    client = forwarded_client(request.header_values("X-Forwarded-For"), PEER, TRUSTED)
    check(client == PEER or ipaddress.ip_address(client), "forwarded client")
    try:
        token = auth.token_from_request(request)
        if token is not None:
            verified = VERIFIER.verify(token)
            check(verified.subject, "a verified token without a subject")
    except HandshakeError as exc:
        check(isinstance(exc, auth.InvalidToken), f"token refused with {type(exc).__name__}")
        check(exc.status in TOKEN_STATUSES, f"token refused with status {exc.status}")
        _refusal(exc)
    allowed_hosts = HOSTS[(flags >> 5 & 0x03) % len(HOSTS)]
    try:
        check_host(request, allowed_hosts)
    except HandshakeError as exc:
        check(exc.status == 421, f"check_host refused with status {exc.status}")
        _refusal(exc)
        return
    compression = not flags & 0x10
    try:
        accepted = accept_upgrade(
            request,
            allowed_origins=ORIGINS[flags >> 2 & 0x03],
            subprotocols=wire.SUBPROTOCOLS,
            default_subprotocol=wire.SUBPROTOCOL_JSON,
            compression=compression,
            max_window_bits=9 + (flags >> 5) % 7,
        )
    except HandshakeError as exc:
        check(exc.status in UPGRADE_STATUSES, f"upgrade refused with status {exc.status}")
        _refusal(exc)
        return
    if accepted.deflate is not None:
        PerMessageDeflate(
            accepted.deflate, is_server=True, level=1, min_bytes=0, max_message_bytes=MAX_MESSAGE
        )
    # Our own client must accept the 101 we built (the key and protocols it was asked for).
    response = ResponseParser().feed(accepted.response)
    check(response is not None and response.status == 101, "our 101 does not parse")
    assert response is not None
    offered = [
        p.strip()
        for v in request.header_values("Sec-WebSocket-Protocol")
        for p in v.split(",")
        if p.strip()
    ]
    key = request.header_values("Sec-WebSocket-Key")[0]
    try:
        established = check_response(response, key=key, subprotocols=offered, compression=True)
    except HandshakeError as exc:
        # Only a peer window our client never offers (8 bits, zlib cannot) is refused.
        bits8 = accepted.deflate is not None and accepted.deflate.client_max_window_bits == 8
        check(exc.status == 101 and bits8, f"our own 101 refused by our client: {exc}")
        return
    check((established.deflate is None) == (accepted.deflate is None), "deflate lost")
    if established.subprotocol is not None:
        check(established.subprotocol == accepted.subprotocol, "subprotocol changed")


def _refusal(exc: HandshakeError) -> None:
    response = ResponseParser().feed(error_response(exc))
    check(response is not None and response.status == exc.status, "refusal does not parse")


def _client_response(raw: bytes, pattern: int, *, compression: bool) -> None:
    parser = ResponseParser(max_header_bytes=1024, max_headers=24)
    response = None
    try:
        for part in chunks(raw, pattern):
            response = parser.feed(part)
            check(len(parser._buf) <= 2 * 1024 + len(part) + 8, "response parser grows")
            if response is not None:
                break
    except HandshakeError as exc:
        check(exc.status in (400, 431, 505), f"response parser status {exc.status}")
        return
    if response is None:
        return
    try:
        established = check_response(
            response, key=CLIENT_KEY, subprotocols=wire.SUBPROTOCOLS, compression=compression
        )
    except HandshakeError as exc:
        check(exc.status == response.status, "client refusal with another status")
        return
    check(response.status == 101, "a non-101 response established a connection")
    if established.deflate is not None:
        conn = _connection(Role.CLIENT, established.deflate)
        _check_events(conn, conn.receive_data(parser.leftover or b"\x88\x00"))


def _policy(raw: bytes, allowed_origins: tuple[str, ...], allowed_hosts: tuple[str, ...]) -> None:
    for line in raw.decode("latin-1").split("\n")[:8]:
        origin, _, host = line.partition(" ")
        check(isinstance(origin_allowed(origin, host, allowed_origins), bool), "origin")
        check(isinstance(same_origin(origin, host), bool), "same_origin")
        check(isinstance(host_allowed(host, allowed_hosts), bool), "host_allowed")
        check(host_allowed(host, ()) is True, "no allowed_hosts must admit any Host")
        parts = split_authority(host)
        if parts is not None:
            name, port = parts
            check(name == name.lower() and (port is None or 0 <= port <= 65535), "authority")
        try:
            negotiated = pmd.negotiate_server([line], max_window_bits=15)
        except HandshakeError as exc:
            check(exc.status == 400, f"extension offer refused with {exc.status}")
            negotiated = None
        if negotiated is not None:
            params, value = negotiated
            if params.client_max_window_bits != 8:
                answer = pmd.accept_client_response([value])
                check(answer is not None, "our own extension answer refused")
        try:
            pmd.accept_client_response([line])
        except HandshakeError as exc:
            check(exc.status == 101, f"extension response refused with {exc.status}")


# --- 3. permessage-deflate: inflation with limits, round trips, bombs ------------------------


def fuzz_deflate(data: bytes) -> None:
    """Input: flags byte (bit 0 we are the server, bit 1 peer keeps context, bits 2-3
    mode: 0 inflate raw messages, 1 round trip, 2 bomb, 3 Connection with a bomb frame),
    window-bits byte, then messages as [length byte][bytes] (mode 2/3: the bomb's seed)."""
    r = Reader(data)
    flags, bits = r.byte(), r.byte()
    is_server = bool(flags & 0x01)
    no_context = not flags & 0x02
    params = DeflateParams(
        server_no_context_takeover=no_context,
        client_no_context_takeover=no_context,
        server_max_window_bits=9 + (bits & 0x07) % 7,
        client_max_window_bits=9 + (bits >> 3 & 0x07) % 7,
    )
    # The window the peer compresses with (what the receiver inflates with).
    peer_bits = params.client_max_window_bits if is_server else params.server_max_window_bits
    receiver = PerMessageDeflate(
        params, is_server=is_server, level=6, min_bytes=0, max_message_bytes=MAX_MESSAGE
    )
    mode = flags >> 2 & 0x03
    if mode == 0:
        while r.left:
            try:
                out = receiver.decompress(r.take(r.byte()))
            except ProtocolError as exc:  # PayloadTooBig is one (1009)
                check(exc.close_code in (1002, 1009), f"inflate failed with {exc.close_code}")
                continue
            check(len(out) <= MAX_MESSAGE, f"inflated {len(out)} bytes past the limit")
    elif mode == 1:
        sender = PerMessageDeflate(
            params,
            is_server=not is_server,
            level=bits % 10,
            min_bytes=flags >> 4,
            max_message_bytes=1 << 20,
        )
        while r.left:
            length = r.byte()
            message = r.take(length & 0x7F) * (8 if length & 0x80 else 1)
            compressed = sender.compress(message)
            if compressed is None:
                continue
            try:
                out = receiver.decompress(compressed)
            except PayloadTooBig:
                check(len(message) > MAX_MESSAGE, "a message within the limit refused")
                return  # the receiver dropped its context: the stream cannot go on
            check(out == message, "round trip changed the message")
        shared = pmd.shared_compress(r.data, window_bits=9 + bits % 7, level=bits % 10)
        inflated = zlib.decompressobj(-15).decompress(shared + b"\x00\x00\xff\xff")
        check(inflated == r.data, "shared_compress round trip changed the data")
        # A broadcast frame (compressed once for every client) reaches a client as sent.
        window = 9 + bits % 7
        client_params = DeflateParams(
            server_no_context_takeover=True, server_max_window_bits=window
        )
        client = _connection(Role.CLIENT, client_params)
        message = r.data[:MAX_MESSAGE]
        broadcast = encode_broadcast(Opcode.BINARY, message, compress_window_bits=window)
        events = [_norm(e) for e in client.receive_data(broadcast)]
        check(events == [("binary", message)], f"broadcast gave {events!r}")
    else:
        seed = r.rest() or b"\x00"
        bomb = seed * (MAX_MESSAGE * 64 // len(seed) + 1)  # well past the limit
        compressor = zlib.compressobj(9, zlib.DEFLATED, -peer_bits)
        payload = (compressor.compress(bomb) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
        if mode == 2:
            try:
                out = receiver.decompress(payload)
            except PayloadTooBig:
                return
            raise Finding(f"a {len(bomb)}-byte bomb inflated to {len(out)} bytes")
        role = Role.SERVER if is_server else Role.CLIENT
        conn = _connection(role, params)
        bomb_frame = frame(Opcode.BINARY, payload, rsv1=True, mask=role is Role.SERVER)
        events = conn.receive_data(bomb_frame)
        _check_events(conn, events)
        check(events and _norm(events[-1]) == ("failed", 1009), f"bomb gave {events!r}")


# --- 4. wire: the client request decoder (JSON and msgpack) and bus envelopes ---------------

CLIENT_CODES = frozenset({wire.BAD_REQUEST, wire.UNKNOWN_OP, wire.TOO_LARGE, wire.BAD_TOPIC})


def fuzz_wire(data: bytes) -> None:
    """Input: flags byte (bits 0-1 mode: 0 JSON text frame, 1 msgpack binary frame, 2 the
    other frame type (refused), 3 bus envelope; bits 2-7 max_data_depth - 1), then the frame."""
    r = Reader(data)
    flags = r.byte()
    mode = flags & 0x03
    raw = r.rest()
    if mode == 3:
        _envelope(raw)
        return
    # Mode 2 sends the frame type the codec does not speak (JSON: binary, msgpack: text).
    binary = mode == 1 or (mode == 2 and bool(flags & 0x04))
    wrong_type = mode == 2
    codec = wire.WireCodec(
        wire.SUBPROTOCOL_MSGPACK if binary else wire.SUBPROTOCOL_JSON,
        max_topic_bytes=32,
        max_data_bytes=MAX_MESSAGE - 32 - 64,
        max_data_depth=(flags >> 2) + 1,
    )
    text = raw.decode("utf-8", "replace")
    frame: str | bytes = raw if binary != wrong_type else text
    try:
        request = codec.decode(frame)
    except ClientError as exc:
        check(exc.code in CLIENT_CODES, f"unexpected error code {exc.code}")
        _sendable(codec.error(exc.request_id, exc.code, exc.reason), binary)
        return
    check(request.op in wire._OPS, f"op {request.op!r}")
    check(request.id is None or isinstance(request.id, int | str), "id type")
    _sendable(codec.ack(request.id), binary)
    # Whatever the session may echo or hand on (ids, options: keys, tokens, epochs) is text
    # a UTF-8 frame, Redis or a JWT library can take.
    _encodable((request.id, request.options))
    if request.topic is not None:
        check(wire.check_client_topic(request.topic, 32) == request.topic, "topic not checked")
    else:
        check(request.op in ("ping", "refresh"), f"{request.op} without a topic")
    if request.op != "publish":
        return
    payload = request.payload
    check(isinstance(payload, bytes) and len(payload) <= codec.max_data_bytes, "payload")
    assert payload is not None and request.topic is not None
    # Every subscriber can receive it, in either encoding.
    for to_binary in (False, True):
        body = wire.message_frame_body(request.topic, payload, request.encoding, binary=to_binary)
        decoded = envelope.msgpack_loads(body) if to_binary else json.loads(body)
        check(decoded["op"] == "message" and "data" in decoded, "message frame")
    # And it travels over the bus unchanged.
    message = envelope.BusMessage(request.topic, payload, request.encoding, "fuzz", 7, "e")
    check(envelope.unpack(envelope.pack(message)) == message, "envelope round trip")


def _sendable(reply: str | bytes, binary: bool) -> None:
    """A reply is sent as a binary frame (msgpack) or a text frame: UTF-8 it must be."""
    check(isinstance(reply, bytes if binary else str), "reply of the wrong frame type")
    if isinstance(reply, str):
        try:
            reply.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Finding(f"a reply cannot be sent as a text frame: {exc}") from None


def _encodable(value: object) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise Finding(f"request text that is not Unicode text: {exc}") from None
        elif isinstance(item, dict):
            stack.extend(item.items())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _envelope(raw: bytes) -> None:
    try:
        message = envelope.unpack(raw)
    except EnvelopeError:
        pass
    else:
        check(envelope.unpack(envelope.pack(message)) == message, "envelope round trip")
    for loads in (envelope.msgpack_loads, wire.loads_json):
        try:
            loads(raw)
        except ValueError:
            pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": fuzz_frames,
    "handshake": fuzz_handshake,
    "deflate": fuzz_deflate,
    "wire": fuzz_wire,
    "session": fuzz_session,
}
