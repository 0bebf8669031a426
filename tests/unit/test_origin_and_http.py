"""The worker's HTTP phase against hostile input: Origin and Host policies, request paths.

Each case runs a real `worker.protocol.WebSocket` (the broker app on a `MemoryBus`, or the
echo app) over `socket.socketpair()`: the test writes one raw request and reads the whole
answer until the server closes. No port, no subprocess. The pure policies
(`origin_allowed`, `host_allowed`) are table-tested in tests/unit/test_handshake.py and here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.bus.memory import MemoryBus
from broker.errors import ConfigError
from broker.handshake import ResponseParser, host_allowed
from broker.settings import Settings
from worker.broker_app import BrokerApp
from worker.echo import EchoApp
from worker.http_routes import decode_path
from worker.protocol import WebSocket

WAIT_S = 3.0
HOST = "broker.example:8765"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
SETTINGS = Settings(redis_url="memory://", ping_interval_s=None, handshake_timeout_s=5.0)


def upgrade(origin: str | None = None, host: str | None = HOST) -> bytes:
    lines = ["GET /ws HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def get(path: str, host: str | None = HOST, version: str = "1.1") -> bytes:
    host_line = f"Host: {host}\r\n" if host is not None else ""
    return f"GET {path} HTTP/{version}\r\n{host_line}\r\n".encode("latin-1")


@contextlib.asynccontextmanager
async def broker(settings: Settings = SETTINGS) -> AsyncIterator[BrokerApp]:
    app = BrokerApp(settings, worker_id="w1", bus=MemoryBus("w1"))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def exchange(
    app: object, settings: Settings, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send `request` on a fresh connection; (status, lower-cased headers, body) of the answer.

    A 101 is answered and then the connection is closed by us; anything else the server
    closes after its response."""
    server_sock, client_sock = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(
        lambda: WebSocket(app, settings),
        server_sock,  # type: ignore[arg-type]
    )
    reader, writer = await asyncio.open_connection(sock=client_sock)
    try:
        writer.write(request)
        parser = ResponseParser()
        async with asyncio.timeout(WAIT_S):
            response = None
            while response is None:
                data = await reader.read(65536)
                assert data, "closed before a complete response head"
                response = parser.feed(data)
            body = parser.leftover
            if response.status != 101:
                body += await reader.read()  # to EOF: the server closes after a response
        headers = {name.lower(): value for name, value in response.headers}
        return response.status, headers, body
    finally:
        writer.close()
        transport.abort()


# --- Origin, end to end ----------------------------------------------------------------------

ORIGIN_ROWS = [
    # (allowed_origins, Origin, status)
    ((), None, 101),
    ((), "http://broker.example:8765", 101),
    ((), "https://broker.example:8765", 101),
    ((), "http://evil.example", 403),
    ((), "http://evil.example:8765", 403),
    ((), "null", 403),
    (("https://app.example",), "https://app.example", 101),
    (("https://app.example",), "https://other.example", 403),
    (("*",), "http://evil.example", 101),
    (("*",), "null", 101),
]


@pytest.mark.parametrize(("allowed", "origin", "status"), ORIGIN_ROWS)
async def test_origin_on_the_broker(
    allowed: tuple[str, ...], origin: str | None, status: int
) -> None:
    settings = SETTINGS.replace(allowed_origins=allowed)
    async with broker(settings) as app:
        got, headers, _ = await exchange(app, settings, upgrade(origin))
    assert got == status
    if status == 403:
        assert headers["connection"] == "close"
        assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(("origin", "status"), [(None, 101), ("http://evil.example", 403)])
async def test_origin_on_the_echo_server(origin: str | None, status: int) -> None:
    got, _, _ = await exchange(EchoApp(), SETTINGS, upgrade(origin))
    assert got == status


# --- Host ------------------------------------------------------------------------------------

HOST_ROWS = [
    # (allowed_hosts, Host, allowed?)
    ((), "anything.example", True),
    ((), None, True),
    (("broker.example",), "broker.example", True),
    (("broker.example",), "broker.example:8765", True),  # a bare name: any port
    (("broker.example",), "BROKER.Example:8765", True),
    (("broker.example",), "evil.example:8765", False),
    (("broker.example",), "broker.example.evil", False),
    (("broker.example",), "sub.broker.example", False),
    (("broker.example",), None, False),
    (("broker.example",), "", False),
    (("broker.example",), "broker.example:x", False),
    (("broker.example:8765",), "broker.example:8765", True),
    (("broker.example:8765",), "broker.example:8766", False),
    (("broker.example:8765",), "broker.example", False),
    ((".example.com",), "example.com", True),
    ((".example.com",), "a.b.example.com:1", True),
    ((".example.com",), "badexample.com", False),
    (("[::1]",), "[::1]:8765", True),
    (("127.0.0.1", "localhost"), "localhost:8765", True),
]


@pytest.mark.parametrize(("allowed", "host", "ok"), HOST_ROWS)
def test_host_allowed(allowed: tuple[str, ...], host: str | None, ok: bool) -> None:
    Settings(allowed_hosts=allowed)  # every entry is a valid setting
    assert host_allowed(host, allowed) is ok


@pytest.mark.parametrize("upgrading", [False, True])
@pytest.mark.parametrize(("host", "status"), [(HOST, None), ("evil.example", 421), (None, 421)])
async def test_host_checked_on_http_and_upgrades(
    upgrading: bool, host: str | None, status: int | None
) -> None:
    settings = SETTINGS.replace(allowed_hosts=("broker.example",))
    request = upgrade(host=host) if upgrading else get("/healthz", host, version="1.0")
    async with broker(settings) as app:
        got, headers, _ = await exchange(app, settings, request)
    assert got == (status or (101 if upgrading else 200))
    assert headers.get("x-content-type-options") == (None if got == 101 else "nosniff")


@pytest.mark.parametrize("entry", ["http://a.example", "a.example/", "a b", "", "a.example:x"])
def test_bad_host_entries_are_refused(entry: str) -> None:
    with pytest.raises(ConfigError, match="allowed_hosts"):
        Settings(allowed_hosts=(entry,))


# --- request paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "decoded"),
    [
        ("/", "/"),
        ("/a%20b.txt", "/a b.txt"),
        ("/%C3%A9t%C3%A9", "/\u00e9t\u00e9"),
        ("/..%2F..%2Fetc", "/../../etc"),
        ("/%00", None),
        ("/a%00b.txt", None),
        ("/%0a", None),
        ("/%7F", None),
        ("/%ff", None),
        ("/%C3", None),  # a truncated UTF-8 sequence
        ("/%ed%a0%80", None),  # a UTF-16 surrogate
        ("/%zz", None),
        ("/%", None),
        ("/%4", None),
    ],
)
def test_decode_path(path: str, decoded: str | None) -> None:
    assert decode_path(path) == decoded


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text("<h1>app</h1>")
    (root / "a b.txt").write_text("spaced")
    (tmp_path / "secret.txt").write_text("SECRET-OUTSIDE-7f3")
    (root / "escape.txt").symlink_to(tmp_path / "secret.txt")
    return root


PATH_ROWS = [
    ("/", 200),
    ("/index.html", 200),
    ("/a%20b.txt", 200),
    ("/%00", 400),
    ("/%00/../index.html", 400),
    ("/index.html%00.txt", 400),
    ("/%ff", 400),
    ("/%c0%ae%c0%ae/secret.txt", 400),  # overlong UTF-8 dots
    ("/%zz", 400),
    ("/../secret.txt", 404),
    ("/..%2fsecret.txt", 404),
    ("/%2e%2e/secret.txt", 404),
    ("/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404),
    ("//etc/passwd", 404),
    ("/escape.txt", 404),  # a symlink out of the directory
    ("/missing.txt", 404),
    ("/" + "a" * 300, 404),  # a name longer than the file system allows
    ("/redwire.js", 200),
]


@pytest.mark.parametrize(("path", "status"), PATH_ROWS)
async def test_static_paths(
    site: Path, path: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    settings = SETTINGS.replace(static_dir=str(site))
    caplog.set_level(logging.WARNING)
    async with broker(settings) as app:
        got, headers, body = await exchange(app, settings, get(path))
    assert got == status, body
    assert headers["x-content-type-options"] == "nosniff"
    assert b"SECRET-OUTSIDE" not in body and b"Traceback" not in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("path", ["/%00", "/%ff", "/healthz", "/nothing", "/"])
async def test_paths_without_static_dir(path: str) -> None:
    async with broker() as app:
        got, headers, _ = await exchange(app, SETTINGS, get(path))
    assert got == {"/%00": 400, "/%ff": 400, "/nothing": 404}.get(path, 200)
    assert headers["x-content-type-options"] == "nosniff"


async def test_head_and_405_say_nosniff() -> None:
    async with broker() as app:
        for request, status in [
            (b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n", 200),
            (b"PUT / HTTP/1.1\r\nHost: h\r\n\r\n", 405),
            (b"GET /publish HTTP/1.1\r\nHost: h\r\n\r\n", 405),
            (b"GET / HTTP/1.1\nHost: h\n\n", 400),
        ]:
            got, headers, _ = await exchange(app, SETTINGS, request)
            assert (got, headers["x-content-type-options"]) == (status, "nosniff")
