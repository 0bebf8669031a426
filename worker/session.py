"""One client's pub/sub session on a worker: requests in, replies and messages out.

Requests are handled in the order they arrive: one that must wait (a subscribe waiting for
the bus, an application hook, a `refresh` whose token's key needs a JWKS load) holds the
ones behind it in a small queue, so a client that subscribes and then publishes receives
its own message. Publishes no hook transforms are pipelined: each enters the bus in
request order and its ack follows when Redis answers.

Everything the client receives goes through the session's `Outbox` (worker/outbox.py), in
the order decided here and in the hub; subscribing, recovering and repairing are the hub's
job (worker/hub.py). Outcomes, in one place each:
- a publish over the connection's token bucket (`publish_rate_per_s`, `publish_burst`) →
  an `error` with `rate_limited` and `retry_after` (seconds); never counted, never a close;
- a request the topic rules or the connection token do not allow (broker/auth.py) → an
  `error` with `forbidden`; never counted, never a close (see `_UNCOUNTED`);
- a connection token near its `exp` → `{"op":"refresh"}` `token_refresh_margin_s` ahead; a
  `refresh` request with a valid token for the same `sub` replaces the claims; none by
  exp (+ `jwt_leeway_s`) → close 4001;
- a request the protocol rejects → an `error` reply; more than `max_errors_per_window` of
  them within `error_window_s` → close 1008. Bus trouble (`unavailable`, `outcome_unknown`)
  is not the client's fault: it never counts toward that flood and never closes;
- an unexpected exception while handling a request → close 1011, this connection only;
- a client too slow to read → its outbox closes it with 1013;
- the connection closing → publishes not yet written to Redis are dropped (cancelled), not
  run later; every subscription leaves the hub.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker import auth, errors
from broker.bus import Published
from broker.envelope import BusMessage
from broker.errors import BusError, BusOutcomeUnknown, ClientError
from broker.tasks import spawn
from broker.token_bucket import TokenBucket
from worker import wire
from worker.dashboard import check_reserved_topic, presents_api_key
from worker.outbox import Outbox

if TYPE_CHECKING:
    from worker.broker_app import BrokerApp
    from worker.protocol import WebSocket

log = logging.getLogger("redwire.session")
_ids = itertools.count(1)
_PROCESS_TAG = secrets.token_hex(3) + "."
# Shortest pause of a connection's reading after a rate_limited refusal: at 10,000
# publishes/s a token comes every 0.1 ms, and pausing that often would cost more than it saves.
RATE_PAUSE_S = 0.05


def bus_error(exc: BusError, what: str) -> ClientError:
    """The client-facing error for a bus failure: not done, or outcome unknown."""
    if isinstance(exc, BusOutcomeUnknown):
        return ClientError(
            wire.OUTCOME_UNKNOWN, f"{what}: outcome unknown (Redis did not answer in time)"
        )
    return ClientError(wire.UNAVAILABLE, f"{what}: the bus is unavailable")


class ClientSession:
    __slots__ = (
        "_bucket",
        "_drained",
        "_error_times",
        "_inflight",
        "_queue",
        "_token_timers",
        "admin",
        "app",
        "auth",
        "browser",
        "codec",
        "id",
        "live",
        "outbox",
        "topics",
        "variant",
        "ws",
    )

    def __init__(self, app: BrokerApp, ws: WebSocket) -> None:
        self.app = app
        self.ws = ws
        # Unique across worker restarts too: presence and logs must not mix two clients.
        self.id = f"{app.worker_id}-{_PROCESS_TAG}{next(_ids)}"
        s = app.settings
        self.codec = wire.WireCodec(
            ws.subprotocol,
            max_topic_bytes=s.max_topic_bytes,
            max_data_bytes=s.max_data_bytes,
            max_data_depth=s.max_data_depth,
        )
        self.variant = (self.codec.binary, ws.compress_key)
        self.outbox = Outbox(
            ws,
            app.hub.flusher,
            max_bytes=s.max_send_buffer_bytes,
            high_water=s.write_buffer_high_bytes,
            on_overflow=self._slow_consumer,
            variant=self.variant,
        )
        ws.on_writable = self.outbox.writable
        self.topics: set[str] = set()
        # The verified connection token (broker/auth.py; replaced by a `refresh`), and
        # whether the upgrade came from a browser (it carried Origin): for the topic rules.
        self.auth: auth.Auth = getattr(ws, "auth", None) or auth.ANONYMOUS
        request = getattr(ws, "request", None)
        self.browser = request is not None and request.header("Origin") is not None
        self._token_timers: tuple[asyncio.TimerHandle, ...] = ()
        # Presented the API key (`key` query parameter or the dashboard cookie): may
        # subscribe to reserved `$sys.` topics (worker/dashboard.py). None: not asked yet.
        self.admin: bool | None = None
        self.live = True
        self._queue: deque[Any] | None = None
        self._error_times: deque[float] | None = None
        self._inflight: set[asyncio.Future[Published]] = set()  # pipelined publishes
        self._drained: asyncio.Future[None] | None = None
        self._bucket = (
            None
            if s.publish_rate_per_s is None
            else TokenBucket(s.publish_rate_per_s, s.publish_burst)
        )
        app.stats.connections += 1
        app.stats.connections_accepted += 1
        self.send_control(
            {
                "op": "welcome",
                "version": wire.PROTOCOL_VERSION,
                "client": self.id,
                "worker": app.worker_id,
                "heartbeat": {
                    "interval": s.heartbeat_interval_s,
                    "timeout": s.heartbeat_timeout_s,
                },
            }
        )
        self._schedule_token()

    @property
    def identity(self) -> Any:
        """What the application's on_connect hook returned for this client."""
        return self.ws.identity

    # --- writing -----------------------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Queue one message (text for str, binary for bytes) in order."""
        if self.live:
            frame = self.ws.frame(data)
            if frame is not None:
                self.outbox.push(frame)

    def send_control(self, obj: dict[str, Any]) -> None:
        """Queue a protocol frame (ack, error, gap, join, ...) in order."""
        if self.live:
            self.send(self.codec.encode(obj))

    def _slow_consumer(self) -> None:
        self.live = False
        self.app.stats.slow_consumer_closes += 1
        log.info("closing slow consumer %s (1013)", self.id)

    def close(self, code: int, reason: str = "") -> None:
        """Write what is queued, then close with `code`."""
        self.live = False
        self.outbox.close(code, reason)

    def flush(self) -> None:
        """The peer closed: what is queued for it leaves now, before the close reply."""
        self.outbox.flush()

    @property
    def keeps_alive(self) -> bool:
        """Not idle whatever the peer sends: subscribed, or a request still being answered."""
        return bool(self.topics) or bool(self._inflight) or self._queue is not None

    def close_idle(self) -> None:
        """idle_timeout_s passed with nothing from the client and nothing to keep: 1008."""
        if self.live:
            self.app.stats.idle_closes += 1
            log.info("closing idle client %s (1008)", self.id)
            self.close(errors.CLOSE_POLICY_VIOLATION, "idle")

    def fail(self) -> None:
        """Something unexpected happened on our side: close 1011 (no detail on the wire)."""
        if self.live:
            self.close(errors.CLOSE_INTERNAL_ERROR)

    # --- requests ----------------------------------------------------------------------------

    def on_message(self, data: str | bytes) -> None:
        self.app.stats.frames_in += 1
        if not self.live:
            return
        queue = self._queue
        if queue is not None:
            queue.append(data)
            if len(queue) >= self.app.settings.max_queued_requests:
                self.ws.hold_input("requests")  # stop reading until the queue drains
            return
        self._handle(data)

    def _handle(self, data: str | bytes) -> None:
        try:
            request = self.codec.decode(data)
        except ClientError as exc:
            self._reply_error(exc.request_id, exc)
            return
        op = request.op
        # Reserved `$sys.` topics answer to the API key alone (worker/dashboard.py), not to
        # the topic rules and token claims below.
        topic = request.topic
        reserved = topic is not None and topic.startswith(wire.SYS_PREFIX)
        if reserved and topic is not None:
            if self.admin is None:  # looked up once, when first needed
                self.admin = presents_api_key(self.app.settings.api_key, self.ws.request)
            try:
                check_reserved_topic(op, topic, self.admin)
            except ClientError as exc:  # forbidden: as the auth rules below, never counted
                self.app.stats.forbidden += 1
                self._reply_error(request.id, exc, counted=False)
                return
        if op == "publish" and self._bucket is not None:
            wait_s = self._bucket.take()
            if wait_s > 0:
                self._rate_limited(request.id, wait_s)
                return
        if op in ("subscribe", "publish", "presence") and not reserved:
            assert request.topic is not None
            denied = self._denied(op, request.topic)
            if denied is not None:
                self.app.stats.forbidden += 1
                self._reply_error(request.id, ClientError(wire.FORBIDDEN, denied), counted=False)
                return
        if op == "ping":
            self.send_control({"op": "pong", "id": request.id})
        elif op == "unsubscribe":
            assert request.topic is not None
            if request.topic in self.topics:
                self._leave(request.topic)
            self._ack(request.id)
        elif op == "publish" and self.app.hooks.publish_untouched:
            self._publish_pipelined(request)
        else:
            # The others may wait (bus, hooks, a JWKS load): hold later requests until done.
            self._queue = deque()
            task = spawn(self._run_async(request), name="request")
            task.add_done_callback(self._async_done)

    async def _run_async(self, request: wire.Request) -> None:
        try:
            if request.op == "subscribe":
                await self._subscribe(request)
            elif request.op == "publish":
                await self._publish(request)
            elif request.op == "refresh":
                await self._refresh(request)
            else:
                await self._presence(request)
        except ClientError as exc:
            self._reply_error(request.id, exc, counted=exc.code not in _UNCOUNTED)
        queue, self._queue = self._queue, None
        while queue and self._queue is None and self.live:
            self._handle(queue.popleft())
        if queue and self._queue is not None:
            self._queue.extend(queue)
        if self._queue is None or len(self._queue) < self.app.settings.max_queued_requests:
            self.ws.release_input("requests")
        self._check_drained()

    def _async_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # logged by spawn
            self.fail()

    async def _subscribe(self, request: wire.Request) -> None:
        topic = request.topic
        assert topic is not None
        since = _since(request.options)
        if topic in self.topics:
            self._ack(request.id)
            return
        app = self.app
        if len(self.topics) >= app.settings.max_subscriptions_per_connection:
            raise ClientError(wire.TOO_MANY_SUBSCRIPTIONS, "subscription limit reached")
        await app.hooks.on_subscribe(self, topic)
        if not self.live:
            return
        try:
            fields = await app.hub.subscribe(self, topic, since)
        except BusError as exc:
            raise bus_error(exc, "not subscribed") from None
        if fields is None:  # we went away meanwhile
            return
        # Nothing ran since the hub registered us: the ack precedes every message it covers.
        self.topics.add(topic)
        app.stats.subscriptions += 1
        self._ack(request.id, **fields)
        rule = app.settings.rule_for(topic)
        if rule is not None and rule.presence:
            await self._presence_add(topic)

    async def _presence_add(self, topic: str) -> None:
        info = {"worker": self.app.worker_id, "identity": _jsonable_identity(self.identity)}
        try:
            await self.app.bus.presence_add(topic, self.id, info)
        except BusError as exc:
            log.warning("presence of %s on %s not recorded: %s", self.id, topic, exc)

    def _leave(self, topic: str) -> None:
        self.topics.discard(topic)
        self.app.hub.unsubscribe(self, topic)
        self.app.stats.subscriptions -= 1
        rule = self.app.settings.rule_for(topic)
        if rule is not None and rule.presence:
            self.app.spawn(self._presence_remove(topic))

    async def _presence_remove(self, topic: str) -> None:
        try:
            await self.app.bus.presence_remove(topic, self.id)
        except BusError as exc:  # the entry expires with this worker's heartbeat instead
            log.info("presence of %s on %s not removed: %s", self.id, topic, exc)

    async def _presence(self, request: wire.Request) -> None:
        topic = request.topic
        assert topic is not None
        rule = self.app.settings.rule_for(topic)
        if rule is None or not rule.presence:
            raise ClientError(wire.NOT_ENABLED, f"presence is not enabled for {topic}")
        try:
            clients = await self.app.bus.presence(topic)
        except BusError as exc:
            raise bus_error(exc, "no presence") from None
        self._ack(request.id, clients=clients)

    def _publish_pipelined(self, request: wire.Request) -> None:
        """A publish no hook transforms: hand it to the bus now and go on with the next
        request; the bus keeps the order, the ack follows when Redis answers. At most
        `max_publishes_in_flight` are in flight, then reading stops until some are answered."""
        assert request.topic is not None and request.payload is not None
        try:
            key = _idempotency_key(request.options)
        except ClientError as exc:
            self._reply_error(request.id, exc)
            return
        message = BusMessage(
            request.topic, request.payload, self.codec.encoding, self.app.worker_id
        )
        req_id = request.id

        def settled(done: asyncio.Future[Published]) -> None:
            self._published(req_id, done)

        task = self.app.bus.publish_nowait(message, key=key, settled=settled)
        inflight = self._inflight
        inflight.add(task)
        if len(inflight) >= self.app.settings.max_publishes_in_flight:
            self.ws.hold_input("publishes")
        task.add_done_callback(settled)  # the bus may call `settled` sooner: handled once

    def _published(self, req_id: Any, done: asyncio.Future[Published]) -> None:
        inflight = self._inflight
        if done not in inflight:
            return  # handled already (the bus' `settled`, then the done callback)
        inflight.discard(done)
        if len(inflight) < self.app.settings.max_publishes_in_flight:
            self.ws.release_input("publishes")
        if done.cancelled():
            return
        exc = done.exception()
        if isinstance(exc, BusError):
            self.app.stats.publish_errors += 1
            self._reply_error(req_id, bus_error(exc, "not published"), counted=False)
        elif exc is not None:
            log.error("publish failed", exc_info=exc)
            self._reply_error(req_id, ClientError(wire.INTERNAL, "internal error"))
        else:
            self._ack_published(req_id, done.result())
        self._check_drained()

    async def _publish(self, request: wire.Request) -> None:
        assert request.topic is not None and request.payload is not None
        key = _idempotency_key(request.options)
        payload = await self.app.hooks.transform_publish(self, request)
        message = BusMessage(request.topic, payload, self.codec.encoding, self.app.worker_id)
        try:
            published = await self.app.bus.publish(message, key=key)
        except BusError as exc:
            self.app.stats.publish_errors += 1
            raise bus_error(exc, "not published") from None
        self._ack_published(request.id, published)

    def _ack_published(self, req_id: Any, published: Published) -> None:
        self.app.stats.publishes += 1
        fields: dict[str, Any] = {}
        if published.offset is not None:
            fields.update(offset=published.offset, epoch=published.epoch)
        if published.duplicate:
            fields["duplicate"] = True
        self._ack(req_id, **fields)

    def _ack(self, req_id: Any, **fields: Any) -> None:
        if req_id is not None:
            self.send_control({"op": "ack", "id": req_id, **fields})

    def _rate_limited(self, req_id: Any, wait_s: float) -> None:
        """Refuse a publish over the bucket: the client's pace, not a bad request, so it
        never counts toward the error flood and never closes. The connection is then not
        read until a token is there (at least RATE_PAUSE_S): what a flooding client sends
        meanwhile waits in its own socket instead of costing the worker one refusal each."""
        if not self.live:
            return
        self.ws.hold_input_for("rate", max(wait_s, RATE_PAUSE_S))
        self.app.stats.rate_limited += 1
        reply: dict[str, Any] = {
            "op": "error",
            "code": wire.RATE_LIMITED,
            "reason": "publish rate limit reached",
            "retry_after": max(round(wait_s, 3), 0.001),
        }
        if req_id is not None:
            reply["id"] = req_id
        self.send_control(reply)

    def _reply_error(self, req_id: Any, exc: ClientError, *, counted: bool = True) -> None:
        if not self.live:
            return
        stats = self.app.stats
        stats.client_errors += 1
        self.send(self.codec.error(req_id, exc.code, exc.reason))
        if not counted:
            return
        # Too many errors in a window: the client is broken or hostile (close 1008).
        s = self.app.settings
        now = time.monotonic()
        times = self._error_times
        if times is None:
            times = self._error_times = deque()
        times.append(now)
        while times and times[0] < now - s.error_window_s:
            times.popleft()
        if len(times) > s.max_errors_per_window:
            stats.error_flood_closes += 1
            self.close(errors.CLOSE_POLICY_VIOLATION, "too many errors")

    # --- connection token and permissions (broker/auth.py) --------------------------------------

    def may(self, action: str, topic: str) -> bool:
        """Whether the topic rules and the token allow `action` on `topic`."""
        return self._denied(action, topic) is None

    def _denied(self, action: str, topic: str) -> str | None:
        """Why the topic rules and the token forbid `action` on `topic`; None: allowed."""
        rule = self.app.settings.rule_for(topic)
        return auth.permission(rule, self.auth, action, topic, browser=self.browser)

    async def _refresh(self, request: wire.Request) -> None:
        """A `refresh` request: a new token for the same `sub` replaces the claims (a token
        signed with a key rotated in since the last JWKS load waits for one more load)."""
        if getattr(self.app, "verifier", None) is None:
            self._reply_error(
                request.id, ClientError(wire.NOT_ENABLED, "this server takes no tokens")
            )
            return
        token = (request.options or {}).get("token", "")
        try:
            new = await self.app.verify_token(token)
        except auth.InvalidToken as exc:
            if exc.status == 503:  # the JWKS is not loaded yet: our trouble, not the client's
                error = ClientError(wire.UNAVAILABLE, exc.reason)
                self._reply_error(request.id, error, counted=False)
            else:
                self._reply_error(request.id, ClientError(wire.UNAUTHORIZED, exc.reason))
            return
        if not self.live:
            return  # closed while a JWKS load ran
        if new.subject != self.auth.subject:
            reason = "the new token is for another sub: connect again with it"
            self._reply_error(request.id, ClientError(wire.UNAUTHORIZED, reason))
            return
        self.auth = new
        self.app.stats.token_refreshes += 1
        for topic in sorted(self.topics):  # a narrower token: leave what it no longer allows
            if topic.startswith(wire.SYS_PREFIX):
                continue  # reserved topics answer to the API key, not to the token
            denied = self._denied("subscribe", topic)
            if denied is not None:
                self._leave(topic)
                reply = {"op": "error", "code": wire.FORBIDDEN, "topic": topic}
                self.send_control({**reply, "reason": f"{denied}: unsubscribed"})
        self._schedule_token()
        fields = {} if new.expires_at is None else {"expires_in": self._expires_in()}
        self._ack(request.id, **fields)

    def _expires_in(self) -> float:
        exp = self.auth.expires_at
        return 0.0 if exp is None else round(max(exp - time.time(), 0.0), 1)

    def _schedule_token(self) -> None:
        """Timers for the token's exp: ask for a new one `token_refresh_margin_s` ahead (at
        most half the time left, so tokens shorter than the margin do not make a refresh
        loop), close 4001 at exp + `jwt_leeway_s` (the leeway a connecting token gets too)."""
        self._cancel_token_timers()
        exp = self.auth.expires_at
        if exp is None:
            return
        s = self.app.settings
        until_exp = exp - time.time()
        ahead_s = min(s.token_refresh_margin_s, until_exp / 2)
        loop = asyncio.get_running_loop()
        self._token_timers = (
            loop.call_later(max(until_exp - ahead_s, 0.0), _guarded, self._ask_refresh),
            loop.call_later(max(until_exp + s.jwt_leeway_s, 0.0), _guarded, self._token_expired),
        )

    def _cancel_token_timers(self) -> None:
        for timer in self._token_timers:
            timer.cancel()
        self._token_timers = ()

    def _ask_refresh(self) -> None:
        if self.live:
            self.send_control({"op": "refresh", "expires_in": self._expires_in()})

    def _token_expired(self) -> None:
        if self.live:
            self.app.stats.token_expired_closes += 1
            log.info("closing %s: token expired (4001)", self.id)
            self.close(errors.CLOSE_TOKEN_EXPIRED, "token expired: get a new token, then reconnect")

    # --- draining and closing ----------------------------------------------------------------

    async def drain(self) -> None:
        """Answer what the client sent before the drain closes it: requests in flight, queued,
        read but not handed over, and those its socket still holds (read as answers free
        the publishes-in-flight cap). Done once it is all answered and nothing more came for
        two turns of the loop; the caller bounds the wait (a client that keeps sending is
        closed when it runs out), so no publish already sent loses its ack."""
        ws = self.ws
        quiet_turns = 0
        while self.live:
            if self._inflight or self._queue is not None:
                quiet_turns = 0
                self._drained = asyncio.get_running_loop().create_future()
                await self._drained
            elif ws.input_pending:  # requests read but not handed over: a slice a turn
                quiet_turns = 0
                await asyncio.sleep(0)
            elif quiet_turns < 2:
                # Idle for now; a socket read let go by an answer (the publishes-in-flight
                # cap) is handled on the next turns: look again before calling it done.
                quiet_turns += 1
                await asyncio.sleep(0)
            else:
                return

    def _check_drained(self) -> None:
        waiter = self._drained
        if waiter is not None and not self._inflight and self._queue is None:
            self._drained = None
            if not waiter.done():
                waiter.set_result(None)

    def on_close(self, code: int, reason: str) -> None:
        self.live = False
        self._cancel_token_timers()
        self.outbox.lost()
        self.app.stats.connections -= 1
        for task in list(self._inflight):
            task.cancel()  # not written to Redis yet: dropped, never run later
        for topic in list(self.topics):
            self._leave(topic)
        self.app.sessions.discard(self)
        waiter = self._drained
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_BUS_CODES = frozenset((wire.UNAVAILABLE, wire.OUTCOME_UNKNOWN))
# Error replies that never count toward the error flood (`max_errors_per_window`): the bus'
# trouble, and `forbidden`. A denial answers a well-formed request about a topic the client
# may not use; a legitimate client meets it in bulk (resubscribing after a refresh narrowed
# its claims, a stream of publishes to a read-only topic), and counting it would turn a
# permission answer into a 1008 close after which the clients never reconnect. Answering one
# costs no more than an ack, and publishes stay bounded by the rate limit checked first.
_UNCOUNTED = _BUS_CODES | {wire.FORBIDDEN}


def _guarded(callback: Callable[[], None]) -> None:
    """A timer callback: what it raises is logged, never the loop's problem."""
    try:
        callback()
    except Exception:
        log.exception("session timer %s failed", getattr(callback, "__name__", callback))


def _since(options: dict[str, Any] | None) -> tuple[int, str] | None:
    """The `since` of a subscribe request: (offset, epoch), or None; ClientError if bad."""
    since = (options or {}).get("since")
    if since is None:
        return None
    if not isinstance(since, dict):
        raise ClientError(wire.BAD_REQUEST, "since must be an object {offset, epoch}")
    offset, epoch = since.get("offset"), since.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**63:
        raise ClientError(wire.BAD_REQUEST, "since.offset must be an integer >= 0")
    if not isinstance(epoch, str) or len(epoch) > 64:
        raise ClientError(wire.BAD_REQUEST, "since.epoch must be a string")
    return offset, epoch


def _idempotency_key(options: dict[str, Any] | None) -> str | None:
    key = (options or {}).get("key")
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= 64:
        raise ClientError(wire.BAD_REQUEST, "key must be a string of 1 to 64 characters")
    return key


def _jsonable_identity(identity: Any) -> Any:
    """The connect hook's identity as presence info (JSON-safe; repr() otherwise)."""
    if identity is None or isinstance(identity, str | int | float | bool | list | dict):
        return identity
    return repr(identity)
