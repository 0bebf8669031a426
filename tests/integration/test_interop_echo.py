"""`redwire echo` against independent WebSocket clients: websockets, aiohttp, Node's ws."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

NODE_DIR = Path(__file__).resolve().parents[1] / "interop" / "node"
SIZES = [0, 125, 126, 65535, 65536]
MIB = 1024 * 1024


@pytest.fixture(params=["deflate", "plain"])
def compression(request: pytest.FixtureRequest) -> str | None:
    return "deflate" if request.param == "deflate" else None


async def test_websockets_messages_of_every_length_form(echo_server, compression) -> None:
    async with websockets.connect(echo_server.url, compression=compression, max_size=None) as ws:
        if compression:
            assert ws.protocol.extensions, "permessage-deflate was not negotiated"
        for size in SIZES:
            text = "é" * (size // 2) + "x" * (size % 2)
            await ws.send(text)
            assert await ws.recv() == text
            data = bytes(range(256)) * (size // 256) + bytes(size % 256)
            await ws.send(data)
            assert await ws.recv() == data


async def test_websockets_fragmented_message(echo_server, compression) -> None:
    async with websockets.connect(echo_server.url, compression=compression) as ws:
        await ws.send(iter(["one ", "two ", "three"]))
        assert await ws.recv() == "one two three"
        await ws.send(iter([b"\x00" * 1000, b"\x01" * 70000]))
        assert await ws.recv() == b"\x00" * 1000 + b"\x01" * 70000


async def test_websockets_ping_gets_pong(echo_server) -> None:
    async with websockets.connect(echo_server.url) as ws:
        waiter = await ws.ping(b"payload")
        latency = await asyncio.wait_for(waiter, 5)
        assert latency >= 0


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
async def test_websockets_close_code_is_echoed(echo_server, code: int) -> None:
    ws = await websockets.connect(echo_server.url)
    await ws.close(code, "done")
    assert ws.protocol.close_rcvd is not None
    assert ws.protocol.close_rcvd.code == code


async def test_websockets_over_limit_is_closed_1009(echo_server, compression) -> None:
    ws = await websockets.connect(echo_server.url, compression=compression, max_size=None)
    with pytest.raises(ConnectionClosed) as info:
        await ws.send(b"\x01" * (8 * MIB))
        await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1009
    # Wait for the TCP connection to end rather than calling close() on a connection the
    # server already failed (websockets' close() can trip over its half-closed transport).
    await asyncio.wait_for(ws.wait_closed(), 10)


@pytest.mark.parametrize("compress", [15, 0])
async def test_aiohttp_client(echo_server, compress: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(echo_server.url, compress=compress, max_msg_size=0) as ws:
            for size in SIZES:
                await ws.send_str("t" * size)
                msg = await ws.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.TEXT and msg.data == "t" * size
                await ws.send_bytes(b"b" * size)
                msg = await ws.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == b"b" * size
            await ws.ping(b"x")
            await ws.send_str("after ping")
            msg = await ws.receive(timeout=5)
            assert msg.data == "after ping"
            await ws.close(code=4000, message=b"bye")
            assert ws.close_code == 4000


async def test_aiohttp_over_limit(echo_server) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(echo_server.url, compress=0) as ws:
            await ws.send_bytes(b"z" * (8 * MIB))
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert msg.data == 1009


@pytest.mark.parametrize("mode", ["deflate", "plain"])
def test_node_ws_client(echo_server, mode: str) -> None:
    node = shutil.which("node")
    assert node, "node is required for the interop tests (.ci/run installs it)"
    assert (NODE_DIR / "node_modules" / "ws").is_dir(), "run npm install in tests/interop/node"
    out = subprocess.run(
        [node, str(NODE_DIR / "echo_cases.mjs"), echo_server.url, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    results = json.loads(out.stdout.strip().splitlines()[-1])
    if mode == "deflate":
        assert "permessage-deflate" in results["extensions"]
    else:
        assert results["extensions"] in ("", {})
    for size in SIZES:
        assert results[f"text_{size}"] is True
        assert results[f"binary_{size}"] is True
    assert results["fragmented"] is True
    assert results["ping"] is True
    assert results["close_code"] == 4321
    assert results["too_big_code"] == 1009
