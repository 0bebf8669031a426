"""The Python pub/sub client over WebSocket: `await client.connect(url)`.

    async with await connect("ws://127.0.0.1:8765/") as rw:
        sub = await rw.subscribe("prices")
        await rw.publish("prices", {"eur": 1.08})
        async for item in sub:
            if isinstance(item, Gap):
                resync(item.topics)          # messages may be missing: resync the topic
            else:
                print(item.topic, item.data)

It speaks docs/protocol.md (JSON, or msgpack with `encoding="msgpack"`) over
`client.ws`, Redwire's own WebSocket client. A lost connection is retried as the close-code
table `CLOSE_CODE_POLICY` says (never / at once / exponential backoff with full jitter);
every subscription is made again on the new connection, from its position on topics with
history. Nothing is swallowed:

- `state` and the `on_state` callback show each disconnect;
- after a reconnect, a subscription on a topic without history, or whose resubscription
  says `recovered: false`, yields a `Gap`; so does every `gap` frame from the server;
- a publish raises `NotPublished` (it did not happen: a retry is safe) or
  `PublishOutcomeUnknown` (it may have happened: retry only with the same `key`). A publish
  with a `key` is re-sent with that key after a lost connection, an `unavailable` or an
  `outcome_unknown` reply, until `request_timeout_s` has passed;
- a connection token (`token`: a string, or a function returning one, sync or async) is
  sent with every connection attempt (`token` query parameter, or `Authorization: Bearer`
  with `token_transport="header"`); a provider is asked again for each attempt, and when
  the server asks (`{"op":"refresh"}`, docs/protocol.md "Authentication") the client sends
  it a new one by itself. A close 4001 (token expired) reconnects with a fresh token from
  the provider; with a fixed string it ends the client (the token cannot get any newer);
- every buffer is bounded: a subscription holds at most `max_queue` items; when one is full
  the client stops reading the socket (the server sees a slow consumer: it may close 1013,
  and the client reconnects and recovers), at most `max_in_flight` requests wait for replies.

Positions (topics with history): each subscription keeps (offset, epoch). Every subscribe
ack sets it (the ack says where the subscription starts from), every message moves it, a
`gap` frame with `to` moves it to (epoch, to). A message at or below it in the same epoch
was seen already and is dropped (counted in `duplicates_dropped`; the server should never
send one). Replies are handled by the reading task in frame order, so an ack is applied
before the messages that follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from ssl import SSLContext
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

from broker import errors
from broker.envelope import msgpack_dumps, msgpack_loads
from broker.errors import ClientError, ConnectionClosedError, HandshakeError
from client.subscriber import Gap, Message
from client.ws import WebSocketClient
from client.ws import connect as ws_connect

log = logging.getLogger("redwire.client")

ReconnectPolicy = Literal["never", "now", "backoff", "refresh"]
#: A connection token: the token itself, or a function (sync or async) returning a fresh one.
TokenSource = str | Callable[[], str | Awaitable[str]]

#: What a client does after the server closed with a code (docs/protocol.md, "Close
#: codes"); redwire.js exports the same table as `CLOSE_CODE_POLICY`. Codes not listed
#: (1006: no close frame, 1005, other 4xxx, ...) back off. "refresh": get a new token from
#: the token provider, then reconnect (without a provider: stop, as "never").
CLOSE_CODE_POLICY: Mapping[int, ReconnectPolicy] = MappingProxyType(
    {
        1000: "never",  # normal closure
        1001: "now",  # the server drains or restarts: another worker takes us at once
        1002: "never",  # we broke RFC 6455
        1003: "never",  # we sent data it cannot accept
        1007: "never",  # invalid UTF-8
        1008: "never",  # policy: too many bad requests, or the application refused
        1009: "never",  # a message over the limit
        1010: "never",  # a mandatory extension missing
        1011: "backoff",  # server error
        1012: "backoff",  # service restart
        1013: "backoff",  # slow consumer / try again later
        errors.CLOSE_TOKEN_EXPIRED: "refresh",  # 4001: refresh the token, then reconnect
    }
)

#: The wire error codes of publish outcomes (docs/protocol.md, "Errors").
NOT_PUBLISHED_CODE = "unavailable"
OUTCOME_UNKNOWN_CODE = "outcome_unknown"


def reconnect_policy(code: int | None) -> ReconnectPolicy:
    """What to do after a close with `code` (None: no close frame, as 1006)."""
    return CLOSE_CODE_POLICY.get(code if code is not None else errors.CLOSE_ABNORMAL, "backoff")


class NotPublished(ClientError):
    """The publish did not happen (`unavailable`, or never sent): a retry is safe."""


class PublishOutcomeUnknown(ClientError):
    """The publish was sent but no answer came (`outcome_unknown`, a lost connection, a
    timeout): it may have happened. Retry only with the same idempotency `key`."""


def _reply_error(op: str, code: str, reason: str, request_id: Any = None) -> ClientError:
    """The exception for an error reply to an `op` request."""
    if op == "publish" and code == NOT_PUBLISHED_CODE:
        return NotPublished(code, reason, request_id)
    if op == "publish" and code == OUTCOME_UNKNOWN_CODE:
        return PublishOutcomeUnknown(code, reason, request_id)
    return ClientError(code, reason, request_id)


@dataclass(slots=True)
class _End:
    """Why a subscription ended; `error` is raised by `get()` (and by iteration when the
    subscription was ended by the server or a fatal close, not by the application)."""

    error: BaseException
    by_application: bool


@dataclass(slots=True)
class Subscription:
    """Messages of one topic, in order, as an async iterator, with `Gap` items among them.

    A `Gap` says messages may be missing (a reconnect on a topic without history, a
    resubscription that could not recover, a `gap` frame from the server): resync the topic.
    At most `max_queue` items wait here; while it is full the client stops reading its socket.
    """

    topic: str
    max_queue: int = 1000
    _client: PubSubClient | None = None
    _items: deque[Message | Gap] = field(default_factory=deque)
    _readable: asyncio.Event = field(default_factory=asyncio.Event)
    _room: asyncio.Event = field(default_factory=asyncio.Event)
    _end: _End | None = None
    _acked: bool = False  # subscribed on some connection: a later one resubscribes it

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._room.set()

    @property
    def queued(self) -> int:
        """Items waiting to be read."""
        return len(self._items)

    @property
    def ended(self) -> bool:
        return self._end is not None

    async def _put(self, item: Message | Gap) -> None:
        """Queue an item; waits (holding up the socket's reader) while the queue is full."""
        while len(self._items) >= self.max_queue and self._end is None:
            self._room.clear()
            await self._room.wait()
        if self._end is not None:
            return
        self._items.append(item)
        self._readable.set()

    def _finish(self, error: BaseException, *, by_application: bool) -> None:
        if self._end is None:
            self._end = _End(error, by_application)
        self._readable.set()
        self._room.set()

    def __aiter__(self) -> AsyncIterator[Message | Gap]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message | Gap]:
        while True:
            try:
                item = await self.get()
            except ConnectionClosedError:
                if self._end is not None and self._end.by_application:
                    return
                raise
            yield item

    async def get(self, timeout_s: float | None = None) -> Message | Gap:
        """The next message or gap (TimeoutError after `timeout_s`). Once the subscription
        ended and its queue is empty: the error that ended it (ConnectionClosedError with
        code 1000 after `unsubscribe()` or `close()`)."""
        async with asyncio.timeout(timeout_s):
            while not self._items:
                if self._end is not None:
                    raise self._end.error
                self._readable.clear()
                await self._readable.wait()
        item = self._items.popleft()
        if len(self._items) < self.max_queue:
            self._room.set()
        return item

    async def unsubscribe(self) -> None:
        if self._client is not None:
            await self._client.unsubscribe(self.topic)


@dataclass(slots=True)
class _Pending:
    """A request written on `sent_on`, waiting for its reply (set by the reader)."""

    id: int
    request: dict[str, Any]
    waiter: asyncio.Future[dict[str, Any]]
    sent_on: WebSocketClient
    resubscribe: bool = False


class PubSubClient:
    def __init__(
        self,
        url: str,
        *,
        token: TokenSource | None,
        encoding: str,
        reconnect: bool,
        min_delay_s: float,
        max_delay_s: float,
        request_timeout_s: float,
        on_state: Callable[[str, int | None], None] | None,
        max_queue: int = 1000,
        max_in_flight: int = 1000,
        ssl: SSLContext | None = None,
        token_transport: str = "query",
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError("encoding must be 'json' or 'msgpack'")
        if max_queue < 1 or max_in_flight < 1:
            raise ValueError("max_queue and max_in_flight must be >= 1")
        if token_transport not in ("query", "header"):
            raise ValueError("token_transport must be 'query' or 'header'")
        if token is not None and not isinstance(token, str) and not callable(token):
            raise TypeError("token must be a string or a function returning one")
        self.url = url
        self.token = token
        self.token_transport = token_transport
        self.token_refreshes = 0  # tokens sent in answer to the server's refresh requests
        self._refreshing: asyncio.Task[None] | None = None
        self.binary = encoding == "msgpack"
        self.reconnect = reconnect
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.request_timeout_s = request_timeout_s
        self.on_state = on_state
        self.max_queue = max_queue
        self.max_in_flight = max_in_flight
        self.ssl = ssl  # for wss:// URLs: checks the server's certificate (None: system CAs)
        self.state = "connecting"
        self.worker: str | None = None
        self.client_id: str | None = None
        self.disconnects = 0
        self.last_close_code: int | None = None
        self.subscriptions: dict[str, Subscription] = {}
        # Per subscribed topic with history: (offset, epoch), where the subscription stands.
        self.positions: dict[str, tuple[int, str]] = {}
        self.duplicates_dropped = 0
        self.last_error: BaseException | None = None
        self._ws: WebSocketClient | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._open = asyncio.Event()  # also set once the client ended for good (`_final`)
        self._final: ConnectionClosedError | None = None
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    # --- connection lifecycle ----------------------------------------------------------------

    async def _connect_once(self) -> None:
        protocol = "redwire.msgpack" if self.binary else "redwire.json"
        url, headers = self.url, []
        try:
            token = await self._token()
        except Exception as exc:  # the application's provider: retried like a failed connect
            raise ClientError(
                "token_unavailable", f"the token provider failed: {exc!r:.200}"
            ) from exc
        if token is not None and self.token_transport == "header":
            headers.append(("Authorization", f"Bearer {token}"))
        elif token is not None:
            url = _with_token(url, token)
        ws = await ws_connect(
            url,
            subprotocols=[protocol],
            max_queue=self.max_queue,
            ssl=self.ssl,
            extra_headers=headers,
        )
        try:
            welcome = self._decode(await ws.recv(timeout_s=self.request_timeout_s))
            if welcome.get("op") != "welcome":
                raise ClientError("bad_request", f"expected a welcome frame, got {welcome!r:.100}")
        except BaseException:
            await ws.close()
            raise
        self._ws = ws
        self.worker = welcome.get("worker")
        self.client_id = welcome.get("client")
        reader = asyncio.get_running_loop().create_task(self._read(ws))
        topics = [topic for topic, sub in self.subscriptions.items() if sub._acked]
        try:
            # Every resubscription at once; the reader applies each ack in frame order.
            sent = [
                self._send_request(self._subscribe_frame(topic), ws, resubscribe=True)
                for topic in topics
            ]
            await ws.drain()
            results = await asyncio.gather(
                *(self._await_reply(p, self.request_timeout_s) for p in sent),
                return_exceptions=True,
            )
            failure = self._resubscribe_failures(topics, results)
            if failure is not None:
                raise failure
        except BaseException:
            reader.cancel()
            self._ws = None
            self._connection_lost(ws, errors.CLOSE_ABNORMAL)
            await ws.close()
            raise
        self._reader = reader
        self._set_state("open", None)
        self._open.set()

    def _resubscribe_failures(self, topics: list[str], results: list[Any]) -> BaseException | None:
        """A refused resubscription ends its subscription (the error is raised by its
        `get()`), unless the refusal passes (`unavailable`, a timeout, a lost connection):
        then the whole attempt fails and is retried with backoff."""
        retry: BaseException | None = None
        for topic, result in zip(topics, results, strict=True):
            if not isinstance(result, BaseException):
                continue
            if isinstance(result, ClientError) and result.code != NOT_PUBLISHED_CODE:
                sub = self.subscriptions.pop(topic, None)
                self.positions.pop(topic, None)
                if sub is not None:
                    sub._finish(result, by_application=False)
                continue
            retry = result
        return retry

    async def _run(self) -> None:
        """Keep a connection: wait for the current one to end, then reconnect as the close
        code says (`CLOSE_CODE_POLICY`)."""
        attempt = 0
        while not self._closing:
            ws = self._ws
            if ws is not None and self._reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
                code = ws.close_code if ws.close_code is not None else errors.CLOSE_ABNORMAL
                self._ws = None
                self._reader = None
                self._open.clear()
                self.disconnects += 1
                self.last_close_code = code
                self._connection_lost(ws, code)
                if self._closing:
                    break
                self._set_state("disconnected", code)
                policy = reconnect_policy(code)
                if policy == "refresh" and not callable(self.token):
                    policy = "never"  # a fixed token cannot get any newer
                if not self.reconnect or policy == "never":
                    error = ConnectionClosedError(code, ws.close_reason)
                    self._end_everything(error, by_application=False)
                    self._set_state("closed", code)
                    return
                if policy == "now":
                    attempt = 0  # a draining server: another worker takes us at once
                    delay = 0.0
                elif policy == "refresh":  # at once with a fresh token; backoff if it recurs
                    delay = 0.0 if attempt == 0 else self._backoff(attempt)
                    attempt += 1
                else:
                    delay = self._backoff(attempt)
                    attempt += 1
            else:
                delay = self._backoff(attempt)
                attempt += 1
            await asyncio.sleep(delay)  # the reconnect delay (backoff is the point)
            try:
                await self._connect_once()
                attempt = 0
            except (OSError, HandshakeError, ClientError, ConnectionClosedError, TimeoutError) as e:
                self.last_error = e
                log.info("reconnect attempt %d failed: %s", attempt, e)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: random(0, min(max_delay_s, min_delay_s * 2^attempt))."""
        return random.uniform(0, min(self.max_delay_s, self.min_delay_s * 2 ** min(attempt, 52)))

    def _set_state(self, state: str, code: int | None) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state, code)

    def _connection_lost(self, ws: WebSocketClient, code: int) -> None:
        """Fail what waited for a reply on `ws` (`publish` turns that into its outcome)."""
        for req_id, pending in list(self._pending.items()):
            if pending.sent_on is ws:
                del self._pending[req_id]
                if not pending.waiter.done():
                    pending.waiter.set_exception(ConnectionClosedError(code, "connection lost"))

    def _end_everything(self, error: ConnectionClosedError, *, by_application: bool) -> None:
        """The client is done for good: subscriptions end, waiting requests fail."""
        if self._final is None:
            self._final = error
        for sub in self.subscriptions.values():
            sub._finish(error, by_application=by_application)
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.waiter.done():
                p.waiter.set_exception(error)
        self._open.set()  # wakes whatever waits for a connection: it gets `_final`

    # --- frames in (the reader: one task per connection, frames in order) --------------------

    async def _read(self, ws: WebSocketClient) -> None:
        try:
            await self._read_frames(ws)
        except Exception:  # a bug of ours: this connection ends, a new one recovers
            log.exception("pub/sub client: reading the connection failed")
            await ws.close(errors.CLOSE_INTERNAL_ERROR, "client error")

    async def _read_frames(self, ws: WebSocketClient) -> None:
        async for raw in ws:
            try:
                frame = self._decode(raw)
            except ValueError:
                log.warning("undecodable frame from server: %.100r", raw)
                continue
            op = frame.get("op")
            if op == "message":
                await self._on_message(frame)
            elif op == "refresh":
                self._start_refresh(ws)
            elif op == "gap":
                await self._on_gap(frame)
            elif op in ("ack", "error", "pong"):
                req_id = frame.get("id")
                pending = self._pending.get(req_id) if isinstance(req_id, int) else None
                if pending is None or pending.sent_on is not ws:
                    continue
                del self._pending[pending.id]
                if op == "ack" and pending.request.get("op") == "subscribe":
                    await self._on_subscribed(pending, frame)
                if not pending.waiter.done():
                    pending.waiter.set_result(frame)

    # --- connection tokens -----------------------------------------------------------------------

    async def _token(self) -> str | None:
        """The token for a connection attempt or a refresh: the fixed one, or the provider's."""
        source = self.token
        if source is None or isinstance(source, str):
            return source
        value = source()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str):
            raise TypeError(f"the token provider returned {type(value).__name__}, not a string")
        return value

    def _start_refresh(self, ws: WebSocketClient) -> None:
        """The server asked for a new token: send one (in the background, so frames keep
        flowing), once at a time."""
        if not callable(self.token):
            log.warning("the server asks for a new token, but the client has a fixed one")
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh(ws))

    async def _refresh(self, ws: WebSocketClient) -> None:
        try:
            token = await self._token()
            pending = self._send_request({"op": "refresh", "token": token}, ws)
            await ws.drain()
            await self._await_reply(pending, self.request_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the server closes 4001 at exp; we reconnect from there
            self.last_error = exc
            log.warning("token refresh failed: %s", exc)
            return
        self.token_refreshes += 1

    async def _on_message(self, frame: dict[str, Any]) -> None:
        topic = frame.get("topic", "")
        sub = self.subscriptions.get(topic)
        if sub is None:
            return
        offset, epoch = frame.get("offset"), frame.get("epoch")
        if _is_position(offset, epoch):
            last = self.positions.get(topic)
            if last is not None and last[1] == epoch and offset <= last[0]:
                self.duplicates_dropped += 1  # seen already (the server should never send it)
                return
            self.positions[topic] = (offset, epoch)
        await sub._put(Message(topic, frame.get("data"), offset, epoch))

    async def _on_gap(self, frame: dict[str, Any]) -> None:
        topic = frame.get("topic", "")
        sub = self.subscriptions.get(topic)
        if sub is None:
            return
        first, last_missing, epoch = frame.get("from"), frame.get("to"), frame.get("epoch")
        position = self.positions.get(topic)
        if not isinstance(epoch, str):
            epoch = position[1] if position is not None else None
        if _is_position(last_missing, epoch):
            # What follows continues at to + 1 (never moved backwards within an epoch).
            if position is None or position[1] != epoch or last_missing > position[0]:
                self.positions[topic] = (last_missing, epoch)
            reason = f"announced by the server: offsets {first}..{last_missing} of epoch {epoch}"
        elif isinstance(first, int):
            reason = f"announced by the server: epoch {epoch} ended, offsets from {first} missing"
        else:
            reason = "announced by the server: messages may be missing"
        await sub._put(Gap(frozenset((topic,)), reason))

    async def _on_subscribed(self, pending: _Pending, ack: dict[str, Any]) -> None:
        """A subscribe ack: the position the subscription starts from; a Gap for a break
        (a resubscription, or a `since`, that did not recover exactly from its position)."""
        topic = pending.request["topic"]
        sub = self.subscriptions.get(topic)
        if sub is None:
            return
        sub._acked = True
        since = pending.request.get("since")
        offset, epoch = ack.get("offset"), ack.get("epoch")
        if _is_position(offset, epoch):
            self.positions[topic] = (offset, epoch)
        else:
            self.positions.pop(topic, None)
        if since is None and not pending.resubscribe:
            return  # a first subscription: messages from now on, nothing was missed
        if since is None:
            reason = "not recovered after reconnect: the topic has no history"
        elif ack.get("recovered") is True and (offset, epoch) == (since["offset"], since["epoch"]):
            return  # every missed message follows
        else:
            reason = "not recovered after reconnect"
        await sub._put(Gap(frozenset((topic,)), reason))

    # --- requests out --------------------------------------------------------------------------

    def _subscribe_frame(self, topic: str) -> dict[str, Any]:
        request: dict[str, Any] = {"op": "subscribe", "topic": topic}
        position = self.positions.get(topic)
        if position is not None:
            request["since"] = {"offset": position[0], "epoch": position[1]}
        return request

    def _decode(self, raw: str | bytes) -> dict[str, Any]:
        obj = msgpack_loads(raw) if isinstance(raw, bytes) else json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("frame is not a map")
        return obj

    def _encode(self, obj: dict[str, Any]) -> str | bytes:
        return msgpack_dumps(obj) if self.binary else json.dumps(obj, separators=(",", ":"))

    def _send_request(
        self, request: dict[str, Any], ws: WebSocketClient, *, resubscribe: bool = False
    ) -> _Pending:
        """Write a request now and register it (ConnectionClosedError: it was not written)."""
        req_id = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        ws.send_nowait(self._encode({**request, "id": req_id}))
        pending = self._pending[req_id] = _Pending(req_id, request, waiter, ws, resubscribe)
        return pending

    async def _await_reply(self, pending: _Pending, timeout_s: float) -> dict[str, Any]:
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                reply = await pending.waiter
        finally:
            if self._pending.get(pending.id) is pending:
                del self._pending[pending.id]
        if reply.get("op") == "error":
            code, reason = str(reply.get("code")), str(reply.get("reason"))
            raise _reply_error(str(pending.request.get("op")), code, reason, reply.get("id"))
        return reply

    async def _wait_open(self, timeout_s: float) -> WebSocketClient:
        """The open connection (TimeoutError after `timeout_s`; the final error once the
        client ended)."""
        async with asyncio.timeout(max(timeout_s, 0.0)):
            while True:
                await self._open.wait()
                if self._final is not None:
                    raise self._final
                if self._ws is not None:
                    return self._ws
                self._open.clear()

    async def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        """A request other than publish: waits for the connection, then for the reply."""
        async with self._in_flight:
            deadline = time.monotonic() + self.request_timeout_s
            ws = await self._wait_open(self.request_timeout_s)
            pending = self._send_request(request, ws)
            await ws.drain()
            return await self._await_reply(pending, deadline - time.monotonic())

    async def _publish(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send a publish once; with a key, re-send it (same key) after a lost connection or
        a bus error, until it has an answer or `request_timeout_s` has passed."""
        keyed = "key" in request
        async with self._in_flight:
            deadline = time.monotonic() + self.request_timeout_s
            attempt = 0
            sent = False
            while True:
                try:
                    ws = await self._wait_open(deadline - time.monotonic())
                except TimeoutError:
                    if sent:
                        raise PublishOutcomeUnknown(
                            OUTCOME_UNKNOWN_CODE, "sent, then no answer within request_timeout_s"
                        ) from None
                    raise NotPublished(
                        NOT_PUBLISHED_CODE, "not connected within request_timeout_s: not sent"
                    ) from None
                except ConnectionClosedError as exc:
                    if sent:
                        raise PublishOutcomeUnknown(
                            OUTCOME_UNKNOWN_CODE, f"sent, then the client ended ({exc.code})"
                        ) from exc
                    raise
                try:
                    pending = self._send_request(request, ws)
                except ConnectionClosedError:
                    continue  # not written: wait for the next connection
                sent = True
                try:
                    await ws.drain()
                    return await self._await_reply(pending, deadline - time.monotonic())
                except ConnectionClosedError as exc:
                    if not keyed or self._final is not None:
                        raise PublishOutcomeUnknown(
                            OUTCOME_UNKNOWN_CODE,
                            f"the connection closed ({exc.code}) before the server answered",
                        ) from exc
                    # keyed: re-sent with the same key once connected again
                except TimeoutError:
                    raise PublishOutcomeUnknown(
                        OUTCOME_UNKNOWN_CODE, "sent, then no answer within request_timeout_s"
                    ) from None
                except (NotPublished, PublishOutcomeUnknown):
                    delay = self._backoff(attempt)
                    attempt += 1
                    if not keyed or time.monotonic() + delay >= deadline:
                        raise
                    await asyncio.sleep(delay)  # backoff before the keyed retry

    # --- the API -----------------------------------------------------------------------------

    async def subscribe(self, topic: str, *, max_queue: int | None = None) -> Subscription:
        """Subscribe; returns once the server acknowledged it (messages from then on).
        `max_queue`: this subscription's bound (default: the client's `max_queue`)."""
        sub = self.subscriptions.get(topic)
        if sub is not None:
            return sub
        sub = Subscription(topic, max_queue or self.max_queue, _client=self)
        self.subscriptions[topic] = sub
        try:
            await self._request(self._subscribe_frame(topic))
        except BaseException:
            if self.subscriptions.get(topic) is sub:
                del self.subscriptions[topic]
                self.positions.pop(topic, None)
            raise
        return sub

    async def unsubscribe(self, topic: str) -> None:
        sub = self.subscriptions.pop(topic, None)
        self.positions.pop(topic, None)
        if sub is not None:
            sub._finish(
                ConnectionClosedError(errors.CLOSE_NORMAL, "unsubscribed"), by_application=True
            )
        if self._ws is not None:
            await self._request({"op": "unsubscribe", "topic": topic})

    async def publish(self, topic: str, data: Any, *, key: str | None = None) -> dict[str, Any]:
        """Publish; returns the server's ack (with `offset`/`epoch` on topics with history).

        Raises `NotPublished` (it did not happen: a retry is safe), `PublishOutcomeUnknown`
        (it may have happened: retry only with the same `key`), or `ClientError` with the
        server's code. Without a key nothing is retried. With a `key` (an idempotency key,
        1..64 characters) a lost connection, `unavailable` or `outcome_unknown` is retried
        with the same key within `request_timeout_s`."""
        request: dict[str, Any] = {"op": "publish", "topic": topic, "data": data}
        if key is not None:
            request["key"] = key
        return await self._publish(request)

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
        for task in (self._runner, self._reader, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._end_everything(
            ConnectionClosedError(errors.CLOSE_NORMAL, "client closed"), by_application=True
        )
        self.state = "closed"

    async def __aenter__(self) -> PubSubClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _is_position(offset: Any, epoch: Any) -> bool:
    return isinstance(offset, int) and not isinstance(offset, bool) and isinstance(epoch, str)


def _with_token(url: str, token: str | None) -> str:
    if token is None:
        return url
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    return urlunsplit(parts._replace(query=query + urlencode({"token": token})))


async def connect(
    url: str,
    *,
    token: TokenSource | None = None,
    token_transport: str = "query",
    encoding: str = "json",
    reconnect: bool = True,
    min_delay_s: float = 0.1,
    max_delay_s: float = 10.0,
    request_timeout_s: float = 10.0,
    on_state: Callable[[str, int | None], None] | None = None,
    max_queue: int = 1000,
    max_in_flight: int = 1000,
    ssl: SSLContext | None = None,
) -> PubSubClient:
    """Connect (the first attempt's error is raised) and keep the connection from then on.

    `max_queue`: items a subscription holds before the client stops reading the socket;
    `max_in_flight`: requests waiting for a reply at once (more wait for room); `ssl`: for a
    wss:// URL, the context that checks the server's certificate (None: the system's CAs);
    `token`: a connection token, or a function (sync or async) returning a fresh one, asked
    at every connection attempt and whenever the server asks for a refresh;
    `token_transport`: "query" (the `token` query parameter) or "header" (Bearer)."""
    client = PubSubClient(
        url,
        token=token,
        token_transport=token_transport,
        encoding=encoding,
        reconnect=reconnect,
        min_delay_s=min_delay_s,
        max_delay_s=max_delay_s,
        request_timeout_s=request_timeout_s,
        on_state=on_state,
        max_queue=max_queue,
        max_in_flight=max_in_flight,
        ssl=ssl,
    )
    await client._connect_once()
    client._runner = asyncio.get_running_loop().create_task(client._run())
    return client
