"""The broker application a worker serves: sessions over the hub and bus, HTTP routes.

`BrokerApp` implements `worker.protocol.ServerApp`: WebSocket upgrades become
`ClientSession`s (after the connection token, broker/auth.py, and the application's
`on_connect` hook); plain HTTP requests go to `worker.http_routes`. It owns the worker's
bus, hub, stats, metrics, hooks and token verifier (with its JWKS refresher, worker/jwks.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from broker import auth
from broker.bus import Bus, make_bus
from broker.errors import HandshakeError
from broker.handshake import Request
from broker.settings import Settings
from broker.tasks import spawn
from worker import http_routes, metrics_listener, wire
from worker.dashboard import StatsPublisher, presents_api_key
from worker.hooks import Hooks, load_object
from worker.hub import Hub
from worker.jwks import JwksRefresher
from worker.metrics import Metrics
from worker.protocol import WebSocket
from worker.server import ConnectionLimits, InputBudget
from worker.session import ClientSession
from worker.stats import WorkerStats

log = logging.getLogger("redwire.worker")


class BrokerApp:
    subprotocols = wire.SUBPROTOCOLS
    default_subprotocol = wire.SUBPROTOCOL_JSON

    def __init__(self, settings: Settings, *, worker_id: str, bus: Bus | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.stats = WorkerStats()
        self.bus = bus if bus is not None else make_bus(settings, origin=f"worker-{worker_id}")
        self.hub = Hub(self.bus, settings, self.stats)
        self.hooks = Hooks(load_object(settings.app) if settings.app else None)
        self.metrics = Metrics(worker_id, self.stats, self.bus.stats)
        self.sessions: set[ClientSession] = set()
        self.limits = ConnectionLimits(settings, self.stats)
        self.input_budget = InputBudget(settings, self.stats)  # read by worker.protocol
        self.verifier = auth.TokenVerifier.from_settings(settings)  # None: no JWT keys
        self._jwks: JwksRefresher | None = None
        if self.verifier is not None and settings.jwt_jwks:
            self._jwks = JwksRefresher(self.verifier, settings)
        self._metrics_timer: asyncio.TimerHandle | None = None
        # The dashboard's `$sys.stats` snapshots: only where the API key lets one see them.
        self.dashboard = StatsPublisher(self) if settings.api_key is not None else None
        self._metrics_listener: asyncio.AbstractServer | None = None  # on metrics_listen

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` in the background, kept referenced; a failure is logged, never lost."""
        return spawn(coro, name="worker")

    async def start(self) -> None:
        if self.settings.metrics_listen is not None:
            self._metrics_listener = await metrics_listener.start(self)
        await self.bus.start()
        if self._jwks is not None:
            await self._jwks.start()
        self._tick_metrics()
        if self.dashboard is not None:
            self.dashboard.start()

    async def stop(self) -> None:
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self._jwks is not None:
            self._jwks.stop()
        if self._metrics_listener is not None:
            self._metrics_listener.close()
        if self._metrics_timer is not None:
            self._metrics_timer.cancel()
        self.metrics.sync()
        await self.bus.close()

    def _tick_metrics(self) -> None:
        try:
            self.metrics.sync()
        except Exception:  # e.g. OSError writing the metrics files: the timer must go on
            log.exception("metrics sync failed")
        self._metrics_timer = asyncio.get_running_loop().call_later(1.0, self._tick_metrics)

    # --- ServerApp ---------------------------------------------------------------------------

    def refusal(self, target: str | None, error: HandshakeError) -> bytes:
        """The answer to a request the HTTP parser refused (JSON for `/publish`)."""
        return http_routes.refusal(target, error)

    async def http(self, request: Request) -> bytes:
        return await http_routes.handle(self, request)

    def admit(self, ip: str) -> Callable[[], None]:
        """A connection slot for a WebSocket from `ip`, or HandshakeError 503/429."""
        return self.limits.admit(ip)

    async def authorize(self, request: Request) -> Any:
        return (await self.authenticate(request))[0]

    async def authenticate(self, request: Request) -> tuple[Any, auth.Auth]:
        """(identity, Auth) for an upgrade: the connection token when JWT keys are set
        (InvalidToken 401 when it is bad, or missing without `allow_anonymous`), then the
        application's on_connect hook, which sees the Auth. The identity is what the hook
        returned, else the token's `sub`."""
        verified = auth.ANONYMOUS
        if self.verifier is not None:
            try:
                token = auth.token_from_request(request)
                if token is not None:
                    verified = await self.verify_token(token)
                elif not self.settings.anonymous_allowed and not presents_api_key(
                    self.settings.api_key, request
                ):  # the API key (the dashboard's) is let in without a token, anonymous
                    raise auth.InvalidToken(
                        "a token is required: the token query parameter, a"
                        " Sec-WebSocket-Protocol entry redwire.token.<jwt>, or"
                        " Authorization: Bearer <jwt>"
                    )
            except auth.InvalidToken:
                self.stats.tokens_refused += 1
                raise
        identity = await self.hooks.on_connect(request, verified)
        return (verified.subject if identity is None else identity), verified

    async def verify_token(self, token: str) -> auth.Auth:
        """The Auth `token` grants (InvalidToken otherwise). A token naming a `kid` we lack
        loads the JWKS again first, at most once per `jwt_jwks_min_refresh_s`
        (worker/jwks.py): a key rotated in since the last load is taken at once."""
        assert self.verifier is not None
        try:
            return self.verifier.verify(token)
        except auth.UnknownKeyId:
            if self._jwks is None or not await self._jwks.load_for_unknown_kid():
                raise
        return self.verifier.verify(token)

    def open_session(self, ws: WebSocket) -> ClientSession:
        session = ClientSession(self, ws)
        self.sessions.add(session)
        return session

    def health(self) -> tuple[bool, dict[str, Any]]:
        bus = self.bus.stats()
        ok = bool(bus.get("healthy"))
        return ok, {
            "status": "ok" if ok else "unavailable",
            "worker": self.worker_id,
            "bus": bus,
            "connections": self.stats.connections,
        }
