"""broker/client_address.py: PROXY protocol v1/v2 headers and X-Forwarded-For, table-driven."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from broker.client_address import (
    V2_SIGNATURE,
    TrustedProxies,
    forwarded_client,
    parse_proxy_header,
    starts_like_proxy_header,
)
from broker.errors import HandshakeError

GET = b"GET / HTTP/1.1\r\n"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_tcp4(src: str, dst: str = "10.0.0.2") -> bytes:
    addresses = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    return v2(1, 0x11, addresses + struct.pack("!HH", 40000, 443))


def v2_tcp6(src: str) -> bytes:
    addresses = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address("::1").packed
    return v2(1, 0x21, addresses + struct.pack("!HH", 40000, 443))


@pytest.mark.parametrize(
    "data, source",
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.2 40000 443\r\n", "203.0.113.7"),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n", "2001:db8::7"),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ignored garbage here\r\n", None),
        (v2_tcp4("198.51.100.9"), "198.51.100.9"),
        (v2_tcp6("2001:db8::9"), "2001:db8::9"),
        (v2(0, 0x00, b""), None),  # LOCAL: the balancer's own health check
        (v2(1, 0x00, b""), None),  # AF_UNSPEC
        (v2(1, 0x11, bytes(12) + b"\x00\x04TLVX"), "0.0.0.0"),  # TLVs after addresses
    ],
)
def test_valid_headers(data: bytes, source: str | None) -> None:
    header = parse_proxy_header(data + GET)
    assert header is not None
    assert (header.source, header.length) == (source, len(data))
    assert (data + GET)[header.length :] == GET
    assert starts_like_proxy_header(data)


@pytest.mark.parametrize(
    "data",
    [b"PROXY TCP4 203.0.113.7 10.0.0.2 40000", b"PROX", V2_SIGNATURE[:7], v2_tcp4("1.2.3.4")[:20]],
)
def test_a_header_cut_short_asks_for_more(data: bytes) -> None:
    assert parse_proxy_header(data) is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.2 40000\r\n",  # a port missing
        b"PROXY TCP4 2001:db8::7 10.0.0.2 1 2\r\n",  # family and address disagree
        b"PROXY TCP4 300.0.113.7 10.0.0.2 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.2 1 70000\r\n",
        b"PROXY UDP4 1.2.3.4 10.0.0.2 1 2\r\n",
        b"PROXY TCP4 " + b"1" * 120,  # no CRLF within the spec's 107 bytes
        b"PROXYTCP4\r\n",
        V2_SIGNATURE[:11] + b"X" + bytes(8),
        v2(1, 0x11, bytes(4)),  # IPv4 with too few address bytes
        v2(1, 0x21, bytes(20)),  # IPv6 with too few address bytes
        V2_SIGNATURE + bytes([0x11, 0x11]) + struct.pack("!H", 12) + bytes(12),  # version 1
        V2_SIGNATURE + bytes([0x2F, 0x11]) + struct.pack("!H", 12) + bytes(12),  # command 15
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 60000),  # too long to accept
    ],
)
def test_bad_headers_are_400(data: bytes) -> None:
    with pytest.raises(HandshakeError) as caught:
        parse_proxy_header(data)
    assert caught.value.status == 400


def test_http_does_not_look_like_a_proxy_header() -> None:
    for start in (b"GET / HTTP/1.1\r\n", b"POST /publish", b"\r\n\r\nGET", b"G"):
        assert not starts_like_proxy_header(start)


TRUSTED = TrustedProxies(("10.0.0.0/8", "127.0.0.1", "2001:db8:ffff::/48"))


@pytest.mark.parametrize(
    "values, peer, client",
    [
        (["203.0.113.7"], "10.1.2.3", "203.0.113.7"),
        (["1.1.1.1, 203.0.113.7"], "10.1.2.3", "203.0.113.7"),  # the client wrote 1.1.1.1
        (["203.0.113.7, 10.9.9.9"], "10.1.2.3", "203.0.113.7"),  # two proxies of ours
        (["203.0.113.7", "10.9.9.9"], "10.1.2.3", "203.0.113.7"),  # as separate headers
        (["10.9.9.9, 10.8.8.8"], "10.1.2.3", "10.9.9.9"),  # all trusted: the leftmost
        (["garbage, 203.0.113.7"], "10.1.2.3", "203.0.113.7"),
        (["203.0.113.7, garbage"], "10.1.2.3", "10.1.2.3"),  # a bad hop: trust nothing left
        (["203.0.113.7:5555"], "10.1.2.3", "10.1.2.3"),  # a port: not an address
        (["::ffff:203.0.113.7"], "10.1.2.3", "203.0.113.7"),
        (["2001:db8::5"], "2001:db8:ffff::1", "2001:db8::5"),
    ],
)
def test_forwarded_for(values: list[str], peer: str, client: str) -> None:
    assert forwarded_client(values, peer, TRUSTED) == client


def test_trust() -> None:
    assert TRUSTED.contains("10.200.0.1")
    assert TRUSTED.contains("::ffff:10.0.0.1")
    assert TRUSTED.contains("127.0.0.1")
    assert not TRUSTED.contains("127.0.0.2")
    assert not TRUSTED.contains("local")
    assert not TrustedProxies(())
