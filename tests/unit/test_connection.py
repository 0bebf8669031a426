"""broker.connection: the Sans-I/O state machine, both roles, against RFC 6455 sections 5-7.

Frames a peer sends are built with `serialize_frame` (checked against the RFC on its own in
test_frames.py) or by hand where they must be malformed. What a `Connection` sends is read
back by a `Connection` of the other role, so both directions go through the real parser.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from broker import errors
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
    is_valid_close_code,
    parse_close_payload,
)
from broker.deflate import DeflateParams, PerMessageDeflate
from broker.errors import ConnectionClosedError, InvalidUTF8, ProtocolError
from broker.frames import Opcode, serialize_frame
from broker.masking import apply_mask_plain
from broker.settings import Settings

LIMIT = Settings().max_message_bytes
ROLES = [Role.SERVER, Role.CLIENT]
CONT, TEXT, BINARY = Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY
CLOSE, PING, PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG
EVENT_TYPES = (TextMessage, BinaryMessage, Ping, Pong, CloseReceived, ConnectionFailed)
TERMINAL = (CloseReceived, ConnectionFailed, ConnectionLost)
# The params our server answers with (it always declares server_no_context_takeover).
NEGOTIATED = DeflateParams(server_no_context_takeover=True)


def other(role: Role) -> Role:
    return Role.CLIENT if role is Role.SERVER else Role.SERVER


def deflate_for(
    role: Role, params: DeflateParams = NEGOTIATED, *, limit: int = LIMIT, min_bytes: int = 0
) -> PerMessageDeflate:
    return PerMessageDeflate(
        params,
        is_server=role is Role.SERVER,
        level=6,
        min_bytes=min_bytes,
        max_message_bytes=limit,
    )


def conn(
    role: Role, *, limit: int = LIMIT, deflate: bool = False, min_bytes: int = 0
) -> Connection:
    pmd = deflate_for(role, limit=limit, min_bytes=min_bytes) if deflate else None
    return Connection(role, max_message_bytes=limit, deflate=pmd)


def frame_from_peer(
    role: Role, opcode: int, payload: bytes = b"", *, fin: bool = True, rsv1: bool = False
) -> bytes:
    """A frame the peer of a `role` connection sends: clients mask, servers do not."""
    return serialize_frame(opcode, payload, fin=fin, rsv1=rsv1, mask=role is Role.SERVER)


def raw_frame(b0: int, payload: bytes, *, masked: bool) -> bytes:
    """A frame built by hand from RFC 6455 section 5.2 (any bits, any payload)."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 65536:
        head = bytes((b0, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = b"\x12\x34\x56\x78"
    return head + key + apply_mask_plain(payload, key)


def close_from_peer(role: Role, payload: bytes) -> bytes:
    return frame_from_peer(role, CLOSE, payload)


def fragments(role: Role, opcode: int, parts: Iterable[bytes], *, rsv1: bool = False) -> bytes:
    parts = list(parts)
    out = []
    for i, part in enumerate(parts):
        first, last = i == 0, i == len(parts) - 1
        out.append(
            frame_from_peer(role, opcode if first else CONT, part, fin=last, rsv1=rsv1 and first)
        )
    return b"".join(out)


def read_back(role: Role, data: bytes, *, deflate: bool = False) -> list[Event]:
    """What the peer of a `role` connection makes of bytes that connection produced."""
    return conn(other(role), deflate=deflate).receive_data(data)


def feed_bytewise(c: Connection, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events.extend(c.receive_data(data[i : i + 1]))
    return events


def failed(events: list[Event], code: int) -> None:
    assert events, "expected a ConnectionFailed event"
    assert isinstance(events[-1], ConnectionFailed), events
    assert events[-1].code == code, events[-1]


# --- the transition table of the module docstring ------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_open_close_by_us_goes_local_closing(role: Role) -> None:
    c = conn(role)
    frame = c.close(errors.CLOSE_GOING_AWAY, "bye")
    assert c.state is State.LOCAL_CLOSING
    assert c.close_sent == (errors.CLOSE_GOING_AWAY, "bye")
    assert read_back(role, frame) == [CloseReceived(errors.CLOSE_GOING_AWAY, "bye")]
    assert c.close() == b""  # only one close frame (RFC 6455 section 5.5.1)
    assert not c.can_send
    with pytest.raises(ConnectionClosedError) as info:
        c.send_text("late")
    assert info.value.code == errors.CLOSE_GOING_AWAY
    with pytest.raises(ConnectionClosedError):
        c.send_ping()


@pytest.mark.parametrize("role", ROLES)
def test_open_peer_close_goes_closed_and_is_replied(role: Role) -> None:
    c = conn(role)
    events = c.receive_data(close_from_peer(role, close_payload(1000, "done")))
    assert events == [CloseReceived(1000, "done")]
    assert c.state is State.CLOSED
    assert c.close_received == (1000, "done")
    reply = c.close_reply()
    assert read_back(role, reply) == [CloseReceived(1000, "")]
    assert c.close_reply() == b""  # replied once
    assert c.close() == b""
    assert not c.can_send


@pytest.mark.parametrize("role", ROLES)
def test_local_closing_peer_close_goes_closed_without_reply(role: Role) -> None:
    c = conn(role)
    c.close(1000)
    events = c.receive_data(close_from_peer(role, close_payload(1000)))
    assert events == [CloseReceived(1000, "")]
    assert c.state is State.CLOSED
    assert c.close_reply() == b""


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("closing", [False, True], ids=["open", "local-closing"])
def test_protocol_error_goes_closed_with_failure(role: Role, closing: bool) -> None:
    c = conn(role)
    if closing:
        c.close()
    # A frame masked the wrong way for the role breaks RFC 6455 section 5.1.
    bad = serialize_frame(TEXT, b"x", mask=role is Role.CLIENT)
    events = c.receive_data(bad)
    failed(events, errors.CLOSE_PROTOCOL_ERROR)
    assert c.state is State.CLOSED


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("closing", [False, True], ids=["open", "local-closing"])
def test_eof_goes_closed_with_connection_lost(role: Role, closing: bool) -> None:
    c = conn(role)
    if closing:
        c.close()
    c.receive_data(frame_from_peer(role, TEXT, b"partial")[:3])  # half a frame, then EOF
    assert c.receive_data(b"") == [ConnectionLost()]
    assert ConnectionLost().code == errors.CLOSE_ABNORMAL
    assert c.state is State.CLOSED
    assert not c.can_send
    with pytest.raises(ConnectionClosedError) as info:
        c.send_binary(b"x")
    assert info.value.code == (errors.CLOSE_NORMAL if closing else errors.CLOSE_ABNORMAL)


def _to_closed(role: Role, how: str) -> Connection:
    c = conn(role)
    if how == "peer-close":
        c.receive_data(close_from_peer(role, close_payload(1000)))
    elif how == "close-then-peer-close":
        c.close()
        c.receive_data(close_from_peer(role, close_payload(1000)))
    elif how == "failure":
        c.receive_data(frame_from_peer(role, CONT, b"x"))
    else:
        c.receive_data(b"")
    assert c.state is State.CLOSED
    return c


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("how", ["peer-close", "close-then-peer-close", "failure", "eof"])
def test_closed_ignores_everything(role: Role, how: str) -> None:
    c = _to_closed(role, how)
    assert c.receive_data(frame_from_peer(role, TEXT, b"hello")) == []
    assert c.receive_data(frame_from_peer(role, PING, b"p")) == []
    assert c.receive_data(b"\xff\xff\xff garbage") == []
    assert c.receive_data(close_from_peer(role, close_payload(1000))) == []
    assert c.receive_data(b"") == []
    assert c.state is State.CLOSED


@pytest.mark.parametrize("role", ROLES)
def test_messages_in_local_closing_are_delivered(role: Role) -> None:
    c = conn(role)
    c.close()
    data = (
        frame_from_peer(role, TEXT, b"still")
        + fragments(role, BINARY, [b"a", b"b"])
        + frame_from_peer(role, PING, b"p")
        + close_from_peer(role, close_payload(1000))
    )
    events = c.receive_data(data)
    assert events == [
        TextMessage("still"),
        BinaryMessage(b"ab"),
        Ping(b"p"),
        CloseReceived(1000, ""),
    ]
    assert c.pong(events[2]) == b""  # nothing after our close frame
    assert c.state is State.CLOSED


@pytest.mark.parametrize("role", ROLES)
def test_bytes_after_close_frame_are_not_parsed(role: Role) -> None:
    c = conn(role)
    data = close_from_peer(role, close_payload(1000)) + frame_from_peer(role, TEXT, b"late")
    assert c.receive_data(data) == [CloseReceived(1000, "")]


# --- data messages, both roles ---------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_send_reaches_peer(role: Role) -> None:
    c = conn(role)
    big = bytes(range(256)) * 300  # 16- and 64-bit lengths
    data = (
        c.send_text("héllo")
        + c.send_binary(b"\x00\x01")
        + c.send_binary(big)
        + c.send_ping(b"pp")
        + c.send_pong(b"qq")
    )
    assert read_back(role, data) == [
        TextMessage("héllo"),
        BinaryMessage(b"\x00\x01"),
        BinaryMessage(big),
        Ping(b"pp"),
        Pong(b"qq"),
    ]


@pytest.mark.parametrize("role", ROLES)
def test_control_frames_between_fragments(role: Role) -> None:
    c = conn(role)
    data = (
        frame_from_peer(role, TEXT, b"he", fin=False)
        + frame_from_peer(role, PING, b"1")
        + frame_from_peer(role, CONT, b"ll", fin=False)
        + frame_from_peer(role, PONG, b"2")
        + frame_from_peer(role, CONT, b"o", fin=True)
    )
    events = c.receive_data(data)
    assert events == [Ping(b"1"), Pong(b"2"), TextMessage("hello")]
    assert read_back(role, c.pong(events[0])) == [Pong(b"1")]


@pytest.mark.parametrize("role", ROLES)
def test_empty_messages(role: Role) -> None:
    c = conn(role)
    data = (
        frame_from_peer(role, TEXT, b"")
        + frame_from_peer(role, BINARY, b"")
        + fragments(role, TEXT, [b"", b"", b""])
    )
    assert c.receive_data(data) == [TextMessage(""), BinaryMessage(b""), TextMessage("")]


# --- byte by byte == whole (Hypothesis) ------------------------------------------------------


@st.composite
def message_streams(
    draw: st.DrawFn,
) -> tuple[list[tuple[str, bytes, list[int], list[bytes]]], bool]:
    """Messages as (kind, payload, split points, pings after each fragment but the last)."""
    msgs = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "binary"]))
        if kind == "text":
            payload = draw(st.text(max_size=60)).encode("utf-8")
        else:
            payload = draw(st.binary(max_size=60))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        pings = [draw(st.binary(max_size=8)) for _ in cuts]
        msgs.append((kind, payload, cuts, pings))
    return msgs, draw(st.booleans())


def _stream(role: Role, msgs, end_with_close: bool, *, deflate: bool) -> tuple[bytes, list]:
    """The wire bytes a peer sends for `msgs`, and the events they must produce."""
    compressor = deflate_for(other(role)) if deflate else None
    out: list[bytes] = []
    expected: list[Event] = []
    for kind, payload, cuts, pings in msgs:
        opcode = TEXT if kind == "text" else BINARY
        body, rsv1 = payload, False
        if compressor is not None:
            packed = compressor.compress(payload)
            if packed is not None:
                body, rsv1 = packed, True
        bounds = [0, *[min(c, len(body)) for c in cuts], len(body)]
        parts = [body[a:b] for a, b in itertools.pairwise(bounds)]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            op = opcode if i == 0 else CONT
            out.append(frame_from_peer(role, op, part, fin=last, rsv1=rsv1 and i == 0))
            if not last:
                out.append(frame_from_peer(role, PING, pings[i]))
                expected.append(Ping(pings[i]))
        expected.append(TextMessage(payload.decode()) if kind == "text" else BinaryMessage(payload))
    if end_with_close:
        out.append(close_from_peer(role, close_payload(1000, "end")))
        expected.append(CloseReceived(1000, "end"))
    return b"".join(out), expected


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
@pytest.mark.parametrize("role", ROLES)
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=message_streams(), chunk=st.integers(1, 50))
def test_bytewise_and_chunked_equal_whole(role: Role, deflate: bool, stream, chunk: int) -> None:
    msgs, end_with_close = stream
    data, expected = _stream(role, msgs, end_with_close, deflate=deflate)
    data += frame_from_peer(role, PONG, b"last")  # never empty: b"" would mean EOF
    expected = [*expected, Pong(b"last")] if not end_with_close else expected
    whole = conn(role, deflate=deflate).receive_data(data)
    assert whole == expected
    assert feed_bytewise(conn(role, deflate=deflate), data) == expected
    c = conn(role, deflate=deflate)
    chunked: list[Event] = []
    for i in range(0, len(data), chunk):
        chunked.extend(c.receive_data(data[i : i + chunk]))
    assert chunked == expected


# --- fuzz: any input yields events, never an exception ---------------------------------------


def _check_event_stream(events: list[Event]) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, (*EVENT_TYPES, ConnectionLost)), event
        if isinstance(event, TERMINAL):
            assert i == len(events) - 1, f"events after {event}: {events[i + 1 :]}"
        if isinstance(event, ConnectionFailed):
            assert event.code in (
                errors.CLOSE_PROTOCOL_ERROR,
                errors.CLOSE_INVALID_DATA,
                errors.CLOSE_TOO_BIG,
            )


@st.composite
def frame_soup(draw: st.DrawFn) -> bytes:
    """Frames with arbitrary header bits, lengths and payloads: mostly plausible, often not."""
    out = []
    for _ in range(draw(st.integers(1, 8))):
        b0 = draw(st.integers(0, 255))
        payload = draw(st.binary(max_size=140))
        masked = draw(st.booleans())
        frame = raw_frame(b0, payload, masked=masked)
        if draw(st.booleans()):
            frame = frame[: draw(st.integers(0, len(frame)))]
        out.append(frame)
    return b"".join(out)


@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
@pytest.mark.parametrize("role", ROLES)
@hsettings(max_examples=150, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), frame_soup()), chunk=st.integers(1, 64))
def test_fuzz_yields_only_events(role: Role, deflate: bool, data: bytes, chunk: int) -> None:
    c = conn(role, limit=256, deflate=deflate)
    events: list[Event] = []
    for i in range(0, len(data), chunk):
        events.extend(c.receive_data(data[i : i + chunk]))
    events.extend(c.receive_data(b""))
    _check_event_stream(events)
    assert c.state is State.CLOSED
    # Replies are always producible, whatever happened.
    for event in events:
        if isinstance(event, Ping):
            c.pong(event)
        elif isinstance(event, CloseReceived):
            c.close_reply()
        elif isinstance(event, ConnectionFailed):
            c.fail_frame(event)


@pytest.mark.parametrize("role", ROLES)
@hsettings(max_examples=100, deadline=None)
@given(payload=st.binary(min_size=1, max_size=200))
def test_fuzz_compressed_payloads(role: Role, payload: bytes) -> None:
    """Random bytes marked compressed: inflated, refused with 1002, or 1009; never raised."""
    c = conn(role, limit=256, deflate=True)
    events = c.receive_data(frame_from_peer(role, BINARY, payload, rsv1=True))
    _check_event_stream(events)
    assert len(events) == 1


# --- reassembly (RFC 6455 section 5.4) -------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_continuation_without_start_fails(role: Role) -> None:
    failed(conn(role).receive_data(frame_from_peer(role, CONT, b"x")), 1002)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("second", [TEXT, BINARY])
def test_new_data_frame_inside_fragmented_message_fails(role: Role, second: Opcode) -> None:
    data = frame_from_peer(role, TEXT, b"a", fin=False) + frame_from_peer(role, second, b"b")
    failed(conn(role).receive_data(data), 1002)


@pytest.mark.parametrize("role", ROLES)
def test_continuation_after_finished_message_fails(role: Role) -> None:
    data = frame_from_peer(role, TEXT, b"a") + frame_from_peer(role, CONT, b"b")
    events = conn(role).receive_data(data)
    assert events[0] == TextMessage("a")
    failed(events, 1002)


# --- UTF-8 (RFC 6455 section 8.1) ------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    "first",
    [b"\xff", b"ok\xc0\xaf", b"\xce\xba\xf4\x90\x80\x80", b"\xe0\x80\x80", b"a\xf5"],
    ids=["ff", "overlong", "above-10ffff", "overlong-3", "f5"],
)
def test_invalid_utf8_in_first_fragment_fails_at_once(role: Role, first: bytes) -> None:
    c = conn(role)
    events = c.receive_data(frame_from_peer(role, TEXT, first, fin=False))
    failed(events, errors.CLOSE_INVALID_DATA)
    # The rest of the message arrives after the failure and is ignored.
    assert c.receive_data(frame_from_peer(role, CONT, b"rest")) == []


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("text", ["é", "€", "𝄞", "κόσμε"])
def test_multibyte_char_split_across_fragments(role: Role, text: str) -> None:
    raw = text.encode("utf-8")
    parts = [raw[i : i + 1] for i in range(len(raw))]  # every split point at once
    c = conn(role)
    events = c.receive_data(fragments(role, TEXT, parts))
    assert events == [TextMessage(text)]


@pytest.mark.parametrize("role", ROLES)
def test_truncated_char_at_end_of_message_fails(role: Role) -> None:
    events = conn(role).receive_data(fragments(role, TEXT, [b"a", b"\xe2\x82"]))
    failed(events, errors.CLOSE_INVALID_DATA)


@pytest.mark.parametrize("role", ROLES)
def test_invalid_utf8_in_unfragmented_text_fails(role: Role) -> None:
    failed(conn(role).receive_data(frame_from_peer(role, TEXT, b"\xed\xa0\x80")), 1007)


@pytest.mark.parametrize("role", ROLES)
def test_invalid_utf8_binary_is_fine(role: Role) -> None:
    data = frame_from_peer(role, BINARY, b"\xff\xfe")
    assert conn(role).receive_data(data) == [BinaryMessage(b"\xff\xfe")]


# --- close frames (RFC 6455 sections 5.5.1, 7.4) ---------------------------------------------

VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("code", VALID_CODES)
def test_valid_close_code_is_echoed(role: Role, code: int) -> None:
    c = conn(role)
    assert c.receive_data(close_from_peer(role, close_payload(code, "why"))) == [
        CloseReceived(code, "why")
    ]
    assert read_back(role, c.close_reply()) == [CloseReceived(code, "")]
    assert is_valid_close_code(code)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("code", INVALID_CODES)
def test_invalid_close_code_fails_1002(role: Role, code: int) -> None:
    c = conn(role)
    failed(c.receive_data(close_from_peer(role, code.to_bytes(2, "big"))), 1002)
    assert c.close_received is None
    assert not is_valid_close_code(code)


@pytest.mark.parametrize("role", ROLES)
def test_one_byte_close_payload_fails_1002(role: Role) -> None:
    failed(conn(role).receive_data(close_from_peer(role, b"\x03")), 1002)


@pytest.mark.parametrize("role", ROLES)
def test_close_reason_invalid_utf8_fails_1007(role: Role) -> None:
    failed(conn(role).receive_data(close_from_peer(role, b"\x03\xe8\xff")), 1007)


@pytest.mark.parametrize("role", ROLES)
def test_empty_close_gets_empty_reply(role: Role) -> None:
    c = conn(role)
    assert c.receive_data(close_from_peer(role, b"")) == [CloseReceived(errors.CLOSE_NO_STATUS, "")]
    reply = c.close_reply()
    assert reply[0] == 0x88 and reply[1] & 0x7F == 0  # FIN + close, no payload at all
    assert read_back(role, reply) == [CloseReceived(errors.CLOSE_NO_STATUS, "")]


def test_close_payload_helpers() -> None:
    assert close_payload(None) == b""
    assert close_payload(1000) == b"\x03\xe8"
    long = close_payload(1000, "é" * 100)  # 200 bytes of reason, cut on a char boundary
    assert len(long) <= 125
    assert parse_close_payload(long) == (1000, "é" * 61)
    assert parse_close_payload(b"") == (errors.CLOSE_NO_STATUS, "")
    with pytest.raises(InvalidUTF8):
        parse_close_payload(b"\x03\xe8\xc3")
    with pytest.raises(ProtocolError):
        parse_close_payload(b"\x03\xed")  # 1005 must never be on the wire


@pytest.mark.parametrize("role", ROLES)
def test_our_close_frames_fit_a_control_frame(role: Role) -> None:
    c = conn(role)
    frame = c.close(1000, "x" * 500)
    (event,) = read_back(role, frame)
    assert isinstance(event, CloseReceived) and event.reason == "x" * 123


# --- replies in event order ------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_replies_only_until_our_close_frame(role: Role) -> None:
    c = conn(role)
    (ping,) = c.receive_data(frame_from_peer(role, PING, b"before"))
    assert read_back(role, c.pong(ping)) == [Pong(b"before")]
    c.close(1000)
    assert c.pong(ping) == b""
    (close,) = c.receive_data(close_from_peer(role, close_payload(1001)))
    assert close == CloseReceived(1001, "")
    assert c.close_reply() == b""
    assert c.fail_frame(ConnectionFailed(1002, "late")) == b""


@pytest.mark.parametrize("role", ROLES)
def test_message_before_bad_frame_is_delivered_and_send_works_until_fail_frame(
    role: Role,
) -> None:
    c = conn(role)
    data = (
        frame_from_peer(role, TEXT, b"first")
        + frame_from_peer(role, PING, b"p")
        + raw_frame(0x83, b"", masked=role is Role.SERVER)  # reserved opcode 0x3
        + frame_from_peer(role, TEXT, b"never")
    )
    events = c.receive_data(data)
    assert events[:2] == [TextMessage("first"), Ping(b"p")]
    failure = events[2]
    assert isinstance(failure, ConnectionFailed) and failure.code == 1002
    assert len(events) == 3
    # Replies to what came before the bad frame still go out, in order, then the close.
    assert c.can_send
    out = c.send_text("echo: first") + c.pong(events[1]) + c.fail_frame(failure)
    peer_events = read_back(role, out)
    assert peer_events[:2] == [TextMessage("echo: first"), Pong(b"p")]
    assert peer_events[2] == CloseReceived(1002, failure.reason)
    assert not c.can_send
    with pytest.raises(ConnectionClosedError) as info:
        c.send_text("after")
    assert info.value.code == 1002
    assert c.fail_frame(failure) == b""
    assert c.pong(events[1]) == b""


@pytest.mark.parametrize("role", ROLES)
def test_bad_frame_split_from_good_one_in_later_chunk(role: Role) -> None:
    c = conn(role)
    good = frame_from_peer(role, TEXT, b"ok")
    bad = raw_frame(0x81 | 0x20, b"", masked=role is Role.SERVER)  # RSV2
    events = c.receive_data(good + bad[:1])
    assert events == [TextMessage("ok")]
    failed(c.receive_data(bad[1:]), 1002)


def test_fail_frame_hides_internal_error_details() -> None:
    c = conn(Role.SERVER)
    frame = c.fail_frame(ConnectionFailed(errors.CLOSE_INTERNAL_ERROR, "secret traceback"))
    assert read_back(Role.SERVER, frame) == [CloseReceived(1011, "")]


# --- size limits (1009) ----------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "deflate"])
def test_message_at_limit_fits_one_over_fails(role: Role, deflate: bool) -> None:
    c = conn(role, limit=1000, deflate=deflate)
    assert c.receive_data(frame_from_peer(role, BINARY, b"x" * 1000)) == [
        BinaryMessage(b"x" * 1000)
    ]
    failed(c.receive_data(frame_from_peer(role, BINARY, b"x" * 1001)), errors.CLOSE_TOO_BIG)


@pytest.mark.parametrize("role", ROLES)
def test_one_huge_frame_fails_before_its_payload(role: Role) -> None:
    c = conn(role, limit=1000)
    head = frame_from_peer(role, BINARY, b"x" * 70000)[:14]
    failed(c.receive_data(head), errors.CLOSE_TOO_BIG)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_fragments_adding_up_past_limit_fail(role: Role, opcode: Opcode) -> None:
    c = conn(role, limit=1000)
    events = c.receive_data(frame_from_peer(role, opcode, b"a" * 600, fin=False))
    assert events == []
    failed(c.receive_data(frame_from_peer(role, CONT, b"a" * 401)), errors.CLOSE_TOO_BIG)
    c2 = conn(role, limit=1000)
    data = fragments(role, opcode, [b"a" * 600, b"a" * 400])
    assert len(c2.receive_data(data)) == 1


# --- permessage-deflate (RFC 7692) -----------------------------------------------------------

DOC = (b'{"op":"message","topic":"prices.eur","data":{"bid":1.0842,"ask":1.0843}}' * 40).decode()


@pytest.mark.parametrize("role", ROLES)
def test_compressed_messages_round_trip(role: Role) -> None:
    sender = conn(role, deflate=True)
    receiver = conn(other(role), deflate=True)
    data = sender.send_text(DOC) + sender.send_binary(DOC.encode()) + sender.send_text(DOC)
    assert data[0] & 0x40, "RSV1: the message was compressed"
    assert len(data) < len(DOC)
    assert receiver.receive_data(data) == [
        TextMessage(DOC),
        BinaryMessage(DOC.encode()),
        TextMessage(DOC),
    ]


@pytest.mark.parametrize("role", ROLES)
def test_small_messages_are_sent_uncompressed(role: Role) -> None:
    sender = conn(role, deflate=True, min_bytes=128)
    frame = sender.send_text("short")
    assert not frame[0] & 0x40
    assert conn(other(role), deflate=True).receive_data(frame) == [TextMessage("short")]


@pytest.mark.parametrize("role", ROLES)
def test_fragmented_compressed_message(role: Role) -> None:
    packed = deflate_for(other(role)).compress(DOC.encode())
    assert packed is not None
    thirds = [packed[: len(packed) // 3], packed[len(packed) // 3 : -3], packed[-3:]]
    # RSV1 on the first frame only (RFC 7692 section 6.1), a ping between two fragments.
    first = frame_from_peer(role, TEXT, thirds[0], fin=False, rsv1=True)
    rest = frame_from_peer(role, CONT, thirds[1], fin=False) + frame_from_peer(
        role, CONT, thirds[2]
    )
    c = conn(role, deflate=True)
    assert c.receive_data(first + frame_from_peer(role, PING, b"x")) == [Ping(b"x")]
    assert c.receive_data(rest) == [TextMessage(DOC)]


@pytest.mark.parametrize("role", ROLES)
def test_small_compressed_message_inflating_past_limit_fails_1009(role: Role) -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = (bomb.compress(b"\x00" * 100_000) + bomb.flush(zlib.Z_SYNC_FLUSH))[:-4]
    assert len(packed) < 1000
    c = conn(role, limit=1000, deflate=True)
    failed(c.receive_data(frame_from_peer(role, BINARY, packed, rsv1=True)), errors.CLOSE_TOO_BIG)


@pytest.mark.parametrize("role", ROLES)
def test_compressed_fragments_adding_up_past_limit_fail(role: Role) -> None:
    c = conn(role, limit=1000, deflate=True)
    junk = bytes(range(256)) * 4  # incompressible-looking, far past the compressed bound
    events = c.receive_data(frame_from_peer(role, BINARY, junk[:600], fin=False, rsv1=True))
    assert events == []
    failed(c.receive_data(frame_from_peer(role, CONT, junk[:600])), errors.CLOSE_TOO_BIG)


@pytest.mark.parametrize("role", ROLES)
def test_rsv1_on_continuation_fails_1002(role: Role) -> None:
    c = conn(role, deflate=True)
    data = frame_from_peer(role, TEXT, b"a", fin=False) + frame_from_peer(
        role, CONT, b"b", rsv1=True
    )
    failed(c.receive_data(data), 1002)


@pytest.mark.parametrize("role", ROLES)
def test_rsv1_without_deflate_fails_1002(role: Role) -> None:
    failed(conn(role).receive_data(frame_from_peer(role, TEXT, b"a", rsv1=True)), 1002)


@pytest.mark.parametrize("role", ROLES)
def test_corrupt_compressed_data_fails_1002(role: Role) -> None:
    data = frame_from_peer(role, BINARY, b"\xff\xff\xff\xff", rsv1=True)
    failed(conn(role, deflate=True).receive_data(data), 1002)


@pytest.mark.parametrize("role", ROLES)
def test_compressed_text_with_invalid_utf8_fails_1007(role: Role) -> None:
    packed = deflate_for(other(role)).compress(b"\xff" * 200)
    assert packed is not None
    data = frame_from_peer(role, TEXT, packed, rsv1=True)
    failed(conn(role, deflate=True).receive_data(data), errors.CLOSE_INVALID_DATA)


def test_encode_broadcast_parses_in_client_connections() -> None:
    payloads = [DOC.encode(), b"tiny", DOC.encode()[::-1], b""]
    frames = [
        encode_broadcast(TEXT, p, compress_window_bits=15, level=6, min_bytes=16) for p in payloads
    ]
    assert frames[0][0] & 0x40 and not frames[1][0] & 0x40
    expected = [TextMessage(p.decode()) for p in payloads]
    # One client reads all of them; another reads them in another order: each frame
    # is independent of earlier ones (server_no_context_takeover), so both decode.
    a = conn(Role.CLIENT, deflate=True)
    assert a.receive_data(b"".join(frames)) == expected
    b = conn(Role.CLIENT, deflate=True)
    assert b.receive_data(b"".join(reversed(frames))) == list(reversed(expected))
    # Even a client that expected context takeover decodes them.
    takeover = Connection(
        Role.CLIENT, max_message_bytes=LIMIT, deflate=deflate_for(Role.CLIENT, DeflateParams())
    )
    assert takeover.receive_data(b"".join(frames)) == expected


def test_encode_broadcast_uncompressed() -> None:
    frame = encode_broadcast(BINARY, b"\x00" * 300)
    assert conn(Role.CLIENT).receive_data(frame) == [BinaryMessage(b"\x00" * 300)]


def test_encode_broadcast_with_smaller_window() -> None:
    params = DeflateParams(server_no_context_takeover=True, server_max_window_bits=10)
    c = Connection(Role.CLIENT, max_message_bytes=LIMIT, deflate=deflate_for(Role.CLIENT, params))
    frame = encode_broadcast(TEXT, DOC.encode(), compress_window_bits=10)
    assert c.receive_data(frame) == [TextMessage(DOC)]


# --- the rest of the lifecycle ---------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_close_then_peer_close_then_eof(role: Role) -> None:
    c = conn(role)
    c.close(1000, "bye")
    assert c.state is State.LOCAL_CLOSING
    assert c.receive_data(close_from_peer(role, close_payload(1000))) == [CloseReceived(1000, "")]
    assert c.state is State.CLOSED
    assert c.receive_data(b"") == []  # TCP closing afterwards is not a loss


@pytest.mark.parametrize("role", ROLES)
def test_eof_mid_message(role: Role) -> None:
    c = conn(role)
    assert c.receive_data(frame_from_peer(role, TEXT, b"a", fin=False)) == []
    assert c.receive_data(b"") == [ConnectionLost(errors.CLOSE_ABNORMAL)]


@pytest.mark.parametrize("role", ROLES)
def test_memoryview_and_bytearray_input(role: Role) -> None:
    data = frame_from_peer(role, TEXT, b"abc")
    assert conn(role).receive_data(memoryview(data)) == [TextMessage("abc")]
    assert conn(role).receive_data(bytearray(data)) == [TextMessage("abc")]
