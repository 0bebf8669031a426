"""Who the client is behind a load balancer: the PROXY protocol header and X-Forwarded-For.

Sans-I/O: bytes and header values in, an address out. The worker (worker/protocol.py) uses
the result as the connection's client address: the one per-IP caps count, and the one the
application hooks and logs see.

Trust. Only a connection whose TCP peer is in `trusted_proxies` (addresses or CIDR
networks) may name another address; from anybody else a PROXY header is refused (400) and
X-Forwarded-For is ignored, since any client can write either.
- `proxy_protocol` on: a trusted peer's connection must start with a PROXY protocol header
  (HAProxy's spec, version 1 text or version 2 binary); the header's source address is the
  client's. A `LOCAL` (v2) or `UNKNOWN` (v1) header, which a load balancer's own health
  check sends, leaves the peer's address. A header that is malformed, longer than
  `MAX_HEADER_BYTES`, or not complete within the handshake timeout ends the connection.
- `proxy_protocol` off: the client is the rightmost X-Forwarded-For entry that is not a
  trusted proxy (each proxy appends the address it got the request from, so entries left of
  the first untrusted one were written by the client itself and prove nothing).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Final

from broker.errors import HandshakeError

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX_BYTES: Final = 107  # the spec's bound, CRLF included
MAX_HEADER_BYTES: Final = 16 + 1024  # v2: 16 fixed bytes + addresses and TLVs we accept

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header: the client's address, or None (LOCAL / UNKNOWN: keep the
    peer's), and how many bytes of the stream it took."""

    source: str | None
    length: int


class TrustedProxies:
    """The `trusted_proxies` networks; `contains(ip)` for an address string."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in entries
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, ip: str) -> bool:
        address = _address(ip)
        if address is None:
            return False
        return any(address in network for network in self.networks)


@functools.lru_cache(maxsize=4096)
def _address(ip: str) -> _Address | None:
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 for a dual-stack listener
    return address


def starts_like_proxy_header(data: bytes) -> bool:
    """Whether `data` (the first bytes of a connection, at least one) begins a PROXY header
    (no HTTP request starts with "PROXY " or with the v2 signature)."""
    return data.startswith(V1_PREFIX) or (len(data) >= 4 and V2_SIGNATURE.startswith(data[:12]))


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of `data`, or None when more bytes are needed.
    HandshakeError 400 when `data` does not start with a valid one."""
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data:
        raise HandshakeError(400, "PROXY protocol header expected")
    return None


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        started = data.startswith(V1_PREFIX) or V1_PREFIX.startswith(data)
        if len(data) >= V1_MAX_BYTES or not started:
            raise HandshakeError(400, "bad PROXY protocol v1 header")
        return None
    fields = data[:end].split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise HandshakeError(400, "bad PROXY protocol v1 header")
    family = fields[1]
    if family == b"UNKNOWN":
        return ProxyHeader(None, end + 2)
    if family not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise HandshakeError(400, "bad PROXY protocol v1 header")
    try:
        source = ipaddress.ip_address(fields[2].decode("ascii"))
        ipaddress.ip_address(fields[3].decode("ascii"))
        ports = [int(p) for p in fields[4:6]]
    except (UnicodeDecodeError, ValueError):
        raise HandshakeError(400, "bad PROXY protocol v1 header") from None
    version = 4 if family == b"TCP4" else 6
    if source.version != version or not all(0 <= p <= 65535 for p in ports):
        raise HandshakeError(400, "bad PROXY protocol v1 header")
    return ProxyHeader(str(source), end + 2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise HandshakeError(400, "bad PROXY protocol v2 header")
        return None
    if data[:12] != V2_SIGNATURE:
        raise HandshakeError(400, "bad PROXY protocol v2 header")
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    length = int.from_bytes(data[14:16], "big")
    if version != 2 or command > 1:
        raise HandshakeError(400, "bad PROXY protocol v2 header (version or command)")
    if 16 + length > MAX_HEADER_BYTES:
        raise HandshakeError(400, "PROXY protocol v2 header too long")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if command == 0:  # LOCAL: the proxy's own connection (a health check)
        return ProxyHeader(None, total)
    body = data[16:total]
    if family == 1 and transport in (1, 2):  # AF_INET, STREAM or DGRAM
        if length < 12:
            raise HandshakeError(400, "bad PROXY protocol v2 header (IPv4 addresses)")
        return ProxyHeader(str(ipaddress.IPv4Address(body[:4])), total)
    if family == 2 and transport in (1, 2):  # AF_INET6
        if length < 36:
            raise HandshakeError(400, "bad PROXY protocol v2 header (IPv6 addresses)")
        return ProxyHeader(str(ipaddress.IPv6Address(body[:16])), total)
    return ProxyHeader(None, total)  # AF_UNSPEC or AF_UNIX: no address to use


def forwarded_client(values: list[str], peer: str, trusted: TrustedProxies) -> str:
    """The client address X-Forwarded-For names, given the header's values in order and a
    trusted peer: the rightmost entry that is not a trusted proxy; the peer when there is
    no usable entry (none at all, or a malformed one where the walk stops)."""
    entries = [e.strip() for value in values for e in value.split(",")]
    client = peer
    for entry in reversed(entries):
        if _address(entry) is None:
            break  # garbage (or a port, or "unknown"): nothing left of it is trustworthy
        client = str(_address(entry))
        if not trusted.contains(entry):
            break
    return client


@functools.lru_cache(maxsize=8)
def trusted_proxies(entries: tuple[str, ...]) -> TrustedProxies:
    """The TrustedProxies of a `trusted_proxies` setting (made once per distinct value)."""
    return TrustedProxies(entries)
