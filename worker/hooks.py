"""Application hooks (`--app module:object`): plug a back end's logic into the broker.

The object may define any of these async methods; a missing one allows everything.

    async def on_connect(self, request) -> identity      # raise HandshakeError to refuse
    async def on_connect(self, request, auth) -> identity  # the same, seeing the token
    async def on_subscribe(self, session, topic) -> None  # raise ClientError to deny
    async def on_publish(self, session, topic, data) -> data   # return (transformed) data,
                                                               # raise ClientError to deny

`session.identity` is what `on_connect` returned (None: the token's `sub`); `session.id`
is the client id. With JWT keys configured (broker/auth.py) the connection token is checked
before `on_connect` runs; a hook taking two arguments gets the verified `broker.auth.Auth`
(`auth.subject`, `auth.claims`; `broker.auth.ANONYMOUS` without a token), and so does
`session.auth` in the other hooks. Topic rules (`allow_subscribe`, ...) are checked before
`on_subscribe` / `on_publish`: a hook can only narrow them.
"""

from __future__ import annotations

import importlib
import inspect
import json
from typing import TYPE_CHECKING, Any

from broker.envelope import ENCODING_MSGPACK, msgpack_loads
from broker.errors import ConfigError
from broker.handshake import Request

if TYPE_CHECKING:
    from worker.session import ClientSession
    from worker.wire import Request as WireRequest


def load_object(spec: str) -> Any:
    """Import `module:attribute` (the attribute may be a class, instantiated with no args)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--app must look like module:object, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import app module {module_name!r}: {exc}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj() if isinstance(obj, type) else obj


class Hooks:
    """Calls the application's hooks, or allows everything where it has none."""

    def __init__(self, app: Any | None) -> None:
        self.app = app
        self._connect = getattr(app, "on_connect", None)
        self._connect_takes_auth = self._connect is not None and _takes_two(self._connect)
        self._subscribe = getattr(app, "on_subscribe", None)
        self._publish = getattr(app, "on_publish", None)

    @property
    def publish_untouched(self) -> bool:
        """No on_publish hook: published data goes to the bus exactly as received."""
        return self._publish is None

    async def on_connect(self, request: Request, auth: Any = None) -> Any:
        if self._connect is None:
            return None
        if self._connect_takes_auth:
            return await self._connect(request, auth)
        return await self._connect(request)

    async def on_subscribe(self, session: ClientSession, topic: str) -> None:
        if self._subscribe is not None:
            await self._subscribe(session, topic)

    async def transform_publish(self, session: ClientSession, request: WireRequest) -> bytes:
        """The payload to publish: unchanged without a hook, else what the hook returns."""
        assert request.payload is not None and request.topic is not None
        if self._publish is None:
            return request.payload
        if request.encoding == ENCODING_MSGPACK:
            data = msgpack_loads(request.payload)
        else:
            data = json.loads(request.payload)
        result = await self._publish(session, request.topic, data)
        return session.codec.encode_data(result)


def _takes_two(fn: Any) -> bool:
    """Whether `fn` accepts (request, auth) positionally."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)
