"""What a broker behind a load balancer needs: the client's real address, and /metrics apart.

Real `redwire serve` processes and a real Redis; the "load balancer" is this test writing
what HAProxy writes (a PROXY v1/v2 header, or X-Forwarded-For) on a raw socket from
127.0.0.1, the trusted proxy. Per-IP caps must count the addresses those name, and refuse
them from anybody not trusted.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest
from support.processes import ServerProcess, free_port, serve

from broker.client_address import V2_SIGNATURE

UPGRADE = (
    "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def status_of(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


def open_raw(port: int, prefix: bytes = b"", extra: str = "") -> tuple[socket.socket, int]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(prefix + UPGRADE.format(extra=extra).encode())
    return sock, status_of(sock)


def v1(source: str) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 40000 8765\r\n".encode()


def v2(source: str) -> bytes:
    body = ipaddress.IPv4Address(source).packed + bytes([127, 0, 0, 1]) + struct.pack("!HH", 1, 2)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


@pytest.fixture(scope="module")
def behind_haproxy(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        workers=1,
        args=("--trusted-proxy", "127.0.0.0/8", "--proxy-protocol"),
        env={"REDWIRE_MAX_CONNECTIONS_PER_IP": "2", "REDWIRE_CHANNEL_PREFIX": "lb1:"},
    )
    yield server
    server.stop()


@pytest.mark.parametrize("header", [v1, v2], ids=["v1", "v2"])
def test_per_ip_caps_count_the_address_the_proxy_header_names(
    behind_haproxy: ServerProcess, header
) -> None:
    port = behind_haproxy.port
    base = "198.51.100." if header is v1 else "203.0.113."
    opened = []
    try:
        for _ in range(2):
            sock, status = open_raw(port, header(base + "1"))
            opened.append(sock)
            assert status == 101
        sock, status = open_raw(port, header(base + "1"))
        opened.append(sock)
        assert status == 429  # the third from that client: over max_connections_per_ip
        sock, status = open_raw(port, header(base + "2"))
        opened.append(sock)
        assert status == 101  # another client behind the same balancer is not affected
    finally:
        for sock in opened:
            sock.close()


def test_a_local_header_keeps_the_balancers_address(behind_haproxy: ServerProcess) -> None:
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    with socket.create_connection(("127.0.0.1", behind_haproxy.port), timeout=15) as sock:
        sock.sendall(local + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status_of(sock) == 200


@pytest.mark.parametrize(
    "prefix", [b"", b"PROXY TCP4 nonsense\r\n", b"PROXY " + b"9" * 200], ids=["none", "bad", "long"]
)
def test_a_trusted_peer_without_a_valid_header_is_refused(
    behind_haproxy: ServerProcess, prefix: bytes
) -> None:
    sock, status = open_raw(behind_haproxy.port, prefix)
    sock.close()
    assert status == 400


@pytest.fixture(scope="module")
def behind_http_proxy(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        workers=1,
        args=("--trusted-proxy", "127.0.0.1"),
        env={"REDWIRE_MAX_CONNECTIONS_PER_IP": "1", "REDWIRE_CHANNEL_PREFIX": "lb2:"},
    )
    yield server
    server.stop()


def test_per_ip_caps_count_the_forwarded_for_client(behind_http_proxy: ServerProcess) -> None:
    port = behind_http_proxy.port
    opened = []
    try:
        sock, status = open_raw(port, extra="X-Forwarded-For: 1.1.1.1, 192.0.2.10\r\n")
        opened.append(sock)
        assert status == 101
        sock, status = open_raw(port, extra="X-Forwarded-For: 6.6.6.6, 192.0.2.10\r\n")
        opened.append(sock)
        assert status == 429  # the same client: what it wrote left of it proves nothing
        sock, status = open_raw(port, extra="X-Forwarded-For: 192.0.2.11\r\n")
        opened.append(sock)
        assert status == 101
    finally:
        for sock in opened:
            sock.close()


def test_a_proxy_header_from_an_untrusted_peer_is_refused(redis_server) -> None:
    server = serve(
        redis_server.url,
        workers=1,
        args=("--trusted-proxy", "10.0.0.0/8", "--proxy-protocol"),
        env={"REDWIRE_CHANNEL_PREFIX": "lb3:"},
    )
    try:
        sock, status = open_raw(server.port, v1("198.51.100.1"))
        sock.close()
        assert status == 400  # 127.0.0.1 is not a trusted proxy: it may not name a client
        sock, status = open_raw(server.port)
        sock.close()
        assert status == 101  # a direct client without a header is served as itself
    finally:
        server.stop()


def test_metrics_on_their_own_address(redis_server) -> None:
    metrics_port = free_port()
    server = serve(
        redis_server.url,
        workers=2,
        args=("--metrics-listen", f"127.0.0.1:{metrics_port}"),
        env={"REDWIRE_CHANNEL_PREFIX": "lb4:"},
    )

    def get(port: int, path: str) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    try:
        assert get(server.port, "/metrics").startswith(b"HTTP/1.1 404")
        assert get(server.port, "/healthz").startswith(b"HTTP/1.1 200")
        scraped = get(metrics_port, "/metrics")
        assert scraped.startswith(b"HTTP/1.1 200")
        assert b'redwire_connections{worker="0"}' in scraped
        assert b'redwire_connections{worker="1"}' in scraped  # every worker, from either one
        assert get(metrics_port, "/healthz").startswith(b"HTTP/1.1 200")
        assert get(metrics_port, "/").startswith(b"HTTP/1.1 404")
        sock, status = open_raw(metrics_port)
        sock.close()
        assert status == 404  # no WebSocket on the metrics address
    finally:
        server.stop()


def test_a_taken_metrics_address_fails_the_start(redis_server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="metrics_listen"):
            serve(redis_server.url, workers=1, args=("--metrics-listen", f"127.0.0.1:{port}"))
