"""Tests for broker.handshake: HTTP/1.1 parsing, the RFC 6455 opening handshake, both roles."""

from __future__ import annotations

import base64

import pytest
from websockets.client import ClientProtocol
from websockets.datastructures import Headers as WsHeaders
from websockets.exceptions import InvalidStatus
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.protocol import State
from websockets.typing import Origin, Subprotocol
from websockets.uri import parse_uri

from broker.errors import HandshakeError
from broker.handshake import (
    WS_GUID,
    Request,
    RequestParser,
    Response,
    ResponseParser,
    accept_key,
    accept_upgrade,
    check_response,
    client_request,
    error_response,
    http_response,
    new_key,
)
from broker.settings import Settings

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

UPGRADE_HEADERS = [
    ("Host", "broker.example:8765"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", RFC_KEY),
    ("Sec-WebSocket-Version", "13"),
]


def raw(start: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [start, *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def upgrade_raw(
    *, drop: tuple[str, ...] = (), add: list[tuple[str, str]] | None = None, start: str = ""
) -> bytes:
    """The RFC example request, minus headers named in `drop`, plus `add`."""
    kept = [(n, v) for n, v in UPGRADE_HEADERS if n not in drop]
    return raw(start or "GET /ws HTTP/1.1", kept + (add or []))


def small_parser() -> RequestParser:
    return RequestParser(
        max_request_line_bytes=64, max_header_bytes=256, max_headers=5, max_body_bytes=32
    )


def parse(data: bytes, parser: RequestParser | None = None) -> Request:
    request = (parser or RequestParser.from_settings(Settings())).feed(data)
    assert request is not None
    return request


def parse_response(data: bytes) -> Response:
    response = ResponseParser().feed(data)
    assert response is not None
    return response


def status_of(call) -> int:
    with pytest.raises(HandshakeError) as info:
        call()
    return info.value.status


def header_lines(response: bytes) -> list[tuple[str, str]]:
    head, sep, _ = response.partition(b"\r\n\r\n")
    assert sep
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [tuple(line.split(": ", 1)) for line in lines]  # type: ignore[misc]


# --- accept key -------------------------------------------------------------------------


def test_accept_key_matches_rfc_example() -> None:
    assert WS_GUID == "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    assert accept_key(RFC_KEY) == RFC_ACCEPT


@pytest.mark.parametrize("compression", [False, True])
def test_101_response_lines_are_clean(compression: bool) -> None:
    offer = [("Sec-WebSocket-Extensions", "permessage-deflate")] if compression else []
    request = parse(upgrade_raw(add=[*offer, ("Sec-WebSocket-Protocol", "redwire.v1")]))
    accepted = accept_upgrade(request, subprotocols=["redwire.v1"], compression=compression)
    response = accepted.response
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert response.endswith(b"\r\n\r\n")
    assert response.count(b"\n") == response.count(b"\r\n") == response.count(b"\r")
    for name, value in header_lines(response):
        assert value == value.strip() and value
        assert name == name.strip()
    assert ("Sec-WebSocket-Accept", RFC_ACCEPT) in header_lines(response)


# --- request parsing --------------------------------------------------------------------

SAMPLE = raw(
    "POST /publish?topic=a&x=1 HTTP/1.1",
    [("Host", "h"), ("X-Multi", "one"), ("content-length", "5"), ("x-multi", " two ")],
    b"hello",
)


def chunkings(data: bytes) -> list[list[bytes]]:
    splits = [[data[:i], data[i:]] for i in range(1, len(data))]
    return [[data], [data[i : i + 1] for i in range(len(data))], *splits]


def feed_chunks(parser, chunks: list[bytes]):
    for n, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not None:
            return result, b"".join(chunks[n + 1 :])
    return None, b""


def test_request_fields() -> None:
    request = parse(SAMPLE)
    assert (request.method, request.target) == ("POST", "/publish?topic=a&x=1")
    assert (request.path, request.query, request.http_version) == ("/publish", "topic=a&x=1", "1.1")
    assert request.headers[3] == ("x-multi", "two")
    assert request.header("X-MULTI") == "one, two"
    assert request.header_values("x-multi") == ["one", "two"]
    assert request.header("absent") is None and request.header_values("absent") == []
    assert request.body == b"hello"


@pytest.mark.parametrize("chunks", chunkings(SAMPLE + b"NEXT"))
def test_request_same_in_any_chunking(chunks: list[bytes]) -> None:
    whole_parser = small_parser()
    whole = whole_parser.feed(SAMPLE + b"NEXT")
    parser = small_parser()
    request, unfed = feed_chunks(parser, chunks)
    assert request == whole
    assert parser.leftover + unfed == whole_parser.leftover == b"NEXT"


def test_leftover_keeps_early_frames_and_pipelined_request() -> None:
    frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # RFC 6455 section 5.7 "Hello"
    parser = RequestParser.from_settings(Settings())
    assert parser.feed(upgrade_raw() + frame) is not None
    assert parser.leftover == frame
    second = raw("GET /health HTTP/1.1", [("Host", "h")])
    parser = RequestParser.from_settings(Settings())
    assert parse(SAMPLE + second, parser).body == b"hello"
    assert parser.leftover == second
    assert parse(parser.leftover).path == "/health"
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


@pytest.mark.parametrize(
    ("version", "connection", "expected"),
    [
        ("1.1", None, True),
        ("1.1", "close", False),
        ("1.1", "Upgrade, Close", False),
        ("1.0", None, False),
        ("1.0", "keep-alive", True),
    ],
)
def test_keep_alive(version: str, connection: str | None, expected: bool) -> None:
    headers = [("Host", "h")] + ([("Connection", connection)] if connection else [])
    assert parse(raw(f"GET / HTTP/{version}", headers)).keep_alive is expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [(["websocket"], True), (["h2c, WebSocket"], True), (["h2c", "websocket"], True),
     (["websocket/13"], False), ([], False)],
)  # fmt: skip
def test_is_upgrade(values: list[str], expected: bool) -> None:
    assert parse(raw("GET / HTTP/1.1", [("Upgrade", v) for v in values])).is_upgrade is expected


LONG = "a" * 70
REQUEST_ERRORS = [
    # start line
    (f"GET /{LONG} HTTP/1.1\r\n\r\n", 414),
    ("GET  / HTTP/1.1\r\n\r\n", 400),
    ("GET / HTTP/1.1 \r\n\r\n", 400),
    ("GET /\r\n\r\n", 400),
    ("G(T / HTTP/1.1\r\n\r\n", 400),
    ("GET / http/1.1\r\n\r\n", 400),
    ("GET / HTTP/1\r\n\r\n", 400),
    ("\r\nGET / HTTP/1.1\r\n\r\n", 400),
    ("GET /\xff HTTP/1.1\r\n\r\n", 400),
    ("GET / HTTP/2.0\r\n\r\n", 505),
    ("GET / HTTP/0.9\r\n\r\n", 505),
    ("GET / HTTP/1.2\r\n\r\n", 505),
    # line endings
    ("GET / HTTP/1.1\n\r\n", 400),
    ("GET / HTTP/1.1\r\nHost: h\n\r\n", 400),
    ("GET / HTTP/1.1\r\nHost: h\r\n\n", 400),
    ("GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
    # header fields
    ("GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\nHost\t: h\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\nHost h\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\nHo st: h\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\n: h\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\n\tX: a\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", 400),
    ("GET / HTTP/1.1\r\nX: " + "v" * 300 + "\r\n\r\n", 431),
    ("GET / HTTP/1.1\r\n" + "X: v\r\n" * 6 + "\r\n", 431),
    # body framing
    ("POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    ("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n", 400),
    ("POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\nx", 400),
    ("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    ("POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\nxx", 400),
    ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    ("POST / HTTP/1.1\r\nContent-Length: 33\r\n\r\n", 413),
    ("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n", 413),
]


@pytest.mark.parametrize(("data", "status"), REQUEST_ERRORS)
@pytest.mark.parametrize("bytewise", [False, True])
def test_request_errors(data: str, status: int, bytewise: bool) -> None:
    encoded = data.encode("latin-1")
    chunks = [encoded[i : i + 1] for i in range(len(encoded))] if bytewise else [encoded]
    assert status_of(lambda: feed_chunks(small_parser(), chunks)) == status


@pytest.mark.parametrize(
    ("data", "complete"),
    [
        ("GET /" + "a" * 49 + " HTTP/1.1\r\n\r\n", True),  # request line of exactly 64 bytes
        ("GET / HTTP/1.1\r\nX: " + "v" * 251 + "\r\n\r\n", True),  # 256 header bytes
        ("GET / HTTP/1.1\r\n" + "X: v\r\n" * 5 + "\r\n", True),
        ("POST / HTTP/1.1\r\nContent-Length: 32\r\n\r\n" + "b" * 32, True),
        ("POST / HTTP/1.1\r\nContent-Length: 0032\r\n\r\n" + "b" * 32, True),
    ],
)
def test_limits_are_inclusive(data: str, complete: bool) -> None:
    encoded = data.encode()
    chunks = [encoded[i : i + 1] for i in range(len(encoded))]
    assert (feed_chunks(small_parser(), chunks)[0] is not None) is complete
    assert (small_parser().feed(encoded) is not None) is complete


@pytest.mark.parametrize(
    ("prefix", "filler", "status", "limit"),
    [
        (b"GET /", b"a", 414, Settings().max_request_line_bytes),
        (b"GET / HTTP/1.1\r\nX-Long: ", b"v", 431, Settings().max_header_bytes),
        (b"GET / HTTP/1.1\r\n", b"X: v\r\n", 431, Settings().max_headers * 6),
    ],
)
def test_limits_fail_early(prefix: bytes, filler: bytes, status: int, limit: int) -> None:
    chunk = filler * (1024 // len(filler))
    parser = RequestParser.from_settings(Settings())
    parser.feed(prefix)
    fed = len(prefix)
    with pytest.raises(HandshakeError) as info:
        while fed < 1024 * 1024:
            parser.feed(chunk)
            fed += len(chunk)
    assert info.value.status == status
    assert fed <= limit + len(prefix) + len(chunk)
    one_go = RequestParser.from_settings(Settings())
    assert status_of(lambda: one_go.feed(prefix + filler * (1024 * 1024 // len(filler)))) == status


# --- accept_upgrade ---------------------------------------------------------------------


def test_accept_upgrade_minimal() -> None:
    accepted = accept_upgrade(parse(upgrade_raw()), compression=False)
    assert accepted.response == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    assert (accepted.subprotocol, accepted.deflate) == (None, None)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (upgrade_raw(start="POST /ws HTTP/1.1"), 405),
        (upgrade_raw(start="GET /ws HTTP/1.0"), 400),
        (upgrade_raw(start="POST /ws HTTP/1.0"), 405),  # method is checked first
        (upgrade_raw(drop=("Host",)), 400),
        (upgrade_raw(add=[("Host", "other")]), 400),
        (upgrade_raw(drop=("Upgrade",)), 400),
        (upgrade_raw(drop=("Upgrade",), add=[("Upgrade", "h2c")]), 400),
        (upgrade_raw(drop=("Connection",)), 400),
        (upgrade_raw(drop=("Connection",), add=[("Connection", "keep-alive")]), 400),
        (upgrade_raw(drop=("Sec-WebSocket-Key",)), 400),
        (upgrade_raw(add=[("Sec-WebSocket-Key", RFC_KEY)]), 400),
        (upgrade_raw(drop=("Sec-WebSocket-Key",), add=[("Sec-WebSocket-Key", "c2hvcnQ=")]), 400),
        (upgrade_raw(drop=("Sec-WebSocket-Key",), add=[("Sec-WebSocket-Key", "not base64!")]), 400),
        (upgrade_raw(drop=("Sec-WebSocket-Key",), add=[("Sec-WebSocket-Key", "dGhl\xe9")]), 400),
        (upgrade_raw(drop=("Sec-WebSocket-Version",)), 426),
        (upgrade_raw(drop=("Sec-WebSocket-Version",), add=[("Sec-WebSocket-Version", "8")]), 426),
        (upgrade_raw(add=[("Sec-WebSocket-Version", "8")]), 426),
        (upgrade_raw(add=[("Origin", "https://evil.example")]), 403),
        (upgrade_raw(drop=("Sec-WebSocket-Version",), add=[("Origin", "https://evil")]), 426),
    ],
)
def test_accept_upgrade_refusals(data: bytes, status: int) -> None:
    request = parse(data)
    allowed = ("https://app.example",)
    assert status_of(lambda: accept_upgrade(request, allowed_origins=allowed)) == status


def test_405_and_426_carry_their_headers() -> None:
    with pytest.raises(HandshakeError) as info:
        accept_upgrade(parse(upgrade_raw(start="PUT /ws HTTP/1.1")))
    assert ("Allow", "GET") in info.value.headers
    assert ("Allow", "GET") in header_lines(error_response(info.value))
    bad_version = upgrade_raw(drop=("Sec-WebSocket-Version",), add=[("Sec-WebSocket-Version", "8")])
    with pytest.raises(HandshakeError) as info:
        accept_upgrade(parse(bad_version))
    response = parse_response(error_response(info.value))
    assert response.status == 426
    assert response.header("Sec-WebSocket-Version") == "13"
    assert response.header("Connection") == "close"


@pytest.mark.parametrize(
    ("ours", "offered", "default", "expected", "header"),
    [
        (["a", "b"], ["b, a"], None, "a", "a"),  # server preference wins
        (["a", "b"], ["c", "b"], None, "b", "b"),  # several headers
        (["a"], ["c,a ,d"], None, "a", "a"),
        (["a"], [], None, None, None),
        (["a"], [], "a", "a", None),  # default reported, not sent
        (["a"], ["x"], "a", "a", None),
        (["a"], ["x"], None, None, None),
        ([], ["x"], None, None, None),
        (["A"], ["a"], None, None, None),  # subprotocol names are case-sensitive
    ],
)
def test_subprotocol_selection(
    ours: list[str], offered: list[str], default: str | None, expected: str | None, header: str
) -> None:
    request = parse(upgrade_raw(add=[("Sec-WebSocket-Protocol", v) for v in offered]))
    accepted = accept_upgrade(request, subprotocols=ours, default_subprotocol=default)
    assert accepted.subprotocol == expected
    assert parse_response(accepted.response).header("Sec-WebSocket-Protocol") == header


# The Host of UPGRADE_HEADERS is broker.example:8765. Rows: (allowed_origins, Origin, Host, ok).
SAME = "http://broker.example:8765"
ORIGIN_CASES = [
    # default: the same origin only; no Origin (not a browser) passes
    ((), None, None, True),
    ((), SAME, None, True),
    ((), "https://broker.example:8765", None, True),  # scheme-less: TLS at the load balancer
    ((), "HTTP://Broker.EXAMPLE:8765", None, True),
    ((), "http://broker.example", None, False),  # port 80, not 8765
    ((), "http://broker.example:8766", None, False),
    ((), "http://evil.example", None, False),
    ((), "http://evil.example:8765", None, False),
    ((), "http://broker.example.evil:8765", None, False),
    ((), "http://broker.example:8765.evil", None, False),
    ((), "http://user@broker.example:8765", None, False),
    ((), SAME + "/", None, False),
    ((), "broker.example:8765", None, False),
    ((), "null", None, False),
    ((), "", None, False),
    ((), "http://broker.example, http://broker.example:8765", None, False),  # two Origins
    # the Host decides what "same" is
    ((), "https://app.example", "app.example", True),  # no port in Host: 80 or 443
    ((), "http://app.example", "app.example", True),
    ((), "https://app.example:443", "app.example", True),
    ((), "https://app.example", "app.example:443", True),
    ((), "https://app.example:8443", "app.example", False),
    ((), "http://app.example", "app.example:443", False),
    ((), "http://[::1]:8765", "[::1]:8765", True),
    ((), "http://[::1]:8765", "[::2]:8765", False),
    ((), "http://127.0.0.1:8765", "localhost:8765", False),  # names, not addresses
    ((), "http://app.example", "app.example:99999", False),
    # allowed_origins widens it
    (("https://app.example",), "https://app.example", None, True),
    (("https://app.example",), "HTTPS://APP.Example", None, True),
    (("https://app.example",), "https://app.example:443", None, True),  # the default port
    (("https://App.Example", "http://other"), "https://app.example", None, True),
    (("https://app.example",), SAME, None, True),  # the same origin still passes
    (("https://app.example",), None, None, True),
    (("https://app.example",), "https://app.example:8443", None, False),
    (("https://app.example",), "http://app.example", None, False),
    (("https://app.example",), "https://app.example.evil", None, False),
    (("https://app.example",), "null", None, False),
    (("null",), "null", None, True),
    (("chrome-extension://abcdef",), "chrome-extension://abcdef", None, True),
    # "*" admits any site (unsafe with cookie auth)
    (("*",), "http://evil.example", None, True),
    (("*",), "null", None, True),
    (("*",), None, None, True),
]


@pytest.mark.parametrize(("allowed", "origin", "host", "ok"), ORIGIN_CASES)
def test_origin_policy(
    allowed: tuple[str, ...], origin: str | None, host: str | None, ok: bool
) -> None:
    drop = ("Host",) if host else ()
    add = ([("Host", host)] if host else []) + ([("Origin", origin)] if origin is not None else [])
    request = parse(upgrade_raw(drop=drop, add=add))
    Settings(allowed_origins=allowed)  # every entry in the table is a valid setting
    if ok:
        assert accept_upgrade(request, allowed_origins=allowed).response.startswith(b"HTTP/1.1 101")
    else:
        assert status_of(lambda: accept_upgrade(request, allowed_origins=allowed)) == 403


def test_refused_origin_is_not_echoed() -> None:
    request = parse(upgrade_raw(add=[("Origin", "http://evil.example")]))
    with pytest.raises(HandshakeError) as info:
        accept_upgrade(request)
    response = error_response(info.value)
    assert response.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"evil" not in response


@pytest.mark.parametrize(
    "header",
    [("X", "a\r\nInjected: 1"), ("X", "a\n"), ("X", "a\r"), ("X Y", "a"), ("X:", "a"), ("X", " a")],
)
def test_extra_headers_are_validated(header: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        accept_upgrade(parse(upgrade_raw()), extra_headers=[header])


def test_extra_headers_are_appended() -> None:
    accepted = accept_upgrade(parse(upgrade_raw()), extra_headers=[("X-Worker", "3")])
    assert header_lines(accepted.response)[-1] == ("X-Worker", "3")


# --- compression negotiation (delegated to broker.deflate) -----------------------------


def test_compression_negotiated_when_offered() -> None:
    offer = [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")]
    accepted = accept_upgrade(parse(upgrade_raw(add=offer)))
    assert accepted.deflate is not None
    value = parse_response(accepted.response).header("Sec-WebSocket-Extensions")
    # A browser's offer: both no_context_takeover parameters answered (RFC 7692 7.1.1.1-2).
    both = "server_no_context_takeover; client_no_context_takeover"
    assert value == f"permessage-deflate; {both}"
    assert accepted.deflate.client_no_context_takeover


@pytest.mark.parametrize(
    ("offer", "compression"),
    [([("Sec-WebSocket-Extensions", "permessage-deflate")], False), ([], True)],
)
def test_no_compression_without_offer_or_when_disabled(
    offer: list[tuple[str, str]], compression: bool
) -> None:
    request = parse(upgrade_raw(add=offer))
    accepted = accept_upgrade(request, compression=compression)
    assert accepted.deflate is None
    assert parse_response(accepted.response).header("Sec-WebSocket-Extensions") is None


def test_malformed_extension_offer_is_refused() -> None:
    request = parse(upgrade_raw(add=[("Sec-WebSocket-Extensions", "permessage-deflate;;")]))
    assert status_of(lambda: accept_upgrade(request)) == 400
    accepted = accept_upgrade(request, compression=False)
    assert accepted.deflate is None


# --- plain HTTP responses ---------------------------------------------------------------


def test_http_response() -> None:
    data = http_response(404, b"no such topic", headers=[("X-A", "1")])
    assert data == (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 13\r\nConnection: close\r\nX-Content-Type-Options: nosniff\r\n"
        b"X-A: 1\r\n\r\nno such topic"
    )
    data = http_response(204, keep_alive=True)
    assert data == (
        b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: keep-alive\r\n"
        b"X-Content-Type-Options: nosniff\r\n\r\n"
    )
    own = http_response(200, headers=[("x-content-type-options", "nosniff")])
    assert own.lower().count(b"x-content-type-options") == 1


def test_error_response() -> None:
    parser = ResponseParser()
    response = parser.feed(error_response(HandshakeError(403, "origin not allowed")))
    assert response is not None
    assert (response.status, response.reason) == (403, "Forbidden")
    assert response.header("Connection") == "close"
    assert parser.leftover == b"origin not allowed\n"
    assert response.header("Content-Length") == str(len(parser.leftover))


# --- client role ------------------------------------------------------------------------


def test_new_key() -> None:
    keys = {new_key() for _ in range(8)}
    assert len(keys) == 8
    assert all(len(base64.b64decode(k, validate=True)) == 16 for k in keys)


def test_client_request_fields() -> None:
    data = client_request(
        "::1", 8765, "/ws?x=1", key=RFC_KEY, subprotocols=["a", "b"], compression=False,
        origin="https://app.example", extra_headers=[("Authorization", "Bearer t")],
    )  # fmt: skip
    request = parse(data)
    assert (request.path, request.query) == ("/ws", "x=1")
    assert request.header("Host") == "[::1]:8765"
    assert request.header("Sec-WebSocket-Protocol") == "a, b"
    assert request.header("Origin") == "https://app.example"
    assert request.header("Sec-WebSocket-Extensions") is None
    assert request.headers[-1] == ("Authorization", "Bearer t")


@pytest.mark.parametrize(
    "kwargs",
    [{"path": "ws"}, {"path": "/a b"}, {"path": "/a\r\nX: 1"}, {"subprotocols": ["a b"]},
     {"extra_headers": [("X", "1\r\n")]}],
)  # fmt: skip
def test_client_request_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        client_request("h", 1, **{"path": "/", "key": RFC_KEY, **kwargs})


@pytest.mark.parametrize("compression", [False, True])
@pytest.mark.parametrize(("client_protocols", "expected"), [((), None), (("x", "b", "a"), "a")])
def test_round_trip(compression: bool, client_protocols: tuple[str, ...], expected: str) -> None:
    key = new_key()
    data = client_request(
        "localhost", 8765, "/ws", key=key, subprotocols=client_protocols,
        compression=compression, origin="http://localhost:8765",
    )  # fmt: skip
    request = parse(data)
    accepted = accept_upgrade(
        request, allowed_origins=("http://localhost:8765",), subprotocols=["a", "b"]
    )
    parser = ResponseParser()
    response = parser.feed(accepted.response + b"\x81\x00")
    assert response is not None and parser.leftover == b"\x81\x00"
    established = check_response(
        response, key=key, subprotocols=client_protocols, compression=compression
    )
    assert established.subprotocol == accepted.subprotocol == expected
    assert established.deflate == accepted.deflate
    assert (accepted.deflate is not None) is compression


def good_response(*, drop: tuple[str, ...] = (), add: tuple[tuple[str, str], ...] = ()):
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", RFC_ACCEPT),
    ]
    kept = tuple((n, v) for n, v in headers if n not in drop)
    return Response("1.1", 101, "Switching Protocols", kept + add)


def test_check_response_accepts_good_response() -> None:
    assert check_response(good_response(), key=RFC_KEY).subprotocol is None
    chosen = good_response(add=(("Sec-WebSocket-Protocol", "b"),))
    assert check_response(chosen, key=RFC_KEY, subprotocols=["a", "b"]).subprotocol == "b"


PROTOCOL = "Sec-WebSocket-Protocol"
EXTENSIONS = "Sec-WebSocket-Extensions"


@pytest.mark.parametrize(
    ("response", "kwargs", "status"),
    [
        (Response("1.1", 403, "Forbidden", ()), {}, 403),
        (Response("1.1", 200, "OK", good_response().headers), {}, 200),
        (good_response(drop=("Sec-WebSocket-Accept",), add=(("Sec-WebSocket-Accept", "x="),)), {},
         101),
        (good_response(add=(("Sec-WebSocket-Accept", accept_key("other")),)), {}, 101),
        (good_response(drop=("Sec-WebSocket-Accept",)), {}, 101),
        (good_response(add=(("Sec-WebSocket-Accept", RFC_ACCEPT),)), {}, 101),
        (good_response(drop=("Upgrade",)), {}, 101),
        (good_response(drop=("Upgrade",), add=(("Upgrade", "h2c"),)), {}, 101),
        (good_response(drop=("Connection",)), {}, 101),
        (good_response(add=((PROTOCOL, "chat"),)), {"subprotocols": ["a"]}, 101),
        (good_response(add=((PROTOCOL, "a"),)), {}, 101),
        (good_response(add=((PROTOCOL, "a, b"),)), {"subprotocols": ["a", "b"]}, 101),
        (good_response(add=((EXTENSIONS, "permessage-deflate"),)), {"compression": False}, 101),
        (good_response(add=((EXTENSIONS, "x-webkit-deflate-frame"),)), {"compression": True}, 101),
        (good_response(add=((EXTENSIONS, "permessage-deflate; bogus=1"),)), {}, 101),
    ],
)  # fmt: skip
def test_check_response_rejects(response: Response, kwargs: dict, status: int) -> None:
    assert status_of(lambda: check_response(response, key=RFC_KEY, **kwargs)) == status


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"HTTP/1.1 101\r\n\r\n", None),  # reason phrase may be missing
        (b"HTTP/1.1 101 \r\n\r\n", None),
        (b"HTTP/1.1  101 Switching\r\n\r\n", 400),
        (b"HTTP/1.1 1010 Switching\r\n\r\n", 400),
        (b"ICY 200 OK\r\n\r\n", 400),
        (b"HTTP/2.0 101 Switching\r\n\r\n", 505),
        (b"HTTP/1.1 101 Switching\nUpgrade: websocket\r\n\r\n", 400),
        (b"HTTP/1.1 101 Switching\r\nUpgrade : websocket\r\n\r\n", 400),
        (b"HTTP/1.1 101 Switching\r\n" + b"X: v\r\n" * 101 + b"\r\n", 431),
        (b"HTTP/1.1 101 Switching\r\nX: " + b"v" * 20000 + b"\r\n\r\n", 431),
        (b"HTTP/1.1 101 " + b"S" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_response_parser(data: bytes, status: int | None) -> None:
    if status is None:
        assert ResponseParser().feed(data) is not None
    else:
        assert status_of(lambda: ResponseParser().feed(data)) == status


def test_response_parser_bytewise_matches_whole() -> None:
    data = accept_upgrade(parse(upgrade_raw())).response + b"\x88\x00"
    whole_parser = ResponseParser()
    whole = whole_parser.feed(data)
    parser = ResponseParser()
    response, unfed = feed_chunks(parser, [data[i : i + 1] for i in range(len(data))])
    assert response == whole and response is not None
    assert parser.leftover + unfed == whole_parser.leftover == b"\x88\x00"


# --- interop with the `websockets` library's Sans-I/O client ----------------------------


def websockets_client(*, deflate: bool, subprotocols: list[str] | None) -> ClientProtocol:
    return ClientProtocol(
        parse_uri("ws://broker.example:8765/feed?x=1"),
        origin=Origin("https://app.example"),
        extensions=[ClientPerMessageDeflateFactory()] if deflate else None,
        subprotocols=[Subprotocol(p) for p in subprotocols] if subprotocols else None,
    )


@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize("subprotocols", [None, ["x", "redwire.v1"]])
def test_interop_with_websockets_client(deflate: bool, subprotocols: list[str] | None) -> None:
    client = websockets_client(deflate=deflate, subprotocols=subprotocols)
    client.send_request(client.connect())
    request = parse(b"".join(client.data_to_send()))
    assert (request.path, request.query) == ("/feed", "x=1")
    accepted = accept_upgrade(
        request, allowed_origins=("https://app.example",), subprotocols=["redwire.v1"]
    )
    client.receive_data(accepted.response)
    assert client.handshake_exc is None
    assert client.state is State.OPEN
    assert client.subprotocol == accepted.subprotocol == ("redwire.v1" if subprotocols else None)
    assert [e.name for e in client.extensions] == (["permessage-deflate"] if deflate else [])
    if deflate:  # it accepts client_no_context_takeover unasked and will honour it
        assert client.extensions[0].local_no_context_takeover  # type: ignore[attr-defined]
    assert (accepted.deflate is not None) is deflate


def test_interop_websockets_client_sees_refusal() -> None:
    client = websockets_client(deflate=False, subprotocols=None)
    request = client.connect()
    request.headers = WsHeaders([(k, v) for k, v in request.headers.raw_items() if k != "Origin"])
    request.headers["Origin"] = "https://evil.example"
    client.send_request(request)
    parsed = parse(b"".join(client.data_to_send()))
    with pytest.raises(HandshakeError) as info:
        accept_upgrade(parsed, allowed_origins=("https://app.example",))
    client.receive_data(error_response(info.value))
    assert isinstance(client.handshake_exc, InvalidStatus)
    assert client.handshake_exc.response.status_code == 403
    assert client.state is not State.OPEN
