"""The Python pub/sub client over WebSocket: `await client.connect(url)`.

    async with await connect("ws://127.0.0.1:8765/") as rw:
        sub = await rw.subscribe("prices")
        await rw.publish("prices", {"eur": 1.08})
        async for message in sub:
            print(message.topic, message.data)

It speaks docs/protocol.md (JSON, or msgpack with `encoding="msgpack"`) over
`client.ws`, Redwire's own WebSocket client. A lost connection is retried with exponential
backoff and full jitter; every subscription is made again on the new connection. Nothing is
swallowed: `state` and the `on_state` callback show each disconnect, and a publish made
while disconnected waits for the connection at most `request_timeout_s`, then raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from broker import errors
from broker.envelope import msgpack_dumps, msgpack_loads
from broker.errors import ClientError, ConnectionClosedError, HandshakeError
from client.subscriber import Gap, Message
from client.ws import WebSocketClient
from client.ws import connect as ws_connect

log = logging.getLogger("redwire.client")

# Close codes after which reconnecting cannot help (docs/protocol.md).
_FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})


@dataclass(slots=True)
class Subscription:
    """Messages of one topic, in order, as an async iterator.

    A `Gap` among them says messages may be missing (the server could not recover them
    after a reconnect, or announced a gap): the application should resync that topic.
    """

    topic: str
    _queue: asyncio.Queue[Message | Gap | None] = field(default_factory=asyncio.Queue)
    _client: PubSubClient | None = None

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message | Gap]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def get(self, timeout_s: float | None = None) -> Message | Gap:
        """The next message (TimeoutError after `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            item = await self._queue.get()
        if item is None:
            raise ConnectionClosedError(errors.CLOSE_NORMAL, "unsubscribed")
        return item

    async def unsubscribe(self) -> None:
        if self._client is not None:
            await self._client.unsubscribe(self.topic)


class PubSubClient:
    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        encoding: str,
        reconnect: bool,
        min_delay_s: float,
        max_delay_s: float,
        request_timeout_s: float,
        on_state: Callable[[str, int | None], None] | None,
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError("encoding must be 'json' or 'msgpack'")
        self.url = _with_token(url, token)
        self.binary = encoding == "msgpack"
        self.reconnect = reconnect
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.request_timeout_s = request_timeout_s
        self.on_state = on_state
        self.state = "connecting"
        self.worker: str | None = None
        self.client_id: str | None = None
        self.disconnects = 0
        self.subscriptions: dict[str, Subscription] = {}
        # Per topic with history: the last (offset, epoch) seen, to recover from after a reconnect.
        self.positions: dict[str, tuple[int, str]] = {}
        self.duplicates_dropped = 0
        self._ws: WebSocketClient | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._open = asyncio.Event()
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.last_error: BaseException | None = None

    # --- connection lifecycle ----------------------------------------------------------------

    async def _connect_once(self) -> None:
        protocol = "redwire.msgpack" if self.binary else "redwire.json"
        ws = await ws_connect(self.url, subprotocols=[protocol])
        welcome = self._decode(await ws.recv(timeout_s=self.request_timeout_s))
        if welcome.get("op") != "welcome":
            await ws.close()
            raise ClientError("bad_request", f"expected a welcome frame, got {welcome!r:.100}")
        self._ws = ws
        self.worker = welcome.get("worker")
        self.client_id = welcome.get("client")
        reader = asyncio.get_running_loop().create_task(self._read(ws))
        try:
            for topic in list(self.subscriptions):
                await self._subscribe_request(topic, wait_open=False)
        except BaseException:
            reader.cancel()
            raise
        self._set_state("open", None)
        self._open.set()
        self._reader = reader

    async def _run(self) -> None:
        """Keep a connection: wait for the current one to end, then reconnect with backoff."""
        attempt = 0
        while not self._closing:
            ws = self._ws
            if ws is not None and self._reader is not None:
                await self._reader
                code = ws.close_code
                self._ws = None
                self._open.clear()
                self.disconnects += 1
                self._fail_pending(ConnectionClosedError(code or errors.CLOSE_ABNORMAL, ""))
                if self._closing:
                    break
                self._set_state("disconnected", code)
                if not self.reconnect or code in _FATAL_CLOSE_CODES:
                    self._end_subscriptions()
                    self.state = "closed"
                    return
                if code == errors.CLOSE_GOING_AWAY:
                    attempt = 0  # a draining server: another worker takes us at once
            delay = random.uniform(0, min(self.max_delay_s, self.min_delay_s * 2**attempt))
            await asyncio.sleep(delay)
            try:
                await self._connect_once()
                attempt = 0
            except (OSError, HandshakeError, ConnectionClosedError, TimeoutError) as exc:
                self.last_error = exc
                attempt += 1
                log.info("reconnect attempt %d failed: %s", attempt, exc)

    def _set_state(self, state: str, code: int | None) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state, code)

    async def _read(self, ws: WebSocketClient) -> None:
        async for raw in ws:
            try:
                frame = self._decode(raw)
            except ValueError:
                log.warning("undecodable frame from server: %.100r", raw)
                continue
            op = frame.get("op")
            if op == "message":
                topic = frame.get("topic", "")
                sub = self.subscriptions.get(topic)
                if sub is not None and self._advance(topic, frame):
                    sub._queue.put_nowait(
                        Message(topic, frame.get("data"), frame.get("offset"), frame.get("epoch"))
                    )
            elif op == "gap":
                sub = self.subscriptions.get(frame.get("topic", ""))
                if sub is not None:
                    sub._queue.put_nowait(Gap(frozenset((sub.topic,)), "announced by the server"))
            elif op in ("ack", "error", "pong"):
                waiter = self._pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)

    def _advance(self, topic: str, frame: dict[str, Any]) -> bool:
        """Track the topic's position; False for a message already seen (dropped)."""
        offset, epoch = frame.get("offset"), frame.get("epoch")
        if not isinstance(offset, int) or not isinstance(epoch, str):
            return True
        last = self.positions.get(topic)
        if last is not None and last[1] == epoch and offset <= last[0]:
            self.duplicates_dropped += 1
            return False
        self.positions[topic] = (offset, epoch)
        return True

    async def _subscribe_request(self, topic: str, *, wait_open: bool = True) -> dict[str, Any]:
        """Subscribe, recovering from the last position when one is known."""
        request: dict[str, Any] = {"op": "subscribe", "topic": topic}
        position = self.positions.get(topic)
        if position is not None:
            request["since"] = {"offset": position[0], "epoch": position[1]}
        reply = await self._request(request, wait_open=wait_open)
        offset, epoch = reply.get("offset"), reply.get("epoch")
        if position is not None and reply.get("recovered") is False:
            sub = self.subscriptions.get(topic)
            if sub is not None:
                sub._queue.put_nowait(Gap(frozenset((topic,)), "not recovered after reconnect"))
        if (
            isinstance(offset, int)
            and isinstance(epoch, str)
            and reply.get("recovered") is not True
        ):
            self.positions[topic] = (offset, epoch)  # recovered: the replayed messages advance it
        return reply

    def _decode(self, raw: str | bytes) -> dict[str, Any]:
        obj = msgpack_loads(raw) if isinstance(raw, bytes) else json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("frame is not a map")
        return obj

    def _encode(self, obj: dict[str, Any]) -> str | bytes:
        return msgpack_dumps(obj) if self.binary else json.dumps(obj, separators=(",", ":"))

    async def _request(self, obj: dict[str, Any], *, wait_open: bool = True) -> dict[str, Any]:
        async with asyncio.timeout(self.request_timeout_s):
            if wait_open:
                await self._open.wait()
            ws = self._ws
            if ws is None:
                raise ConnectionClosedError(errors.CLOSE_ABNORMAL, "not connected")
            req_id = next(self._ids)
            waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[req_id] = waiter
            await ws.send(self._encode({**obj, "id": req_id}))
            reply = await waiter
        if reply.get("op") == "error":
            raise ClientError(str(reply.get("code")), str(reply.get("reason")))
        return reply

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if not waiter.done():
                waiter.set_exception(exc)

    def _end_subscriptions(self) -> None:
        for sub in self.subscriptions.values():
            sub._queue.put_nowait(None)

    # --- the API -----------------------------------------------------------------------------

    async def subscribe(self, topic: str) -> Subscription:
        """Subscribe; returns once the server acknowledged it (messages from then on)."""
        sub = self.subscriptions.get(topic)
        if sub is None:
            sub = self.subscriptions[topic] = Subscription(topic, _client=self)
        try:
            await self._subscribe_request(topic)
        except BaseException:
            self.subscriptions.pop(topic, None)
            raise
        return sub

    async def unsubscribe(self, topic: str) -> None:
        sub = self.subscriptions.pop(topic, None)
        self.positions.pop(topic, None)
        if sub is not None:
            sub._queue.put_nowait(None)
        if self._ws is not None:
            await self._request({"op": "unsubscribe", "topic": topic})

    async def publish(self, topic: str, data: Any, *, key: str | None = None) -> dict[str, Any]:
        """Publish; returns the server's ack (with `offset`/`epoch` on topics with history),
        raises ClientError with the server's code. `key` makes a retried publish land once."""
        request: dict[str, Any] = {"op": "publish", "topic": topic, "data": data}
        if key is not None:
            request["key"] = key
        return await self._request(request)

    async def presence(self, topic: str) -> dict[str, Any]:
        """Who is subscribed to `topic` (topics with presence enabled): client id → info."""
        return (await self._request({"op": "presence", "topic": topic}))["clients"]

    async def ping(self) -> None:
        await self._request({"op": "ping"})

    async def close(self) -> None:
        self._closing = True
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._end_subscriptions()
        self._fail_pending(ConnectionClosedError(errors.CLOSE_NORMAL, "client closed"))
        self.state = "closed"

    async def __aenter__(self) -> PubSubClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _with_token(url: str, token: str | None) -> str:
    if token is None:
        return url
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=query + urlencode({"token": token})))


async def connect(
    url: str,
    *,
    token: str | None = None,
    encoding: str = "json",
    reconnect: bool = True,
    min_delay_s: float = 0.1,
    max_delay_s: float = 10.0,
    request_timeout_s: float = 10.0,
    on_state: Callable[[str, int | None], None] | None = None,
) -> PubSubClient:
    """Connect (the first attempt's error is raised) and keep the connection from then on."""
    client = PubSubClient(
        url,
        token=token,
        encoding=encoding,
        reconnect=reconnect,
        min_delay_s=min_delay_s,
        max_delay_s=max_delay_s,
        request_timeout_s=request_timeout_s,
        on_state=on_state,
    )
    await client._connect_once()
    client._runner = asyncio.get_running_loop().create_task(client._run())
    return client
