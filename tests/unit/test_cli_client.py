"""client.cli (`redwire publish` / `redwire subscribe`) against a scripted server.

The server is the `websockets` library in process on a loopback port; each test plays the
broker's side frame by frame. The commands run in process (`client.cli.publish/subscribe`)
with a StringIO for stdout; every wait has a deadline, nothing sleeps to synchronise.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from broker.cli import build_parser
from client import cli as client_cli
from client.subscriber import Gap, Message

WAIT_S = 5.0
Script = Callable[[ServerConnection], Awaitable[None]]


class Broker:
    """A loopback WebSocket server that runs `script` on each connection."""

    def __init__(self) -> None:
        self.script: Script | None = None
        self.url = ""
        self.requests: list[dict[str, Any]] = []

    async def handler(self, ws: ServerConnection) -> None:
        await send(ws, {"op": "welcome", "version": 1, "client": "0-1", "worker": "0"})
        assert self.script is not None
        await self.script(ws)

    async def request(self, ws: ServerConnection, op: str) -> dict[str, Any]:
        while True:
            async with asyncio.timeout(WAIT_S):
                frame = json.loads(await ws.recv())
            self.requests.append(frame)
            if frame["op"] == "ping":
                await send(ws, {"op": "pong", "id": frame.get("id")})
                continue
            assert frame["op"] == op, frame
            return frame


async def send(ws: ServerConnection, frame: dict[str, Any]) -> None:
    await ws.send(json.dumps(frame))


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    fake = Broker()
    async with serve(fake.handler, "127.0.0.1", 0, subprotocols=["redwire.json"]) as srv:
        fake.url = f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/"
        yield fake


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


async def run(command: Callable[..., Awaitable[int]], ns: argparse.Namespace) -> tuple[int, str]:
    out = io.StringIO()
    async with asyncio.timeout(WAIT_S):
        code = await command(ns, out)
    return code, out.getvalue()


# --- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "data"),
    [('{"a": 1}', {"a": 1}), ("[1, 2]", [1, 2]), ("3", 3), ('"q"', "q"), ("hello", "hello")],
)
def test_data_is_json_or_else_a_string(text: str, data: Any) -> None:
    assert client_cli.parse_data(text) == data


def test_since_is_offset_colon_epoch() -> None:
    assert client_cli.parse_since("12:abc") == (12, "abc")
    assert client_cli.parse_since("0:a:b") == (0, "a:b")
    for bad in ("12", "x:abc", "-1:abc", "3:"):
        with pytest.raises(client_cli.UsageError):
            client_cli.parse_since(bad)


def test_lines() -> None:
    line = client_cli.message_line(Message("t", {"b": b"\x00\x01"}, 4, "e"))
    assert json.loads(line) == {"topic": "t", "offset": 4, "epoch": "e", "data": {"b": "AAE="}}
    assert json.loads(client_cli.message_line(Message("t", "x"))) == {
        "topic": "t",
        "offset": None,
        "epoch": None,
        "data": "x",
    }
    gap = json.loads(client_cli.gap_line("t", Gap(frozenset({"t"}), "lost")))
    assert gap == {"gap": {"topic": "t", "reason": "lost"}}


# --- publish ---------------------------------------------------------------------------------


async def test_publish_prints_the_ack(broker: Broker) -> None:
    async def script(ws: ServerConnection) -> None:
        req = await broker.request(ws, "publish")
        await send(ws, {"op": "ack", "id": req["id"], "offset": 7, "epoch": "e1"})
        await ws.wait_closed()

    broker.script = script
    code, out = await run(
        client_cli.publish, args("publish", "t", '{"n": 1}', "--key", "k1", "--url", broker.url)
    )
    assert code == 0
    assert json.loads(out) == {"offset": 7, "epoch": "e1"}
    sent = broker.requests[0]
    assert (sent["topic"], sent["data"], sent["key"]) == ("t", {"n": 1}, "k1")


async def test_a_refused_publish_exits_1_with_code_and_reason(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    async def script(ws: ServerConnection) -> None:
        req = await broker.request(ws, "publish")
        await send(ws, {"op": "error", "id": req["id"], "code": "forbidden", "reason": "not yours"})
        await ws.wait_closed()

    broker.script = script
    code, out = await run(client_cli.publish, args("publish", "t", "hi", "--url", broker.url))
    assert (code, out) == (1, "")
    assert "publish failed: forbidden: not yours" in capsys.readouterr().err
    assert broker.requests[0]["data"] == "hi"


async def test_no_broker_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = await run(client_cli.publish, args("publish", "t", "1", "--url", "ws://127.0.0.1:1/"))
    assert code == 1
    assert "cannot connect" in capsys.readouterr().err


# --- subscribe -------------------------------------------------------------------------------


async def test_subscribe_prints_messages_and_gaps_of_every_topic(broker: Broker) -> None:
    async def script(ws: ServerConnection) -> None:
        for _ in range(2):
            req = await broker.request(ws, "subscribe")
            ack = {"op": "ack", "id": req["id"], "offset": 2, "epoch": "e", "recovered": True}
            await send(ws, ack)
        await send(ws, {"op": "message", "topic": "a", "data": 1, "offset": 3, "epoch": "e"})
        await send(ws, {"op": "gap", "topic": "a", "epoch": "e", "from": 4, "to": 5})
        await send(ws, {"op": "message", "topic": "b", "data": {"x": 2}, "offset": 3, "epoch": "e"})
        await send(ws, {"op": "message", "topic": "a", "data": 6, "offset": 6, "epoch": "e"})
        await ws.wait_closed()

    broker.script = script
    ns = args("subscribe", "a", "b", "--since", "2:e", "--count", "3", "--url", broker.url)
    code, out = await run(client_cli.subscribe, ns)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    of_a = [line for line in lines if line.get("topic") == "a" or "gap" in line]
    assert of_a[0] == {"topic": "a", "offset": 3, "epoch": "e", "data": 1}  # in order per topic
    assert of_a[1]["gap"]["topic"] == "a" and "4..5" in of_a[1]["gap"]["reason"]
    assert of_a[2] == {"topic": "a", "offset": 6, "epoch": "e", "data": 6}
    assert {"topic": "b", "offset": 3, "epoch": "e", "data": {"x": 2}} in lines
    assert len(lines) == 4
    subscribes = [r for r in broker.requests if r["op"] == "subscribe"]
    assert [r["since"] for r in subscribes] == [{"offset": 2, "epoch": "e"}] * 2


async def test_subscribe_stops_after_count_messages(broker: Broker) -> None:
    async def script(ws: ServerConnection) -> None:
        req = await broker.request(ws, "subscribe")
        await send(ws, {"op": "ack", "id": req["id"]})
        for n in range(3):
            await send(ws, {"op": "message", "topic": "a", "data": n})
        await ws.wait_closed()

    broker.script = script
    code, out = await run(
        client_cli.subscribe, args("subscribe", "a", "--count", "2", "--url", broker.url)
    )
    assert code == 0
    assert [json.loads(line)["data"] for line in out.splitlines()] == [0, 1]


async def test_a_refused_subscribe_exits_1(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    async def script(ws: ServerConnection) -> None:
        req = await broker.request(ws, "subscribe")
        await send(ws, {"op": "error", "id": req["id"], "code": "bad_topic", "reason": "no"})
        await ws.wait_closed()

    broker.script = script
    code, out = await run(client_cli.subscribe, args("subscribe", "a", "--url", broker.url))
    assert (code, out) == (1, "")
    assert "subscribe a failed: bad_topic: no" in capsys.readouterr().err


async def test_a_subscription_the_server_ends_exits_1(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    async def script(ws: ServerConnection) -> None:
        req = await broker.request(ws, "subscribe")
        await send(ws, {"op": "ack", "id": req["id"]})
        await ws.close(1008, "go away")  # policy: the client does not reconnect

    broker.script = script
    code, _ = await run(client_cli.subscribe, args("subscribe", "a", "--url", broker.url))
    assert code == 1
    assert "subscription ended" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert client_cli.main(args("subscribe", "a", "--count", "0")) == 2
    assert client_cli.main(args("subscribe", "a", "--since", "nope")) == 2
    assert "--since" in capsys.readouterr().err
    for url in ("http://127.0.0.1:1/", "nonsense", "ws://:80/", "ws://h:x/"):
        assert client_cli.main(args("publish", "t", "1", "--url", url)) == 2
        assert "--url" in capsys.readouterr().err
