"""Example application hooks: JWT authentication, admin-only topics, sender stamping.

    pip install pyjwt
    export HOOKS_JWT_SECRET="$(python -c 'import secrets; print(secrets.token_hex(32))')"
    PYTHONPATH=examples redwire serve --app hooks_app:Hooks
    PYTHONPATH=examples python -m hooks_app alice            # prints a token for alice
    # connect to ws://127.0.0.1:8765/ws?token=<that token>

`examples` is not a package: the module is imported as `hooks_app`, so `examples/` must be
on PYTHONPATH (the supervisor checks the import, then every worker imports it again).

- on_connect: the `token` query parameter must be an HS256 JWT signed with
  HOOKS_JWT_SECRET, with `sub` and `exp` claims; else HTTP 401. Browsers cannot set headers
  on a WebSocket, hence the query parameter: keep tokens short-lived, since URLs end up in
  proxy logs. The identity is {"sub": ..., "admin": bool} (the `admin` claim).
- on_subscribe / on_publish: topics starting with "admin." are for admins only ("forbidden").
- on_publish: stamps the sender's `sub` into the data, so subscribers know who sent it and
  a client cannot forge it: an object gets (or has overwritten) an "identity" field, any
  other value is wrapped as {"identity": sub, "value": data}.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any
from urllib.parse import parse_qs

import jwt

from broker.errors import ClientError, ConfigError, HandshakeError
from broker.handshake import Request

SECRET_ENV = "HOOKS_JWT_SECRET"
MIN_SECRET_BYTES = 32  # RFC 7518 section 3.2: an HS256 key at least as long as the hash
ALGORITHMS = ["HS256"]
ADMIN_PREFIX = "admin."
FORBIDDEN = "forbidden"  # the pub/sub error code of docs/protocol.md
_CHALLENGE = [("WWW-Authenticate", 'Bearer realm="redwire"')]


def make_token(sub: str, *, secret: str, admin: bool = False, ttl_s: float = 3600.0) -> str:
    """A token `on_connect` accepts (what a real app's login endpoint would hand out)."""
    now = int(time.time())
    claims = {"sub": sub, "admin": admin, "iat": now, "exp": now + int(ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHMS[0])


class Hooks:
    """`redwire serve --app hooks_app:Hooks`: instantiated once per worker, with no args."""

    def __init__(self, secret: str | None = None) -> None:
        secret = secret if secret is not None else os.environ.get(SECRET_ENV, "")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{SECRET_ENV} must be set to at least {MIN_SECRET_BYTES} bytes")
        self.secret = secret

    async def on_connect(self, request: Request) -> dict[str, Any]:
        tokens = parse_qs(request.query).get("token")
        if not tokens:
            raise HandshakeError(401, "missing token", _CHALLENGE)
        try:
            claims = jwt.decode(
                tokens[0], self.secret, algorithms=ALGORITHMS, options={"require": ["sub", "exp"]}
            )
        except jwt.ExpiredSignatureError:
            raise HandshakeError(401, "token expired", _CHALLENGE) from None
        except jwt.InvalidTokenError:
            raise HandshakeError(401, "invalid token", _CHALLENGE) from None
        return {"sub": str(claims["sub"]), "admin": claims.get("admin") is True}

    async def on_subscribe(self, session: Any, topic: str) -> None:
        _check_topic(session, topic)

    async def on_publish(self, session: Any, topic: str, data: Any) -> Any:
        _check_topic(session, topic)
        sub = session.identity["sub"]
        if isinstance(data, dict):
            return {**data, "identity": sub}
        return {"identity": sub, "value": data}


def _check_topic(session: Any, topic: str) -> None:
    if topic.startswith(ADMIN_PREFIX) and not session.identity["admin"]:
        raise ClientError(FORBIDDEN, f"topics starting with {ADMIN_PREFIX!r} are for admins")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="print a token for the example hooks")
    parser.add_argument("sub", help="who the token is for")
    parser.add_argument("--admin", action="store_true", help="may use admin.* topics")
    parser.add_argument("--ttl-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    secret = os.environ.get(SECRET_ENV, "")
    try:
        Hooks(secret)  # the same check the broker makes
    except ConfigError as exc:
        raise SystemExit(f"hooks_app: {exc}") from None
    print(make_token(args.sub, secret=secret, admin=args.admin, ttl_s=args.ttl_s))


if __name__ == "__main__":
    main()
