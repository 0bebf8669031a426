"""broker/envelope.py: round trips, and every malformed envelope is an EnvelopeError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.envelope import (
    ENCODING_JSON,
    ENCODING_MSGPACK,
    VERSION,
    BusMessage,
    msgpack_dumps,
    msgpack_loads,
    pack,
    unpack,
)
from broker.errors import BusError, EnvelopeError

messages = st.builds(
    BusMessage,
    topic=st.text(max_size=50),
    payload=st.binary(max_size=300),
    encoding=st.sampled_from([ENCODING_JSON, ENCODING_MSGPACK]),
    origin=st.text(max_size=20),
    offset=st.none() | st.integers(min_value=-(2**63), max_value=2**64 - 1),
    epoch=st.none() | st.text(max_size=20),
)


@given(messages)
def test_round_trip(message: BusMessage) -> None:
    data = pack(message)
    assert isinstance(data, bytes)
    back = unpack(data)
    assert back == message
    assert type(back.payload) is bytes


def test_wire_format_is_a_versioned_array() -> None:
    message = BusMessage("room/1", b'{"a":1}', ENCODING_JSON, "worker-1", 7, "e1")
    assert msgpack.unpackb(pack(message)) == [VERSION, "room/1", b'{"a":1}', 0, "worker-1", 7, "e1"]


def test_defaults_round_trip() -> None:
    message = BusMessage("t", b"", ENCODING_MSGPACK)
    assert unpack(pack(message)) == BusMessage("t", b"", ENCODING_MSGPACK, "", None, None)


def _env(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


GOOD = (VERSION, "t", b"p", ENCODING_JSON, "o", None, None)


def _with(index: int, value: object) -> bytes:
    fields = list(GOOD)
    fields[index] = value
    return _env(*fields)


MALFORMED = {
    "empty": b"",
    "reserved byte": b"\xc1",
    "truncated": pack(BusMessage("topic", b"payload", 0))[:-3],
    "trailing bytes": pack(BusMessage("topic", b"payload", 0)) + b"\x00",
    "not an array": msgpack.packb({"topic": "t"}),
    "an integer": msgpack.packb(1),
    "empty array": _env(),
    "version 2": _with(0, 2),
    "version 0": _with(0, 0),
    "version true": _with(0, True),
    "version as text": _with(0, "1"),
    "too few fields": _env(*GOOD[:6]),
    "too many fields": _env(*GOOD, None),
    "topic as bytes": _with(1, b"t"),
    "payload as text": _with(2, "p"),
    "payload missing": _with(2, None),
    "unknown encoding": _with(3, 2),
    "encoding true": _with(3, True),
    "origin none": _with(4, None),
    "offset as text": _with(5, "1"),
    "offset as float": _with(5, 1.0),
    "epoch as int": _with(6, 5),
    "topic not UTF-8": b"\x97\x01\xa2\xff\xfe\xc4\x00\x00\xa0\xc0\xc0",
    "extension type": b"\x97\x01\xd4\x05\x00\xc4\x00\x00\xa0\xc0\xc0",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_raises_envelope_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        unpack(data)


def test_envelope_error_is_a_bus_error() -> None:
    assert issubclass(EnvelopeError, BusError)


@given(st.binary(max_size=64))
def test_any_bytes_give_a_message_or_envelope_error(data: bytes) -> None:
    try:
        message = unpack(data)
    except EnvelopeError:
        return
    assert isinstance(message, BusMessage)


@pytest.mark.parametrize(
    "message",
    [
        BusMessage("t", "text payload", 0),  # type: ignore[arg-type]
        BusMessage("t", b"", 2),
        BusMessage(b"t", b"", 0),  # type: ignore[arg-type]
        BusMessage("t", b"", 0, offset="1"),  # type: ignore[arg-type]
    ],
)
def test_pack_refuses_wrong_types(message: BusMessage) -> None:
    with pytest.raises(ValueError):
        pack(message)


# --- msgpack_dumps / msgpack_loads -------------------------------------------------------------


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
        max_leaves=20,
    )
)
def test_msgpack_round_trip(obj: object) -> None:
    assert msgpack_loads(msgpack_dumps(obj)) == obj


def test_msgpack_dumps_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError):
        msgpack_dumps({"a": object()})


@pytest.mark.parametrize(
    ("data", "limits"),
    [
        (msgpack.packb(b"x" * 100), {"max_bin_len": 99}),
        (msgpack.packb("x" * 100), {"max_str_len": 99}),
        (msgpack.packb(list(range(100))), {"max_array_len": 99}),
        (msgpack.packb({str(i): i for i in range(100)}), {"max_map_len": 99}),
    ],
)
def test_msgpack_loads_limits(data: bytes, limits: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        msgpack_loads(data, **limits)
    assert msgpack_loads(data, **{k: v + 1 for k, v in limits.items()})


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", msgpack.packb(1) + b"\x01", b"\xd4\x05\x00", b"\xd6\xff\0\0\0\0"],
    ids=["empty", "reserved", "truncated", "trailing", "extension", "timestamp extension"],
)
def test_msgpack_loads_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        msgpack_loads(data)


def test_msgpack_loads_refuses_non_string_map_keys() -> None:
    with pytest.raises(ValueError):
        msgpack_loads(msgpack.packb({1: 2}))
