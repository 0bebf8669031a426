"""broker.deflate: header grammar, negotiation both roles, the codec, interop, zip bombs."""

from __future__ import annotations

import json
import os
import random
import tracemalloc
import zlib

import pytest
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.extensions.permessage_deflate import PerMessageDeflate as TheirDeflate
from websockets.frames import Frame as TheirFrame
from websockets.frames import Opcode as TheirOpcode
from websockets.headers import build_extension, parse_extension

from broker.deflate import (
    DeflateParams,
    PerMessageDeflate,
    accept_client_response,
    client_offer,
    negotiate_server,
    parse_extensions,
    shared_compress,
)
from broker.errors import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    HandshakeError,
    PayloadTooBig,
    ProtocolError,
)

MIB = 1024 * 1024
TAIL = b"\x00\x00\xff\xff"
PMD = "permessage-deflate"
SNCT = "server_no_context_takeover"
CNCT = "client_no_context_takeover"
BOTH = f"{SNCT}; {CNCT}"  # our server's answer to every offer it accepts


def make(params: DeflateParams, *, is_server: bool, min_bytes: int = 0, limit: int = MIB):
    return PerMessageDeflate(
        params, is_server=is_server, level=6, min_bytes=min_bytes, max_message_bytes=limit
    )


def messages(count: int = 60) -> list[bytes]:
    """Pub/sub-like traffic: repetitive JSON, plus some incompressible and tiny messages."""
    rng = random.Random(7692)
    out = []
    for i in range(count):
        if i % 10 == 3:
            out.append(rng.randbytes(rng.randrange(200, 3000)))
        elif i % 10 == 7:
            out.append(b"x")
        else:
            body = {"op": "message", "topic": f"prices.{i % 4}", "seq": i, "data": [i] * 40}
            out.append(json.dumps(body).encode())
    out.append(b"")
    out.append(b"\x00" * 300_000)
    return out


def send(sender: PerMessageDeflate, receiver: PerMessageDeflate, data: bytes) -> bytes:
    """What the connection does: RSV1 set iff compress() returned bytes."""
    compressed = sender.compress(data)
    return data if compressed is None else receiver.decompress(compressed)


# --- header grammar ---


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([PMD], [(PMD, [])]),
        (
            ["permessage-deflate; client_max_window_bits"],
            [(PMD, [("client_max_window_bits", None)])],
        ),
        (
            ["permessage-deflate ;server_max_window_bits = 10 ;\tclient_no_context_takeover"],
            [(PMD, [("server_max_window_bits", "10"), ("client_no_context_takeover", None)])],
        ),
        (
            ['permessage-deflate; server_max_window_bits="10"'],
            [(PMD, [("server_max_window_bits", "10")])],
        ),
        (['x; p="a\\b\\-c"'], [("x", [("p", "ab-c")])]),
        (["a, b; c=1", "d"], [("a", []), ("b", [("c", "1")]), ("d", [])]),
        ([", a ,, b ,"], [("a", []), ("b", [])]),
        ([], []),
    ],
)
def test_parse_extensions(values: list[str], expected: list) -> None:
    assert parse_extensions(values) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        " , ",
        "a b",
        "a;",
        "a; ;b",
        "a;=1",
        "a; p=",
        'a; p="1',
        'a; p="1 2"',
        'a; p="1,2"',
        'a; p=""',
        "a; p=1 2",
        "a; p=1=2",
        ";a",
        "a=1",
        "a; p=é",
        "permessage-deflate, ;",
    ],
)
def test_parse_extensions_malformed(value: str) -> None:
    with pytest.raises(HandshakeError) as info:
        parse_extensions([value])
    assert info.value.status == 400


# --- server negotiation ---

N = DeflateParams


@pytest.mark.parametrize(
    ("offers", "max_bits", "response", "params"),
    [
        ([], 15, None, None),
        (["x-webkit-deflate-frame"], 15, None, None),
        ([PMD], 15, f"{PMD}; {BOTH}", N(True, True, 15, 15)),
        (["x-foo; bar, permessage-deflate"], 15, f"{PMD}; {BOTH}", N(True, True, 15, 15)),
        ([f"{PMD}; {SNCT}"], 15, f"{PMD}; {BOTH}", N(True, True, 15, 15)),
        ([f"{PMD}; {BOTH}"], 15, f"{PMD}; {BOTH}", N(True, True, 15, 15)),
        ([f"{PMD}; client_max_window_bits"], 15, f"{PMD}; {BOTH}", N(True, True, 15, 15)),
        (
            [f"{PMD}; client_max_window_bits=10"],
            15,
            f"{PMD}; {BOTH}; client_max_window_bits=10",
            N(True, True, 15, 10),
        ),
        (
            [f"{PMD}; client_max_window_bits=8"],
            15,
            f"{PMD}; {BOTH}; client_max_window_bits=8",
            N(True, True, 15, 8),
        ),
        (
            [f"{PMD}; client_no_context_takeover"],
            15,
            f"{PMD}; {BOTH}",
            N(True, True, 15, 15),
        ),
        (
            [f"{PMD}; server_max_window_bits=10"],
            15,
            f"{PMD}; {BOTH}; server_max_window_bits=10",
            N(True, True, 10, 15),
        ),
        (
            [f'{PMD}; server_max_window_bits="11"'],
            15,
            f"{PMD}; {BOTH}; server_max_window_bits=11",
            N(True, True, 11, 15),
        ),
        (
            [f"{PMD}; server_max_window_bits=15"],
            15,
            f"{PMD}; {BOTH}; server_max_window_bits=15",
            N(True, True, 15, 15),
        ),
        (
            [f"{PMD}; server_max_window_bits=12"],
            10,
            f"{PMD}; {BOTH}; server_max_window_bits=10",
            N(True, True, 10, 15),
        ),
        ([PMD], 12, f"{PMD}; {BOTH}; server_max_window_bits=12", N(True, True, 12, 15)),
        ([f"{PMD}; server_max_window_bits=8"], 15, None, None),
        (
            [f"{PMD}; server_max_window_bits=8, {PMD}; client_max_window_bits"],
            15,
            f"{PMD}; {BOTH}",
            N(True, True, 15, 15),
        ),
        (
            [f"{PMD}; foo", f"{PMD}; client_no_context_takeover"],
            15,
            f"{PMD}; {BOTH}",
            N(True, True, 15, 15),
        ),
        ([f"{PMD}; client_no_context_takeover; client_no_context_takeover"], 15, None, None),
        ([f"{PMD}; server_max_window_bits=10; server_max_window_bits=10"], 15, None, None),
        ([f"{PMD}; client_max_window_bits; client_max_window_bits=9"], 15, None, None),
        ([f"{PMD}; foo"], 15, None, None),
        ([f"{PMD}; foo=1"], 15, None, None),
        ([f"{PMD}; server_max_window_bits"], 15, None, None),
        ([f"{PMD}; server_max_window_bits=16"], 15, None, None),
        ([f"{PMD}; server_max_window_bits=7"], 15, None, None),
        ([f"{PMD}; server_max_window_bits=09"], 15, None, None),
        ([f"{PMD}; server_max_window_bits=abc"], 15, None, None),
        ([f"{PMD}; client_max_window_bits=16"], 15, None, None),
        ([f"{PMD}; {SNCT}=1"], 15, None, None),
        ([f"{PMD}; client_no_context_takeover=true"], 15, None, None),
    ],
)
def test_negotiate_server(
    offers: list[str], max_bits: int, response: str | None, params: DeflateParams | None
) -> None:
    result = negotiate_server(offers, max_window_bits=max_bits)
    if response is None:
        assert result is None
        return
    assert result == (params, response)
    assert result is not None
    # Sections 7.1.1.1/7.1.1.2: both are declared, asked for or not, so that the server
    # keeps no inflate window between a client's messages.
    assert parse_extensions([result[1]])[0][1][:2] == [(SNCT, None), (CNCT, None)]
    assert result[0].server_no_context_takeover and result[0].client_no_context_takeover


def test_negotiate_server_malformed_header_is_400() -> None:
    with pytest.raises(HandshakeError) as info:
        negotiate_server(["permessage-deflate; ;"], max_window_bits=15)
    assert info.value.status == 400


@pytest.mark.parametrize("bits", [8, 16])
def test_negotiate_rejects_bad_configuration(bits: int) -> None:
    with pytest.raises(ValueError):
        negotiate_server([PMD], max_window_bits=bits)
    with pytest.raises(ValueError):
        client_offer(max_window_bits=bits)


# --- client side ---


@pytest.mark.parametrize(
    ("bits", "offer"),
    [
        (15, "permessage-deflate; client_max_window_bits"),
        (10, "permessage-deflate; server_max_window_bits=10; client_max_window_bits=10"),
    ],
)
def test_client_offer(bits: int, offer: str) -> None:
    assert client_offer(max_window_bits=bits) == offer
    assert negotiate_server([offer], max_window_bits=15) is not None


@pytest.mark.parametrize(
    ("values", "max_bits", "params"),
    [
        ([], 15, None),
        ([PMD], 15, N()),
        ([f"{PMD}; {SNCT}"], 15, N(True, False, 15, 15)),
        ([f"{PMD}; client_no_context_takeover"], 15, N(False, True, 15, 15)),
        ([f"{PMD}; server_max_window_bits=10"], 15, N(False, False, 10, 15)),
        ([f"{PMD}; server_max_window_bits=8"], 15, N(False, False, 8, 15)),
        ([f"{PMD}; client_max_window_bits=10"], 15, N(False, False, 15, 10)),
        ([f'{PMD}; client_max_window_bits="12"'], 15, N(False, False, 15, 12)),
        ([f"{PMD}; server_max_window_bits=10"], 10, N(False, False, 10, 10)),
        ([f"{PMD}; server_max_window_bits=9"], 10, N(False, False, 9, 10)),
        (
            [f"{PMD}; server_max_window_bits=10; client_max_window_bits=9"],
            10,
            N(False, False, 10, 9),
        ),
        (
            [f"{PMD}; {SNCT}; client_no_context_takeover; server_max_window_bits=12"],
            15,
            N(True, True, 12, 15),
        ),
        # The response from our own server, in every shape negotiate_server produces.
        (
            [f"{PMD}; {SNCT}; server_max_window_bits=10; client_max_window_bits=10"],
            10,
            N(True, False, 10, 10),
        ),
    ],
)
def test_accept_client_response(
    values: list[str], max_bits: int, params: DeflateParams | None
) -> None:
    assert accept_client_response(values, max_window_bits=max_bits) == params


@pytest.mark.parametrize(
    ("values", "max_bits"),
    [
        (["x-foo"], 15),
        ([f"{PMD}, {PMD}"], 15),
        ([PMD, PMD], 15),
        ([f"{PMD}, x-foo"], 15),
        ([f"{PMD}; foo"], 15),
        ([f"{PMD}; {SNCT}; {SNCT}"], 15),
        ([f"{PMD}; {SNCT}=1"], 15),
        ([f"{PMD}; client_max_window_bits"], 15),
        ([f"{PMD}; client_max_window_bits=8"], 15),
        ([f"{PMD}; server_max_window_bits=16"], 15),
        ([f"{PMD}; server_max_window_bits=07"], 15),
        ([f"{PMD}; server_max_window_bits"], 15),
        ([f"{PMD};"], 15),
        ([""], 15),
        ([PMD], 10),
        ([f"{PMD}; server_max_window_bits=11"], 10),
        ([f"{PMD}; server_max_window_bits=10; client_max_window_bits=11"], 10),
    ],
)
def test_accept_client_response_invalid(values: list[str], max_bits: int) -> None:
    with pytest.raises(HandshakeError) as info:
        accept_client_response(values, max_window_bits=max_bits)
    assert info.value.status == 101


def test_our_client_accepts_our_server() -> None:
    for bits in range(9, 16):
        negotiated = negotiate_server([client_offer(max_window_bits=bits)], max_window_bits=15)
        assert negotiated is not None
        params, response = negotiated
        client_params = accept_client_response([response], max_window_bits=bits)
        assert client_params == params


# --- the codec ---


@pytest.mark.parametrize("server_nct", [False, True])
@pytest.mark.parametrize("client_nct", [False, True])
@pytest.mark.parametrize(("server_bits", "client_bits"), [(15, 15), (9, 12), (12, 8)])
def test_round_trip_both_directions(
    server_nct: bool, client_nct: bool, server_bits: int, client_bits: int
) -> None:
    params = DeflateParams(server_nct, client_nct, server_bits, client_bits)
    if client_bits == 8:  # we never compress with 8 bits: only the inflating side sees it
        client_params = DeflateParams(server_nct, client_nct, server_bits, 9)
    else:
        client_params = params
    server = make(params, is_server=True)
    client = make(client_params, is_server=False)
    compressed = 0
    for data in messages():
        out = server.compress(data)
        assert (data if out is None else client.decompress(out)) == data
        assert send(client, server, data) == data
        compressed += out is not None
    assert compressed > 30


def test_context_takeover_carries_over_and_no_context_does_not() -> None:
    data = json.dumps({"topic": "prices.eu", "data": list(range(100))}).encode()
    with_context = make(DeflateParams(), is_server=True)
    first, second = with_context.compress(data), with_context.compress(data)
    assert first is not None and second is not None
    assert len(second) < len(first) // 4
    stateless = make(DeflateParams(server_no_context_takeover=True), is_server=True)
    assert stateless.compress(data) == stateless.compress(data) == first


def test_incompressible_message_does_not_break_context() -> None:
    # The sender compressed it but sends it raw, so the peer's window never holds it; a later
    # message that repeats it must still decode.
    sender = make(DeflateParams(), is_server=False)
    receiver = make(DeflateParams(), is_server=True)
    noise = random.Random(1).randbytes(2000)
    text = b"abc" * 300
    assert send(sender, receiver, text) == text
    assert sender.compress(noise) is None
    for data in (noise + text, text + noise, noise):
        assert send(sender, receiver, data) == data


@pytest.mark.parametrize(
    ("data", "min_bytes"),
    [(b"", 0), (b"a" * 99, 100), (os.urandom(500), 0), (b"ab", 0)],
)
@pytest.mark.parametrize("no_context", [False, True])
def test_compress_declines(data: bytes, min_bytes: int, no_context: bool) -> None:
    params = DeflateParams(server_no_context_takeover=no_context)
    assert make(params, is_server=True, min_bytes=min_bytes).compress(data) is None


def test_stateless_output_decodes_with_fresh_inflater() -> None:
    server = make(DeflateParams(server_no_context_takeover=True), is_server=True)
    outputs = [(data, server.compress(data)) for data in messages()]
    outputs += [(data, shared_compress(data, window_bits=15, level=6)) for data in messages()]
    random.Random(3).shuffle(outputs)
    checked = 0
    for data, out in outputs:
        if out is not None:
            assert zlib.decompressobj(-15).decompress(out + TAIL) == data
            checked += 1
    assert checked > 60


def test_shared_compress_respects_window_bits() -> None:
    data = random.Random(5).randbytes(600) * 20  # repeats 600 bytes apart
    small = shared_compress(data, window_bits=9, level=9)
    big = shared_compress(data, window_bits=15, level=9)
    assert zlib.decompressobj(-9).decompress(small + TAIL) == data
    assert len(big) < len(small) // 5  # only a window above 600 bytes reaches the repeats


@pytest.mark.parametrize(
    ("payloads", "expected"),
    [
        # RFC 7692 section 7.2.3.1, 7.2.3.2 (shared window), 7.2.3.3, 7.2.3.4, 7.2.3.5, 7.2.3.6
        (["f248cdc9c90700"], [b"Hello"]),
        (["f248cdc9c90700", "f200110000"], [b"Hello", b"Hello"]),
        (["000500faff48656c6c6f00"], [b"Hello"]),
        (["f348cdc9c9070000", "f248cdc9c90700"], [b"Hello", b"Hello"]),
        (["f24805000000ffffcac9c90700"], [b"Hello"]),
        (["00"], [b""]),
    ],
)
def test_rfc7692_examples(payloads: list[str], expected: list[bytes]) -> None:
    client = make(DeflateParams(), is_server=False)
    assert [client.decompress(bytes.fromhex(p)) for p in payloads] == expected


def test_zlib_objects_are_lazy_and_dropped_without_context() -> None:
    params = DeflateParams(server_no_context_takeover=True, client_no_context_takeover=True)
    server = make(params, is_server=True)
    client = make(params, is_server=False)
    assert server._compressor is None and server._decompressor is None
    data = b"hello hello hello " * 20
    assert send(client, server, data) == data
    assert send(server, client, data) == data
    assert server._compressor is None and server._decompressor is None


BROWSER_OFFER = f"{PMD}; client_max_window_bits"  # Chrome's and Firefox's offer


def test_server_keeps_no_inflater_between_messages() -> None:
    # A browser does not ask for client_no_context_takeover; we answer it anyway, so an
    # idle connection holds no inflate window after its first compressed message.
    negotiated = negotiate_server([BROWSER_OFFER], max_window_bits=15)
    assert negotiated is not None
    params, response = negotiated
    assert params.client_no_context_takeover
    server = make(params, is_server=True)
    client = make(accept_client_response([response]) or N(), is_server=False)
    for data in messages():
        assert send(client, server, data) == data
        assert server._decompressor is None


def test_peer_breaking_no_context_takeover_is_protocol_error() -> None:
    # A client that agreed to client_no_context_takeover but refers back to its previous
    # message: the fresh inflater fails the message rather than decode another's history.
    negotiated = negotiate_server([BROWSER_OFFER], max_window_bits=15)
    assert negotiated is not None
    server = make(negotiated[0], is_server=True)
    peer = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = random.Random(3).randbytes(2000)
    first = peer.compress(data) + peer.flush(zlib.Z_SYNC_FLUSH)
    second = peer.compress(data) + peer.flush(zlib.Z_SYNC_FLUSH)
    assert server.decompress(first[:-4]) == data
    with pytest.raises(ProtocolError) as info:
        server.decompress(second[:-4])
    assert info.value.close_code == CLOSE_PROTOCOL_ERROR


def test_invalid_params() -> None:
    with pytest.raises(ValueError):
        DeflateParams(server_max_window_bits=16)
    with pytest.raises(ValueError):
        DeflateParams(client_max_window_bits=7)
    with pytest.raises(ValueError):  # zlib cannot compress with an 8-bit window
        make(DeflateParams(server_max_window_bits=8), is_server=True)


# --- limits and corrupt input ---


def test_zip_bomb_raises_without_inflating_it_all() -> None:
    bomb = shared_compress(b"\x00" * (10 * MIB), window_bits=15, level=9)
    assert len(bomb) < 20_000
    receiver = make(DeflateParams(), is_server=True, limit=MIB)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooBig) as info:
            receiver.decompress(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.close_code == CLOSE_TOO_BIG
    assert peak < 3 * MIB


@pytest.mark.parametrize(("size", "fits"), [(MIB, True), (MIB + 1, False)])
def test_limit_is_inclusive(size: int, fits: bool) -> None:
    receiver = make(DeflateParams(), is_server=True, limit=MIB)
    payload = shared_compress(b"a" * size, window_bits=15, level=6)
    if fits:
        assert receiver.decompress(payload) == b"a" * size
    else:
        with pytest.raises(PayloadTooBig):
            receiver.decompress(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",
        b"\x07",  # BTYPE 11 (reserved)
        bytes.fromhex("000500faff48656c"),  # stored block cut short, then the tail
        bytes.fromhex("0005000000"),  # stored block with NLEN not the complement of LEN
    ],
)
def test_corrupt_data_is_protocol_error(payload: bytes) -> None:
    receiver = make(DeflateParams(), is_server=True)
    with pytest.raises(ProtocolError) as info:
        receiver.decompress(payload)
    assert not isinstance(info.value, PayloadTooBig)
    assert info.value.close_code == CLOSE_PROTOCOL_ERROR


def test_peer_exceeding_agreed_window_is_protocol_error() -> None:
    # The client agreed to a 512-byte window but its second message refers 20000 bytes back.
    receiver = make(DeflateParams(client_max_window_bits=9), is_server=True)
    peer = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = random.Random(2).randbytes(20000)
    first = peer.compress(data) + peer.flush(zlib.Z_SYNC_FLUSH)
    second = peer.compress(data) + peer.flush(zlib.Z_SYNC_FLUSH)
    assert receiver.decompress(first[:-4]) == data
    with pytest.raises(ProtocolError) as info:
        receiver.decompress(second[:-4])
    assert info.value.close_code == CLOSE_PROTOCOL_ERROR


# --- interop with the websockets library as a peer ---


def their_frame(data: bytes, *, rsv1: bool = False) -> TheirFrame:
    return TheirFrame(TheirOpcode.BINARY, data, rsv1=rsv1)


def exchange(ours: PerMessageDeflate, theirs: TheirDeflate) -> None:
    for data in messages():
        encoded = theirs.encode(their_frame(data))
        assert encoded.rsv1
        assert ours.decompress(bytes(encoded.data)) == data
        compressed = ours.compress(data)
        if compressed is not None:
            decoded = theirs.decode(their_frame(compressed, rsv1=True), max_size=MIB)
            assert bytes(decoded.data) == data


CLIENT_FACTORIES = [
    {},
    {"client_no_context_takeover": True},
    {"server_max_window_bits": 10},
    {"client_max_window_bits": 11},
    {"server_no_context_takeover": True, "client_max_window_bits": None},
]


@pytest.mark.parametrize("config", CLIENT_FACTORIES)
def test_interop_our_server_their_client(config: dict) -> None:
    factory = ClientPerMessageDeflateFactory(**config)
    offer = build_extension([(factory.name, factory.get_request_params())])
    negotiated = negotiate_server([offer], max_window_bits=15)
    assert negotiated is not None
    params, response = negotiated
    [(_, response_params)] = parse_extension(response)
    theirs = factory.process_response_params(response_params, [])
    # Their client accepts client_no_context_takeover unasked and honours it.
    assert theirs.local_no_context_takeover and params.client_no_context_takeover
    exchange(make(params, is_server=True), theirs)


SERVER_FACTORIES = [
    {},
    {"server_no_context_takeover": True},
    {"client_no_context_takeover": True},
    {"server_max_window_bits": 9},
    {"client_max_window_bits": 9},
]


@pytest.mark.parametrize("bits", [15, 10])
@pytest.mark.parametrize("config", SERVER_FACTORIES)
def test_interop_our_client_their_server(config: dict, bits: int) -> None:
    factory = ServerPerMessageDeflateFactory(**config)
    [(_, offer_params)] = parse_extension(client_offer(max_window_bits=bits))
    response_params, theirs = factory.process_request_params(offer_params, [])
    response = build_extension([(factory.name, response_params)])
    params = accept_client_response([response], max_window_bits=bits)
    assert params is not None
    exchange(make(params, is_server=False), theirs)
