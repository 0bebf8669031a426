"""client.pubsub against a scripted server: gaps, positions, close codes, publish outcomes.

The server is an independent peer: the `websockets` library, in process, on a loopback
port. Each test takes the connections the client opens (`FakeServer.next_peer()`) and
plays the broker frame by frame: welcome, acks, messages, gap frames, errors, closes with
any code, or a TCP abort (1006). Every wait has a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.waiting import eventually
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from broker.envelope import msgpack_dumps, msgpack_loads
from broker.errors import ClientError, ConnectionClosedError
from client import (
    CLOSE_CODE_POLICY,
    Gap,
    Message,
    NotPublished,
    PublishOutcomeUnknown,
    PubSubClient,
    connect,
    reconnect_policy,
)

WAIT_S = 5.0

# The contract's table (docs/protocol.md, "Close codes"); test_js_client.py checks
# redwire.js against the same list.
CLOSE_CODE_TABLE = {
    1000: "never",
    1001: "now",
    1002: "never",
    1003: "never",
    1006: "backoff",
    1007: "never",
    1008: "never",
    1009: "never",
    1010: "never",
    1011: "backoff",
    1012: "backoff",
    1013: "backoff",
    1005: "backoff",
    4000: "backoff",
    4001: "refresh",  # token expired: a new token from the provider, then reconnect
}


class Peer:
    """One connection the client opened, played by the test."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.done = asyncio.Event()
        self.received: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def welcome(self, worker: str = "0") -> None:
        await self.send({"op": "welcome", "version": 1, "client": f"{worker}-1", "worker": worker})

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            frame = json.loads(await self.ws.recv())
        self.received.append(frame)
        return frame

    async def expect(self, op: str) -> dict[str, Any]:
        """The next request, which must be `op` (pings are answered on the way)."""
        while True:
            frame = await self.recv()
            if frame["op"] == "ping":
                await self.send({"op": "pong", "id": frame.get("id")})
                continue
            assert frame["op"] == op, frame
            return frame

    async def ack(self, request: dict[str, Any], **fields: Any) -> None:
        await self.send({"op": "ack", "id": request["id"], **fields})

    async def message(self, topic: str, data: Any, **fields: Any) -> None:
        await self.send({"op": "message", "topic": topic, "data": data, **fields})

    async def close(self, code: int, reason: str = "") -> None:
        await self.ws.close(code, reason)
        self.done.set()

    def abort(self) -> None:
        """Drop TCP without a close frame: the client sees 1006."""
        self.ws.transport.abort()
        self.done.set()


class FakeServer:
    def __init__(self) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.server: Server | None = None
        self.connections = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        peer = Peer(ws)
        await self.peers.put(peer)
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait(
                [asyncio.ensure_future(peer.done.wait()), asyncio.ensure_future(ws.wait_closed())],
                return_when=asyncio.FIRST_COMPLETED,
            )

    async def next_peer(self) -> Peer:
        async with asyncio.timeout(WAIT_S):
            return await self.peers.get()


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    async with serve(
        fake._handler, "127.0.0.1", 0, subprotocols=["redwire.json", "redwire.msgpack"]
    ) as srv:
        fake.server = srv
        yield fake


async def open_client(server: FakeServer, **kwargs: Any) -> tuple[PubSubClient, Peer]:
    """A connected client and the peer playing its first connection."""
    kwargs.setdefault("min_delay_s", 0.01)
    kwargs.setdefault("max_delay_s", 0.05)
    kwargs.setdefault("request_timeout_s", WAIT_S)
    connecting = asyncio.ensure_future(connect(server.url, **kwargs))
    peer = await server.next_peer()
    await peer.welcome()
    async with asyncio.timeout(WAIT_S):
        client = await connecting
    return client, peer


async def subscribe(client: PubSubClient, peer: Peer, topic: str, **ack: Any):
    """Subscribe and answer it; returns the subscription and the request."""
    pending = asyncio.ensure_future(client.subscribe(topic))
    request = await peer.expect("subscribe")
    await peer.ack(request, **ack)
    async with asyncio.timeout(WAIT_S):
        return await pending, request


# --- the close-code table -----------------------------------------------------------------------


def test_close_code_table_is_the_contracts() -> None:
    assert {code: reconnect_policy(code) for code in CLOSE_CODE_TABLE} == CLOSE_CODE_TABLE
    assert reconnect_policy(None) == "backoff"
    assert {c: p for c, p in CLOSE_CODE_TABLE.items() if c in CLOSE_CODE_POLICY} == dict(
        CLOSE_CODE_POLICY
    )


@pytest.mark.parametrize("code", [c for c, p in CLOSE_CODE_TABLE.items() if p == "never"])
async def test_codes_that_forbid_reconnecting_end_the_client(server: FakeServer, code: int) -> None:
    states: list[tuple[str, int | None]] = []
    client, peer = await open_client(server, on_state=lambda s, c: states.append((s, c)))
    try:
        sub, _ = await subscribe(client, peer, "t")
        await peer.close(code, "because")
        with pytest.raises(ConnectionClosedError) as caught:
            await sub.get(WAIT_S)
        assert caught.value.code == code
        with pytest.raises(ConnectionClosedError):
            async for _ in sub:  # ended by the server: iteration raises, not a silent end
                pass
        assert client.state == "closed"
        assert states[-2:] == [("disconnected", code), ("closed", code)]
        with pytest.raises(ConnectionClosedError):
            await client.publish("t", 1)
        assert server.connections == 1
        assert server.peers.empty()
    finally:
        await client.close()


@pytest.mark.parametrize("code", [1011, 1012, 1013, 4000])
async def test_codes_that_back_off_reconnect(server: FakeServer, code: int) -> None:
    client, peer = await open_client(server)
    try:
        await peer.close(code)
        again = await server.next_peer()
        await again.welcome()
        await eventually(_is_open(client), timeout_s=WAIT_S)
        assert client.last_close_code == code
    finally:
        await client.close()


async def test_going_away_reconnects_at_once_and_1006_backs_off(server: FakeServer) -> None:
    # A backoff this long would miss the deadline: 1001 must not wait for it.
    client, peer = await open_client(server, min_delay_s=60, max_delay_s=60)
    try:
        await peer.close(1001, "draining")
        again = await server.next_peer()
        await again.welcome()
        await eventually(_is_open(client), timeout_s=WAIT_S)
        assert client.last_close_code == 1001
    finally:
        await client.close()
    client, peer = await open_client(server)
    try:
        peer.abort()
        again = await server.next_peer()
        await again.welcome()
        await eventually(_is_open(client), timeout_s=WAIT_S)
        assert client.last_close_code == 1006
    finally:
        await client.close()


def _is_open(client: PubSubClient):
    async def probe() -> bool:
        return client.state == "open"

    return probe


# --- gaps and positions -------------------------------------------------------------------------


async def test_a_plain_topic_yields_a_gap_after_a_reconnect(server: FakeServer) -> None:
    client, peer = await open_client(server)
    try:
        sub, first = await subscribe(client, peer, "plain")
        assert "since" not in first
        await peer.message("plain", "before")
        peer.abort()
        peer2 = await server.next_peer()
        await peer2.welcome()
        resub = await peer2.expect("subscribe")
        assert resub["topic"] == "plain" and "since" not in resub
        await peer2.ack(resub)
        await peer2.message("plain", "after")
        items = [await sub.get(WAIT_S) for _ in range(3)]
        assert items[0] == Message("plain", "before")
        assert isinstance(items[1], Gap) and items[1].topics == {"plain"}
        assert "no history" in items[1].reason
        assert items[2] == Message("plain", "after")
    finally:
        await client.close()


async def test_history_topic_recovers_from_its_position_without_a_gap(server: FakeServer) -> None:
    client, peer = await open_client(server)
    try:
        sub, _ = await subscribe(client, peer, "feed", offset=4, epoch="e", recovered=False)
        assert client.positions["feed"] == (4, "e")  # a fresh subscribe: no gap
        await peer.message("feed", "5", offset=5, epoch="e")
        await peer.message("feed", "6", offset=6, epoch="e")
        got = [await sub.get(WAIT_S) for _ in range(2)]
        await peer.close(1012)
        peer2 = await server.next_peer()
        await peer2.welcome()
        resub = await peer2.expect("subscribe")
        assert resub["since"] == {"offset": 6, "epoch": "e"}
        # The ack and the replay come in one burst: the ack is applied first.
        await peer2.ack(resub, offset=6, epoch="e", recovered=True)
        for n in (7, 8):
            await peer2.message("feed", str(n), offset=n, epoch="e")
        got += [await sub.get(WAIT_S) for _ in range(2)]
        assert [(m.data, m.offset) for m in got] == [("5", 5), ("6", 6), ("7", 7), ("8", 8)]
        assert sub.queued == 0
        assert client.positions["feed"] == (8, "e")
        assert client.duplicates_dropped == 0
    finally:
        await client.close()


@pytest.mark.parametrize(
    "ack",
    [
        {"offset": 0, "epoch": "new", "recovered": False},  # the epoch ended
        {"offset": 2, "epoch": "e", "recovered": False},  # history too short
        {"offset": 9, "epoch": "e", "recovered": True},  # not from where we asked
        {},  # no position at all
    ],
)
async def test_a_resubscription_that_does_not_recover_yields_a_gap(
    server: FakeServer, ack: dict[str, Any]
) -> None:
    client, peer = await open_client(server)
    try:
        sub, _ = await subscribe(client, peer, "feed", offset=2, epoch="e")
        peer.abort()
        peer2 = await server.next_peer()
        await peer2.welcome()
        resub = await peer2.expect("subscribe")
        assert resub["since"] == {"offset": 2, "epoch": "e"}
        await peer2.ack(resub, **ack)
        if "epoch" in ack:
            nxt = ack["offset"] + 1
            await peer2.message("feed", "next", offset=nxt, epoch=ack["epoch"])
        else:
            await peer2.message("feed", "next")
        gap = await sub.get(WAIT_S)
        assert isinstance(gap, Gap) and gap.topics == {"feed"}
        assert "not recovered" in gap.reason
        message = await sub.get(WAIT_S)
        assert isinstance(message, Message) and message.data == "next"
        assert client.duplicates_dropped == 0
    finally:
        await client.close()


async def test_gap_frames_move_the_position_and_nothing_above_it_is_dropped(
    server: FakeServer,
) -> None:
    client, peer = await open_client(server)
    try:
        sub, _ = await subscribe(client, peer, "feed", offset=5, epoch="e")
        await peer.send({"op": "gap", "topic": "feed", "epoch": "e", "from": 6, "to": 9})
        for n in (10, 11):  # queued right behind the gap: must not be taken for duplicates
            await peer.message("feed", n, offset=n, epoch="e")
        await peer.message("feed", "dup", offset=11, epoch="e")
        await peer.message("feed", "old", offset=7, epoch="e")
        # The epoch ended: no `to`, the position stays; the new epoch's messages follow.
        await peer.send({"op": "gap", "topic": "feed", "epoch": "e", "from": 12})
        await peer.message("feed", "n1", offset=1, epoch="f")
        await peer.send({"op": "gap", "topic": "feed"})
        await peer.message("feed", "n2", offset=2, epoch="f")
        await peer.send({"op": "gap", "topic": "other", "from": 1, "to": 2})
        items = [await sub.get(WAIT_S) for _ in range(7)]
        kinds = [
            ("gap", i.reason) if isinstance(i, Gap) else ("message", i.data, i.offset, i.epoch)
            for i in items
        ]
        assert kinds[0][0] == "gap" and "6..9 of epoch e" in kinds[0][1]
        assert kinds[1:3] == [("message", 10, 10, "e"), ("message", 11, 11, "e")]
        assert kinds[3][0] == "gap" and "epoch e ended" in kinds[3][1]
        assert kinds[4] == ("message", "n1", 1, "f")
        assert kinds[5][0] == "gap"
        assert kinds[6] == ("message", "n2", 2, "f")
        assert client.duplicates_dropped == 2
        assert client.positions["feed"] == (2, "f")
        assert sub.queued == 0
    finally:
        await client.close()


async def test_a_gap_frame_without_epoch_moves_within_the_current_one(server: FakeServer) -> None:
    client, peer = await open_client(server)
    try:
        sub, _ = await subscribe(client, peer, "feed", offset=5, epoch="e")
        await peer.send({"op": "gap", "topic": "feed", "from": 6, "to": 8})
        await peer.send({"op": "gap", "topic": "feed", "from": 3, "to": 4})  # never backwards
        await peer.message("feed", "nine", offset=9, epoch="e")
        items = [await sub.get(WAIT_S) for _ in range(3)]
        assert [type(i).__name__ for i in items] == ["Gap", "Gap", "Message"]
        assert client.positions["feed"] == (9, "e")
    finally:
        await client.close()


# --- publish outcomes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("unavailable", NotPublished),
        ("outcome_unknown", PublishOutcomeUnknown),
        ("bad_topic", ClientError),
        ("forbidden", ClientError),
    ],
)
async def test_error_replies_map_to_exceptions(
    server: FakeServer, code: str, kind: type[ClientError]
) -> None:
    client, peer = await open_client(server)
    try:
        publishing = asyncio.ensure_future(client.publish("t", 1))
        request = await peer.expect("publish")
        await peer.send({"op": "error", "id": request["id"], "code": code, "reason": "why"})
        with pytest.raises(ClientError) as caught:
            await publishing
        assert type(caught.value) is kind
        assert caught.value.code == code
        assert caught.value.reason == "why"
        # Without a key nothing is retried: the next request is the next publish.
        again = asyncio.ensure_future(client.publish("t", 2))
        request2 = await peer.expect("publish")
        assert request2["data"] == 2
        await peer.ack(request2)
        assert (await again)["op"] == "ack"
    finally:
        await client.close()


async def test_a_publish_lost_with_its_connection_is_outcome_unknown(server: FakeServer) -> None:
    client, peer = await open_client(server)
    try:
        publishing = asyncio.ensure_future(client.publish("t", "maybe"))
        await peer.expect("publish")
        peer.abort()
        with pytest.raises(PublishOutcomeUnknown) as caught:
            async with asyncio.timeout(WAIT_S):
                await publishing
        assert caught.value.code == "outcome_unknown"
        peer2 = await server.next_peer()
        await peer2.welcome()
        await eventually(_is_open(client), timeout_s=WAIT_S)
        nxt = asyncio.ensure_future(client.publish("t", "next"))
        request = await peer2.expect("publish")
        assert request["data"] == "next"  # "maybe" was not re-sent
        await peer2.ack(request)
        await nxt
    finally:
        await client.close()


async def test_a_keyed_publish_is_resent_with_its_key(server: FakeServer) -> None:
    client, peer = await open_client(server)
    try:
        publishing = asyncio.ensure_future(client.publish("t", "once", key="k-1"))
        first = await peer.expect("publish")
        await peer.close(1012)
        peer2 = await server.next_peer()
        await peer2.welcome()
        second = await peer2.expect("publish")
        assert (second["data"], second["key"]) == ("once", "k-1")
        await peer2.send({"op": "error", "id": second["id"], "code": "unavailable", "reason": ""})
        third = await peer2.expect("publish")  # a bus error with a key: retried too
        assert third["key"] == "k-1" and third["id"] != second["id"] != first["id"]
        await peer2.ack(third, duplicate=True)
        ack = await publishing
        assert ack["duplicate"] is True
    finally:
        await client.close()


async def test_a_publish_made_while_disconnected_is_sent_after_reconnecting(
    server: FakeServer,
) -> None:
    client, peer = await open_client(server, min_delay_s=0.2, max_delay_s=0.2)
    try:
        sub, _ = await subscribe(client, peer, "t")
        peer.abort()
        await eventually(_not_open(client), timeout_s=WAIT_S)
        publishing = asyncio.ensure_future(client.publish("t", "queued"))
        peer2 = await server.next_peer()
        await peer2.welcome()
        resub = await peer2.expect("subscribe")  # resubscriptions go first
        await peer2.ack(resub)
        request = await peer2.expect("publish")
        assert request["data"] == "queued"
        await peer2.ack(request)
        await publishing
        assert isinstance(await sub.get(WAIT_S), Gap)
    finally:
        await client.close()


async def test_never_connected_again_is_not_published(server: FakeServer) -> None:
    client, peer = await open_client(server, min_delay_s=60, max_delay_s=60, request_timeout_s=0.3)
    try:
        peer.abort()
        await eventually(_not_open(client), timeout_s=WAIT_S)
        with pytest.raises(NotPublished):
            await client.publish("t", 1)
    finally:
        await client.close()


def _not_open(client: PubSubClient):
    async def probe() -> bool:
        return client.state != "open"

    return probe


# --- bounded queues -----------------------------------------------------------------------------


async def test_a_full_subscription_stops_reading_then_resumes_without_loss(
    server: FakeServer,
) -> None:
    client, peer = await open_client(server, max_queue=4)
    try:
        sub, _ = await subscribe(client, peer, "feed", offset=0, epoch="e")
        for n in range(1, 41):
            await peer.message("feed", n, offset=n, epoch="e")
        ws = client._ws
        assert ws is not None

        async def paused() -> bool:
            return ws._p.paused

        await eventually(paused, timeout_s=WAIT_S)  # the socket is no longer read
        assert sub.queued == 4
        got = [(await sub.get(WAIT_S)).data for _ in range(40)]  # type: ignore[union-attr]
        assert got == list(range(1, 41))
        assert not ws._p.paused
    finally:
        await client.close()


async def test_a_slow_consumer_closed_1013_recovers_what_it_missed(server: FakeServer) -> None:
    client, peer = await open_client(server, max_queue=2)
    try:
        sub, _ = await subscribe(client, peer, "feed", offset=0, epoch="e")
        for n in range(1, 21):
            await peer.message("feed", n, offset=n, epoch="e")
        # The server gives up on us while we do not read: its close frame waits behind.
        closing = asyncio.ensure_future(peer.close(1013, "slow consumer"))
        got = [await sub.get(WAIT_S) for _ in range(20)]  # what reached the client, in order
        async with asyncio.timeout(WAIT_S):
            await closing
        assert [m.offset for m in got] == list(range(1, 21))  # type: ignore[union-attr]
        peer2 = await server.next_peer()
        await peer2.welcome()
        resub = await peer2.expect("subscribe")
        assert resub["since"] == {"offset": 20, "epoch": "e"}
        await peer2.ack(resub, offset=20, epoch="e", recovered=True)
        await peer2.message("feed", 21, offset=21, epoch="e")
        assert (await sub.get(WAIT_S)).offset == 21  # type: ignore[union-attr]
        assert client.last_close_code == 1013
    finally:
        await client.close()


async def test_in_flight_requests_are_bounded(server: FakeServer) -> None:
    client, peer = await open_client(server, max_in_flight=2)
    try:
        publishes = [asyncio.ensure_future(client.publish("t", n)) for n in range(3)]
        first = [await peer.expect("publish") for _ in range(2)]
        assert len(client._pending) == 2  # the third waits for room, not on the wire
        await peer.ack(first[0])
        third = await peer.expect("publish")
        assert third["data"] == 2
        await peer.ack(first[1])
        await peer.ack(third)
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*publishes)
    finally:
        await client.close()


# --- ending -------------------------------------------------------------------------------------


async def test_unsubscribe_and_close_end_iteration_quietly(server: FakeServer) -> None:
    client, peer = await open_client(server)
    try:
        sub, _ = await subscribe(client, peer, "a")
        other, _ = await subscribe(client, peer, "b")
        await peer.message("a", 1)
        await eventually(_queued(sub, 1), timeout_s=WAIT_S)
        unsubscribing = asyncio.ensure_future(sub.unsubscribe())
        await peer.ack(await peer.expect("unsubscribe"))
        await unsubscribing
        assert [m.data async for m in sub] == [1]  # type: ignore[union-attr]
    finally:
        await client.close()
    assert [m async for m in other] == []
    assert client.state == "closed"


async def test_a_refused_resubscription_ends_that_subscription(server: FakeServer) -> None:
    client, peer = await open_client(server)
    try:
        denied, _ = await subscribe(client, peer, "denied")
        kept, _ = await subscribe(client, peer, "kept")
        await peer.close(1011)
        peer2 = await server.next_peer()
        await peer2.welcome()
        requests = {r["topic"]: r for r in [await peer2.expect("subscribe") for _ in range(2)]}
        await peer2.send(
            {"op": "error", "id": requests["denied"]["id"], "code": "forbidden", "reason": "no"}
        )
        await peer2.ack(requests["kept"])
        with pytest.raises(ClientError) as caught:
            await denied.get(WAIT_S)
        assert caught.value.code == "forbidden"
        assert isinstance(await kept.get(WAIT_S), Gap)
        assert list(client.subscriptions) == ["kept"]
        await eventually(_is_open(client), timeout_s=WAIT_S)
    finally:
        await client.close()


def _queued(sub: Any, n: int):
    async def probe() -> bool:
        return sub.queued >= n

    return probe


async def test_an_unavailable_resubscription_is_retried_on_a_new_connection(
    server: FakeServer,
) -> None:
    client, peer = await open_client(server)
    try:
        sub, _ = await subscribe(client, peer, "t")
        refused = asyncio.ensure_future(client.subscribe("u"))
        request = await peer.expect("subscribe")
        await peer.send({"op": "error", "id": request["id"], "code": "unavailable", "reason": ""})
        with pytest.raises(ClientError) as caught:
            await refused
        assert type(caught.value) is ClientError  # NotPublished is for publishes only
        assert caught.value.code == "unavailable"
        peer.abort()
        peer2 = await server.next_peer()
        await peer2.welcome()
        resub = await peer2.expect("subscribe")
        await peer2.send({"op": "error", "id": resub["id"], "code": "unavailable", "reason": ""})
        peer3 = await server.next_peer()  # the attempt failed as a whole: a new one
        await peer3.welcome()
        await peer3.ack(await peer3.expect("subscribe"))
        await eventually(_is_open(client), timeout_s=WAIT_S)
        assert list(client.subscriptions) == ["t"]
        assert isinstance(await sub.get(WAIT_S), Gap)
    finally:
        await client.close()


async def test_msgpack_encoding(server: FakeServer) -> None:
    connecting = asyncio.ensure_future(connect(server.url, encoding="msgpack"))
    peer = await server.next_peer()
    assert peer.ws.subprotocol == "redwire.msgpack"
    await peer.ws.send(msgpack_dumps({"op": "welcome", "version": 1, "client": "c", "worker": "0"}))
    client = await connecting
    try:
        subscribing = asyncio.ensure_future(client.subscribe("t"))
        request = msgpack_loads(await peer.ws.recv())
        assert request["op"] == "subscribe"
        await peer.ws.send(msgpack_dumps({"op": "ack", "id": request["id"]}))
        sub = await subscribing
        await peer.ws.send(msgpack_dumps({"op": "message", "topic": "t", "data": b"\x00\x01"}))
        assert await sub.get(WAIT_S) == Message("t", b"\x00\x01")
    finally:
        await client.close()


async def test_close_with_a_publish_on_the_wire_is_outcome_unknown(server: FakeServer) -> None:
    client, peer = await open_client(server)
    publishing = asyncio.ensure_future(client.publish("t", 1, key="k"))
    await peer.expect("publish")
    closing = asyncio.ensure_future(client.close())
    with pytest.raises(PublishOutcomeUnknown):
        async with asyncio.timeout(WAIT_S):
            await publishing
    await peer.close(1000)
    async with asyncio.timeout(WAIT_S):
        await closing
    with pytest.raises(ConnectionClosedError):
        await client.publish("t", 2)  # never sent: the client is closed
