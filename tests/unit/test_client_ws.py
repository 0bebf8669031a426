"""client.ws: our asyncio WebSocket client, against `redwire echo` and against bad servers.

The echo server is a subprocess (the session's `echo_server` fixture); the failure cases use
servers made here: a closed port, a plain HTTP server (`http.server` on a thread) and a
listening socket that never answers.
"""

from __future__ import annotations

import asyncio
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
from support.processes import ServerProcess

from broker import errors
from broker.errors import ConnectionClosedError, HandshakeError
from client.ws import WebSocketClient, connect

WAIT_S = 5.0


async def open_echo(echo_server: ServerProcess, **kwargs) -> WebSocketClient:
    return await connect(echo_server.url + "/", open_timeout_s=WAIT_S, **kwargs)


async def test_send_and_receive_text_and_binary(echo_server: ServerProcess) -> None:
    ws = await open_echo(echo_server)
    try:
        await ws.send("héllo")
        assert await ws.recv(WAIT_S) == "héllo"
        await ws.send(b"\x00\xffbinary")
        assert await ws.recv(WAIT_S) == b"\x00\xffbinary"
        big = "x" * 200_000 + "é"
        await ws.send(big)
        assert await ws.recv(WAIT_S) == big
        await ws.send("")
        assert await ws.recv(WAIT_S) == ""
        assert ws.open
    finally:
        await ws.close()


async def test_messages_arrive_in_order(echo_server: ServerProcess) -> None:
    async with await open_echo(echo_server) as ws:
        for i in range(50):
            await ws.send(f"m{i}" * (i + 1))
        for i in range(50):
            assert await ws.recv(WAIT_S) == f"m{i}" * (i + 1)


async def test_small_receive_queue_pauses_and_resumes_reading(
    echo_server: ServerProcess,
) -> None:
    async with await open_echo(echo_server, max_queue=2) as ws:
        for i in range(40):
            await ws.send(f"{i}" * 1000)
        for i in range(40):
            assert await ws.recv(WAIT_S) == f"{i}" * 1000


async def test_compression_negotiated_by_default(echo_server: ServerProcess) -> None:
    async with await open_echo(echo_server) as ws:
        assert ws.conn.deflate is not None
        text = '{"op":"message","topic":"t","data":"compressible"}' * 50
        await ws.send(text)
        assert await ws.recv(WAIT_S) == text


async def test_compression_off(echo_server: ServerProcess) -> None:
    async with await open_echo(echo_server, compression=False) as ws:
        assert ws.conn.deflate is None
        await ws.send("plain " * 100)
        assert await ws.recv(WAIT_S) == "plain " * 100


async def test_ping_waits_for_its_pong(echo_server: ServerProcess) -> None:
    async with await open_echo(echo_server) as ws:
        await ws.ping(timeout_s=WAIT_S)
        await ws.ping(b"payload", timeout_s=WAIT_S)
        assert ws.open


async def test_close_with_code(echo_server: ServerProcess) -> None:
    ws = await open_echo(echo_server)
    await ws.close(3007, "bye")
    assert ws.close_code == 3007  # the server echoes our code (RFC 6455 section 5.5.1)
    assert not ws.open
    with pytest.raises(ConnectionClosedError) as info:
        await ws.recv(WAIT_S)
    assert info.value.code == 3007
    with pytest.raises(ConnectionClosedError):
        await ws.send("late")
    with pytest.raises(ConnectionClosedError):
        await ws.ping(timeout_s=WAIT_S)
    await ws.close()  # closing twice is harmless


async def test_recv_after_close_raises(echo_server: ServerProcess) -> None:
    ws = await open_echo(echo_server)
    await ws.close()
    assert ws.close_code == errors.CLOSE_NORMAL
    with pytest.raises(ConnectionClosedError) as info:
        await ws.recv(WAIT_S)
    assert info.value.code == errors.CLOSE_NORMAL


async def test_async_iteration_ends_at_close(echo_server: ServerProcess) -> None:
    ws = await open_echo(echo_server)
    for i in range(3):
        await ws.send(str(i))
    received = []
    async with asyncio.timeout(WAIT_S):
        async for message in ws:
            received.append(message)
            if len(received) == 3:
                await ws.close(1000)
    assert received == ["0", "1", "2"]
    assert ws.close_code == 1000


async def test_async_iteration_ends_when_closed_by_another_task(
    echo_server: ServerProcess,
) -> None:
    ws = await open_echo(echo_server)
    received: list[str | bytes] = []
    got_two = asyncio.Event()

    async def reader() -> None:
        async for message in ws:
            received.append(message)
            if len(received) == 2:
                got_two.set()

    task = asyncio.create_task(reader())
    await ws.send("one")
    await ws.send("two")
    async with asyncio.timeout(WAIT_S):
        await got_two.wait()
        await ws.close()
        await task  # the iteration ended by itself
    assert received == ["one", "two"]


async def test_connect_to_closed_port_raises_os_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        started = time.monotonic()
        with pytest.raises(OSError):
            await connect(f"ws://127.0.0.1:{port}/", open_timeout_s=WAIT_S)
        assert time.monotonic() - started < 1.0


class _PlainHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<h1>not a websocket</h1>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def plain_http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PlainHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT_S)


async def test_connect_to_plain_http_server_raises_handshake_error(
    plain_http_server: int,
) -> None:
    with pytest.raises(HandshakeError) as info:
        await connect(f"ws://127.0.0.1:{plain_http_server}/", open_timeout_s=WAIT_S)
    assert info.value.status == 200


async def test_connect_refused_by_our_server_raises_handshake_error(
    echo_server: ServerProcess,
) -> None:
    # A second Sec-WebSocket-Version makes the version "13, 8": refused with 426.
    with pytest.raises(HandshakeError) as info:
        await connect(
            echo_server.url + "/",
            open_timeout_s=WAIT_S,
            extra_headers=[("Sec-WebSocket-Version", "8")],
        )
    assert info.value.status == 426


async def test_open_timeout_against_a_server_that_never_answers() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)  # the kernel accepts; nobody ever reads or writes
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await connect(f"ws://127.0.0.1:{port}/", open_timeout_s=0.3)
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 2.0


async def test_only_ws_and_wss_urls() -> None:
    with pytest.raises(ValueError, match="ws:// or wss://"):
        await connect("http://127.0.0.1:1/")
    with pytest.raises(ValueError, match="use wss://"):
        await connect("ws://127.0.0.1:1/", ssl=ssl.create_default_context())


async def test_send_nowait_writes_at_once_and_raises_once_closed(
    echo_server: ServerProcess,
) -> None:
    ws = await open_echo(echo_server)
    for i in range(5):
        ws.send_nowait(f"n{i}")  # written before the call returns: no await in between
    await ws.drain()
    assert [await ws.recv(WAIT_S) for _ in range(5)] == [f"n{i}" for i in range(5)]
    await ws.close()
    with pytest.raises(ConnectionClosedError):
        ws.send_nowait("too late")
