"""broker.frames: FrameParser and serialize_frame against RFC 6455 section 5, table by table.

Wire bytes in the tables are written out by hand (not produced by `serialize_frame`), so the
parser and the serializer are each checked against the RFC rather than against each other;
the Hypothesis properties at the end then check them against each other and fuzz the parser.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    PayloadTooBig,
    ProtocolError,
)
from broker.frames import (
    MAX_CONTROL_PAYLOAD,
    Frame,
    FrameParser,
    Opcode,
    frame_header_size,
    serialize_frame,
)
from broker.masking import apply_mask_plain
from broker.settings import Settings

MAX_PAYLOAD = Settings().max_message_bytes
KEY = bytes.fromhex("37fa213d")  # the masking key of the RFC 6455 section 5.7 examples

CONT, TEXT, BINARY = Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY
CLOSE, PING, PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG
DATA_OPCODES = [CONT, TEXT, BINARY]
CONTROL_OPCODES = [CLOSE, PING, PONG]


def server_parser(*, max_payload_bytes: int = MAX_PAYLOAD, allow_rsv1: bool = False) -> FrameParser:
    """Parses what clients send: every frame must be masked (RFC 6455 section 5.1)."""
    return FrameParser(
        mask_required=True, max_payload_bytes=max_payload_bytes, allow_rsv1=allow_rsv1
    )


def client_parser(*, max_payload_bytes: int = MAX_PAYLOAD, allow_rsv1: bool = False) -> FrameParser:
    """Parses what servers send: no frame may be masked (RFC 6455 section 5.1)."""
    return FrameParser(
        mask_required=False, max_payload_bytes=max_payload_bytes, allow_rsv1=allow_rsv1
    )


def parser_for(
    role: str, *, max_payload_bytes: int = MAX_PAYLOAD, allow_rsv1: bool = False
) -> FrameParser:
    make = server_parser if role == "server" else client_parser
    return make(max_payload_bytes=max_payload_bytes, allow_rsv1=allow_rsv1)


def wire(b0: int, payload: bytes, key: bytes | None = None) -> bytes:
    """One frame's bytes, built by hand from RFC 6455 section 5.2."""
    n = len(payload)
    mask_bit = 0x80 if key is not None else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 65536:
        head = bytes((b0, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mask_bit | 127)) + struct.pack("!Q", n)
    if key is None:
        return head + payload
    return head + key + apply_mask_plain(payload, key)


def feed_bytewise(parser: FrameParser, data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    for i in range(len(data)):
        frames += parser.feed(data[i : i + 1])
    return frames


def chunks(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        yield data[pos : pos + size]
        pos += size
        i += 1


def payload_of(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


# --- the three payload length forms (RFC 6455 section 5.2) ------------------------------

LENGTH_FORMS = [
    pytest.param(0, "8200", id="0-7bit"),
    pytest.param(125, "827d", id="125-7bit"),
    pytest.param(126, "827e007e", id="126-16bit"),
    pytest.param(65535, "827effff", id="65535-16bit"),
    pytest.param(65536, "827f0000000000010000", id="65536-64bit"),
]


@pytest.mark.parametrize(("size", "header_hex"), LENGTH_FORMS)
def test_serialize_unmasked_length_forms(size: int, header_hex: str) -> None:
    payload = payload_of(size)
    out = serialize_frame(BINARY, payload)
    assert type(out) is bytes
    assert out == bytes.fromhex(header_hex) + payload
    assert frame_header_size(size) == len(header_hex) // 2


@pytest.mark.parametrize(("size", "header_hex"), LENGTH_FORMS)
def test_serialize_masked_length_forms(size: int, header_hex: str) -> None:
    payload = payload_of(size)
    header = bytearray.fromhex(header_hex)
    header[1] |= 0x80  # MASK bit
    out = serialize_frame(BINARY, payload, mask=True)
    assert out[: len(header)] == header
    key = out[len(header) : len(header) + 4]
    assert len(out) == len(header) + 4 + size == frame_header_size(size, masked=True) + size
    assert apply_mask_plain(out[len(header) + 4 :], key) == payload


@pytest.mark.parametrize(("size", "header_hex"), LENGTH_FORMS)
def test_parse_unmasked_length_forms_client_role(size: int, header_hex: str) -> None:
    payload = payload_of(size)
    parser = client_parser()
    assert parser.feed(bytes.fromhex(header_hex) + payload) == [Frame(BINARY, payload)]
    assert parser.buffered_bytes == 0


@pytest.mark.parametrize(("size", "header_hex"), LENGTH_FORMS)
def test_parse_masked_length_forms_server_role(size: int, header_hex: str) -> None:
    payload = payload_of(size)
    header = bytearray.fromhex(header_hex)
    header[1] |= 0x80
    data = bytes(header) + KEY + apply_mask_plain(payload, KEY)
    assert data == wire(0x82, payload, KEY)
    parser = server_parser()
    frames = parser.feed(data)
    assert frames == [Frame(BINARY, payload)]
    assert type(frames[0].payload) is bytes
    assert parser.buffered_bytes == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("size", [0, 5, 125, 126, 65536])
def test_serialize_accepts_any_buffer(kind: type, size: int) -> None:
    payload = payload_of(size)
    for mask in (False, True):
        out = serialize_frame(TEXT, kind(payload), mask=mask)
        assert type(out) is bytes
        parser = server_parser() if mask else client_parser()
        assert parser.feed(out) == [Frame(TEXT, payload)]


# --- RFC 6455 section 5.7 examples ------------------------------------------------------

RFC_EXAMPLES = [
    pytest.param(
        "client",
        "810548656c6c6f",
        [Frame(TEXT, b"Hello")],
        id="unmasked-text-Hello",
    ),
    pytest.param(
        "server",
        "818537fa213d7f9f4d5158",
        [Frame(TEXT, b"Hello")],
        id="masked-text-Hello",
    ),
    pytest.param(
        "client",
        "010348656c" + "80026c6f",
        [Frame(TEXT, b"Hel", fin=False), Frame(CONT, b"lo")],
        id="fragmented-Hel-lo",
    ),
    pytest.param(
        "client",
        "890548656c6c6f",
        [Frame(PING, b"Hello")],
        id="unmasked-ping-Hello",
    ),
    pytest.param(
        "server",
        "8a8537fa213d7f9f4d5158",
        [Frame(PONG, b"Hello")],
        id="masked-pong-Hello",
    ),
    pytest.param(
        "client",
        "827e0100" + payload_of(256).hex(),
        [Frame(BINARY, payload_of(256))],
        id="256-bytes-binary",
    ),
    pytest.param(
        "client",
        "827f0000000000010000" + payload_of(65536).hex(),
        [Frame(BINARY, payload_of(65536))],
        id="64KiB-binary",
    ),
]


@pytest.mark.parametrize(("role", "wire_hex", "frames"), RFC_EXAMPLES)
def test_rfc_examples_parse(role: str, wire_hex: str, frames: list[Frame]) -> None:
    data = bytes.fromhex(wire_hex)
    assert parser_for(role).feed(data) == frames
    assert feed_bytewise(parser_for(role), data) == frames


@pytest.mark.parametrize(("role", "wire_hex", "frames"), RFC_EXAMPLES)
def test_rfc_examples_serialize(role: str, wire_hex: str, frames: list[Frame]) -> None:
    expected = bytes.fromhex(wire_hex)
    if role == "client":  # unmasked examples: byte-exact
        out = b"".join(serialize_frame(f.opcode, f.payload, fin=f.fin) for f in frames)
        assert out == expected
    else:  # masked examples: same header, and unmasking with the key sent gives the payload
        (frame,) = frames
        out = serialize_frame(frame.opcode, frame.payload, fin=frame.fin, mask=True)
        assert out[:2] == expected[:2]
        assert apply_mask_plain(out[6:], out[2:6]) == frame.payload


def test_masked_serialize_uses_a_fresh_key_per_frame() -> None:
    # RFC 6455 section 5.3: the masking key must be unpredictable, so never reused.
    keys = {serialize_frame(BINARY, b"x", mask=True)[2:6] for _ in range(8)}
    assert len(keys) > 1


# --- header errors: each raised as soon as the bytes that show it arrive ------------------

PROTOCOL_ERRORS = [
    *[
        pytest.param("client", {}, f"8{op:x}00", id=f"reserved-opcode-{op:#x}-client")
        for op in [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]
    ],
    *[
        pytest.param("server", {}, f"8{op:x}80", id=f"reserved-opcode-{op:#x}-server")
        for op in [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]
    ],
    pytest.param("client", {}, "a200", id="rsv2"),
    pytest.param("client", {}, "9200", id="rsv3"),
    pytest.param("client", {"allow_rsv1": True}, "a200", id="rsv2-even-with-allow_rsv1"),
    pytest.param("server", {"allow_rsv1": True}, "9280", id="rsv3-even-with-allow_rsv1"),
    pytest.param("client", {}, "c200", id="rsv1-without-allow_rsv1"),
    pytest.param("server", {}, "c180", id="rsv1-without-allow_rsv1-server"),
    pytest.param("client", {"allow_rsv1": True}, "c900", id="rsv1-on-ping"),
    pytest.param("client", {"allow_rsv1": True}, "c800", id="rsv1-on-close"),
    pytest.param("server", {"allow_rsv1": True}, "ca80", id="rsv1-on-pong"),
    pytest.param("server", {}, "8200", id="unmasked-frame-to-server"),
    pytest.param("server", {}, "817e", id="unmasked-frame-to-server-16bit"),
    pytest.param("client", {}, "8280", id="masked-frame-to-client"),
    pytest.param("client", {}, "81ff", id="masked-frame-to-client-64bit"),
    pytest.param("client", {}, "0900", id="fragmented-ping"),
    pytest.param("client", {}, "0800", id="fragmented-close"),
    pytest.param("server", {}, "0a80", id="fragmented-pong"),
    pytest.param("client", {}, "897e", id="ping-16bit-length"),
    pytest.param("client", {}, "887f", id="close-64bit-length"),
    pytest.param("server", {}, "8afe", id="pong-16bit-length-server"),
    pytest.param("client", {}, "827f8000000000000000", id="64bit-length-msb-set"),
    pytest.param("server", {}, "82ffffffffffffffffff", id="64bit-length-all-ones"),
    pytest.param("client", {}, "827e0000", id="16bit-length-of-0"),
    pytest.param("client", {}, "827e007d", id="16bit-length-of-125"),
    pytest.param("server", {}, "82fe007d", id="16bit-length-of-125-server"),
    pytest.param("client", {}, "827f0000000000000000", id="64bit-length-of-0"),
    pytest.param("client", {}, "827f000000000000007d", id="64bit-length-of-125"),
    pytest.param("client", {}, "827f000000000000007e", id="64bit-length-of-126"),
    pytest.param("server", {}, "82ff000000000000ffff", id="64bit-length-of-65535"),
]


@pytest.mark.parametrize(("role", "kwargs", "prefix_hex"), PROTOCOL_ERRORS)
def test_protocol_error_as_soon_as_header_arrives(
    role: str, kwargs: dict[str, bool], prefix_hex: str
) -> None:
    prefix = bytes.fromhex(prefix_hex)
    parser = parser_for(role, **kwargs)
    for i in range(len(prefix) - 1):  # one byte short: nothing to complain about yet
        assert parser.feed(prefix[i : i + 1]) == []
    with pytest.raises(ProtocolError) as exc_info:
        parser.feed(prefix[-1:])
    assert type(exc_info.value) is ProtocolError
    assert exc_info.value.close_code == CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize(("role", "kwargs", "prefix_hex"), PROTOCOL_ERRORS)
def test_protocol_error_when_fed_whole(role: str, kwargs: dict[str, bool], prefix_hex: str) -> None:
    # The bad header after a good frame, with payload bytes behind it: the good frame is
    # returned first (it arrived first), the error is kept and raised by the next feed.
    good = wire(0x81, b"ok", KEY if role == "server" else None)
    parser = parser_for(role, **kwargs)
    assert parser.feed(good + bytes.fromhex(prefix_hex) + bytes(200)) == [Frame(TEXT, b"ok")]
    assert parser.error is not None
    assert parser.error.close_code == CLOSE_PROTOCOL_ERROR
    with pytest.raises(ProtocolError) as exc_info:
        parser.feed(b"")
    assert exc_info.value is parser.error


@pytest.mark.parametrize("role", ["client", "server"])
def test_rsv1_allowed_on_data_frames_with_allow_rsv1(role: str) -> None:
    key = KEY if role == "server" else None
    data = wire(0x41, b"Hel", key) + wire(0xC0, b"lo", key) + wire(0xC2, b"\x00", key)
    expected = [
        Frame(TEXT, b"Hel", fin=False, rsv1=True),
        Frame(CONT, b"lo", fin=True, rsv1=True),
        Frame(BINARY, b"\x00", fin=True, rsv1=True),
    ]
    assert parser_for(role, allow_rsv1=True).feed(data) == expected


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("opcode", CONTROL_OPCODES)
def test_control_frame_of_125_bytes_is_accepted(role: str, opcode: Opcode) -> None:
    payload = payload_of(MAX_CONTROL_PAYLOAD)
    data = wire(0x80 | opcode, payload, KEY if role == "server" else None)
    assert parser_for(role).feed(data) == [Frame(opcode, payload)]


# --- the size limit: PayloadTooBig (1009) from the header alone -------------------------

TOO_BIG = [
    pytest.param(100, 101, id="7bit"),
    pytest.param(1000, 1001, id="16bit"),
    pytest.param(125, 126, id="16bit-just-over"),
    pytest.param(65535, 65536, id="64bit-just-over"),
    pytest.param(MAX_PAYLOAD, MAX_PAYLOAD + 1, id="64bit-settings-limit"),
    pytest.param(0, 1, id="limit-0"),
    pytest.param(MAX_PAYLOAD, 2**63 - 1, id="64bit-largest"),
]


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize(("limit", "size"), TOO_BIG)
def test_payload_too_big_before_payload_arrives(role: str, limit: int, size: int) -> None:
    mask_bit = 0x80 if role == "server" else 0
    if size < 126:
        header = bytes((0x82, mask_bit | size))
    elif size < 65536:
        header = bytes((0x82, mask_bit | 126)) + struct.pack("!H", size)
    else:
        header = bytes((0x82, mask_bit | 127)) + struct.pack("!Q", size)
    parser = parser_for(role, max_payload_bytes=limit)
    for i in range(len(header) - 1):
        assert parser.feed(header[i : i + 1]) == []
    with pytest.raises(PayloadTooBig) as exc_info:
        parser.feed(header[-1:])  # no masking key, no payload yet
    assert exc_info.value.close_code == CLOSE_TOO_BIG


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_payload_at_the_limit_is_accepted(role: str, size: int) -> None:
    payload = payload_of(size)
    data = wire(0x82, payload, KEY if role == "server" else None)
    assert parser_for(role, max_payload_bytes=size).feed(data) == [Frame(BINARY, payload)]


# --- incremental feeding ----------------------------------------------------------------

STREAM_FRAMES = [
    Frame(TEXT, b"Hel", fin=False),
    Frame(PING, b"ping in the middle"),
    Frame(CONT, b"lo", fin=True),
    Frame(BINARY, b""),
    Frame(CLOSE, b""),
    Frame(BINARY, payload_of(125)),
    Frame(BINARY, payload_of(126)),
    Frame(PONG, payload_of(125)),
    Frame(TEXT, payload_of(300), fin=False),
    Frame(CONT, payload_of(65536)),
    Frame(BINARY, b"x"),
]


def stream_for(role: str) -> bytes:
    key = KEY if role == "server" else None
    return b"".join(wire((0x80 if f.fin else 0) | f.opcode, f.payload, key) for f in STREAM_FRAMES)


@pytest.mark.parametrize("role", ["client", "server"])
def test_byte_at_a_time_gives_the_same_frames_as_whole(role: str) -> None:
    data = stream_for(role)
    whole = parser_for(role).feed(data)
    assert whole == STREAM_FRAMES
    parser = parser_for(role)
    assert feed_bytewise(parser, data) == whole
    assert parser.buffered_bytes == 0


@pytest.mark.parametrize("role", ["client", "server"])
@pytest.mark.parametrize("sizes", [[2], [3, 5, 7], [1000], [4096, 1]])
def test_chunked_feeding_gives_the_same_frames(role: str, sizes: list[int]) -> None:
    parser = parser_for(role)
    frames: list[Frame] = []
    for chunk in chunks(stream_for(role), sizes):
        frames += parser.feed(chunk)
    assert frames == STREAM_FRAMES
    assert parser.buffered_bytes == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("role", ["client", "server"])
def test_feed_accepts_any_buffer(role: str, kind: type) -> None:
    data = stream_for(role)
    parser = parser_for(role)
    split = 1000  # the second feed lands on a non-empty buffer
    frames = parser.feed(kind(data[:split])) + parser.feed(kind(data[split:]))
    assert frames == STREAM_FRAMES
    assert all(type(f.payload) is bytes for f in frames)


def test_payloads_do_not_alias_the_input() -> None:
    data = bytearray(wire(0x82, b"abc") + wire(0x82, b"de"))
    parser = client_parser()
    frames = parser.feed(data[:7])
    frames += parser.feed(memoryview(data)[7:])
    data[:] = bytes(len(data))
    assert frames == [Frame(BINARY, b"abc"), Frame(BINARY, b"de")]


@pytest.mark.parametrize("role", ["client", "server"])
def test_buffered_bytes_counts_a_leftover_partial_frame(role: str) -> None:
    key = KEY if role == "server" else None
    first = wire(0x81, b"first", key)
    second = wire(0x82, payload_of(300), key)
    parser = parser_for(role)
    assert parser.buffered_bytes == 0
    assert parser.feed(first + second[:1]) == [Frame(TEXT, b"first")]
    assert parser.buffered_bytes == 1  # half a header
    assert parser.feed(second[1:50]) == []
    assert parser.buffered_bytes == 50  # header, maybe key, part of the payload
    assert parser.feed(second[50:-1]) == []
    assert parser.buffered_bytes == len(second) - 1
    assert parser.feed(second[-1:] + first[:3]) == [Frame(BINARY, payload_of(300))]
    assert parser.buffered_bytes == 3
    assert parser.feed(first[3:]) == [Frame(TEXT, b"first")]
    assert parser.buffered_bytes == 0


def test_empty_feed_returns_nothing() -> None:
    parser = client_parser()
    assert parser.feed(b"") == []
    assert parser.feed(b"\x81") == []
    assert parser.feed(b"") == []
    assert parser.buffered_bytes == 1


# --- serialize_frame's own refusals -----------------------------------------------------


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("opcode", CONTROL_OPCODES)
def test_serialize_refuses_control_frames_over_125_bytes(opcode: Opcode, mask: bool) -> None:
    with pytest.raises(ValueError, match="125"):
        serialize_frame(opcode, bytes(MAX_CONTROL_PAYLOAD + 1), mask=mask)
    with pytest.raises(ValueError, match="125"):
        serialize_frame(opcode, bytes(70000), mask=mask)
    assert len(serialize_frame(opcode, bytes(MAX_CONTROL_PAYLOAD), mask=mask)) > 125


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("opcode", CONTROL_OPCODES)
def test_serialize_refuses_non_final_control_frames(opcode: Opcode, mask: bool) -> None:
    with pytest.raises(ValueError, match="final"):
        serialize_frame(opcode, b"", fin=False, mask=mask)


@pytest.mark.parametrize(
    ("kwargs", "b0"),
    [
        ({}, 0x82),
        ({"fin": False}, 0x02),
        ({"rsv1": True}, 0xC2),
        ({"fin": False, "rsv1": True}, 0x42),
    ],
)
def test_serialize_first_byte(kwargs: dict[str, bool], b0: int) -> None:
    assert serialize_frame(BINARY, b"ab", **kwargs) == bytes((b0, 2)) + b"ab"


# --- properties -------------------------------------------------------------------------

control_frames = st.builds(
    Frame,
    opcode=st.sampled_from(CONTROL_OPCODES),
    payload=st.binary(max_size=MAX_CONTROL_PAYLOAD),
    fin=st.just(True),  # RFC 6455 section 5.5: control frames are never fragmented
    rsv1=st.just(False),
    rsv2=st.just(False),
    rsv3=st.just(False),
)
data_frames = st.builds(
    Frame,
    opcode=st.sampled_from(DATA_OPCODES),
    payload=st.one_of(st.binary(max_size=130), st.binary(min_size=126, max_size=4096)),
    fin=st.booleans(),
    rsv1=st.booleans(),
    rsv2=st.just(False),
    rsv3=st.just(False),
)
frame_lists = st.lists(st.one_of(data_frames, control_frames), max_size=10)
chunk_sizes = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20)


@settings(max_examples=500, deadline=None)
@given(frames=frame_lists, role=st.sampled_from(["client", "server"]), sizes=chunk_sizes)
def test_property_serialized_frames_parse_back_in_any_chunking(
    frames: list[Frame], role: str, sizes: list[int]
) -> None:
    masked = role == "server"  # the server parses what clients send: masked frames
    data = b"".join(
        serialize_frame(f.opcode, f.payload, fin=f.fin, rsv1=f.rsv1, mask=masked) for f in frames
    )
    parser = parser_for(role, allow_rsv1=True)
    parsed: list[Frame] = []
    for chunk in chunks(data, sizes):
        parsed += parser.feed(chunk)
    assert parsed == frames
    assert parser.buffered_bytes == 0


def _corrupt(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for index, value in edits:
        if out:
            out[index % len(out)] = value
    return bytes(out)


fuzz_inputs = st.one_of(
    st.binary(max_size=3000),
    st.builds(
        lambda frames, edits, masked: _corrupt(
            b"".join(
                serialize_frame(f.opcode, f.payload, fin=f.fin, rsv1=f.rsv1, mask=masked)
                for f in frames
            ),
            edits,
        ),
        frame_lists,
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
        st.booleans(),
    ),
)


@settings(max_examples=500, deadline=None)
@given(
    data=fuzz_inputs,
    sizes=chunk_sizes,
    role=st.sampled_from(["client", "server"]),
    allow_rsv1=st.booleans(),
    max_payload_bytes=st.integers(min_value=0, max_value=MAX_PAYLOAD),
)
def test_property_random_bytes_raise_only_protocol_errors(
    data: bytes, sizes: list[int], role: str, allow_rsv1: bool, max_payload_bytes: int
) -> None:
    parser = parser_for(role, allow_rsv1=allow_rsv1, max_payload_bytes=max_payload_bytes)
    fed = 0
    try:
        for chunk in chunks(data, sizes):
            fed += len(chunk)
            for frame in parser.feed(chunk):
                assert isinstance(frame, Frame)
                assert type(frame.payload) is bytes
                assert len(frame.payload) <= max_payload_bytes
            assert 0 <= parser.buffered_bytes <= fed
    except ProtocolError as exc:  # PayloadTooBig and InvalidUTF8 are ProtocolErrors too
        assert exc.close_code in (CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG)
