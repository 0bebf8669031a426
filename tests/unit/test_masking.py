"""broker.masking: the C `apply_mask` and the plain one agree, and both match RFC 6455 5.3."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.masking import Buffer, apply_mask, apply_mask_c, apply_mask_plain

MaskFn = Callable[[Buffer, bytes], bytes]

IMPLS: list[MaskFn] = [apply_mask_plain]
if apply_mask_c is not None:
    IMPLS.append(apply_mask_c)
IMPL_IDS = [fn.__module__ + "." + fn.__name__ for fn in IMPLS]

# Small sizes hit every tail length of the C loop (8-byte words, then 0-7 single bytes);
# the large ones cross many words and odd tails.
SIZES = [*range(71), 1000, 4093, 65536 + 5, (1 << 20) + 3]

# RFC 6455 section 5.7: "Hello" masked with 37 fa 21 3d.
RFC_KEY = bytes.fromhex("37fa213d")
RFC_HELLO_MASKED = bytes.fromhex("7f9f4d5158")


def reference_mask(data: bytes, mask: bytes) -> bytes:
    """RFC 6455 section 5.3, literally: octet i XOR mask octet (i MOD 4)."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def as_kind(data: bytes, kind: str) -> Buffer:
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    # A memoryview that starts one byte into its buffer: the C loop reads unaligned words.
    return memoryview(b"\xff" + data)[1:]


KINDS = ["bytes", "bytearray", "memoryview", "memoryview-offset"]


def test_c_speedup_is_built_and_used() -> None:
    assert apply_mask_c is not None, "broker._speedups was not compiled"
    assert apply_mask is apply_mask_c


@pytest.mark.parametrize("fn", IMPLS, ids=IMPL_IDS)
def test_rfc_example(fn: MaskFn) -> None:
    assert fn(b"Hello", RFC_KEY) == RFC_HELLO_MASKED
    assert fn(RFC_HELLO_MASKED, RFC_KEY) == b"Hello"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
def test_c_and_plain_agree_on_every_size(size: int, kind: str) -> None:
    assert apply_mask_c is not None
    rng = random.Random(size)
    data = rng.randbytes(size)
    mask = rng.randbytes(4)
    expected = apply_mask_plain(data, mask)
    assert len(expected) == size
    got_c = apply_mask_c(as_kind(data, kind), mask)
    got_plain = apply_mask_plain(as_kind(data, kind), mask)
    assert type(got_c) is bytes
    assert type(got_plain) is bytes
    assert got_c == got_plain == expected
    if size <= 4096:
        assert expected == reference_mask(data, mask)


@pytest.mark.parametrize("fn", IMPLS, ids=IMPL_IDS)
def test_empty_payload(fn: MaskFn) -> None:
    assert fn(b"", b"abcd") == b""
    assert fn(memoryview(b""), b"abcd") == b""


@pytest.mark.parametrize("fn", IMPLS, ids=IMPL_IDS)
def test_mask_may_be_a_bytearray(fn: MaskFn) -> None:
    # FrameParser slices the mask out of its bytearray buffer when a frame spans feeds.
    data = bytes(range(11))
    expected = reference_mask(data, b"\x01\x02\x03\x04")
    assert fn(data, bytearray(b"\x01\x02\x03\x04")) == expected


@pytest.mark.parametrize("bad_mask", [b"", b"abc", b"abcde", b"abcdefgh"])
@pytest.mark.parametrize("fn", IMPLS, ids=IMPL_IDS)
def test_mask_of_wrong_length_raises(fn: MaskFn, bad_mask: bytes) -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        fn(b"payload", bad_mask)
    with pytest.raises(ValueError, match="4 bytes"):
        fn(b"", bad_mask)


@pytest.mark.parametrize("fn", IMPLS, ids=IMPL_IDS)
def test_input_is_not_modified(fn: MaskFn) -> None:
    data = bytearray(b"unchanged payload")
    fn(data, b"\xff\xff\xff\xff")
    assert data == b"unchanged payload"


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=70), st.binary(min_size=71, max_size=5000)),
    mask=st.binary(min_size=4, max_size=4),
    kind=st.sampled_from(KINDS),
)
def test_property_c_matches_plain_and_masking_twice_is_identity(
    data: bytes, mask: bytes, kind: str
) -> None:
    assert apply_mask_c is not None
    masked_c = apply_mask_c(as_kind(data, kind), mask)
    masked_plain = apply_mask_plain(as_kind(data, kind), mask)
    assert masked_c == masked_plain == reference_mask(data, mask)
    assert apply_mask_c(as_kind(masked_c, kind), mask) == data
    assert apply_mask_plain(as_kind(masked_plain, kind), mask) == data
