"""Connection tokens (JWT) and per-topic permissions: Sans-I/O, no asyncio, no sockets.

Theory of operation

    upgrade request ──token_from_request──▶ str | None
                    ──TokenVerifier.verify─▶ Auth (sub, claims, subs, pubs, exp)
                                             or InvalidToken (HandshakeError 401)
    each request    ──permission(rule, auth, action, topic, browser)──▶ None | reason

- A token travels in one of three places (docs/protocol.md, "Authentication"): the `token`
  query parameter, a `Sec-WebSocket-Protocol` entry `redwire.token.<jwt>` (never selected
  as the subprotocol: the handshake only ever selects `redwire.json`/`redwire.msgpack`), or
  `Authorization: Bearer <jwt>`. More than one place, or a repeated one, is refused.
- The algorithm is pinned by `jwt_algorithms`; the token's `alg` header only picks among
  them (a token whose `alg` is not listed, `none` included, is refused before any key is
  tried). HS* tokens are checked against every secret of `jwt_secrets` (rotation: any may
  have signed it); the others against `jwt_public_key_file` and the JWKS keys (by `kid`
  when the token names one). `exp`, `nbf`, `aud`, `iss` are checked with `jwt_leeway_s`;
  `sub` is required (it is the client's identity) and `exp` is unless `jwt_require_exp` is
  off.
- Claims Redwire reads: `sub` (string: the identity hooks and presence see), `subs` and
  `pubs` (lists of fnmatch patterns: topics the token may subscribe to, and query presence
  of / publish to). A claim that is absent restricts nothing by itself; a topic rule with
  `allow_subscribe = "claim"` (or publish/presence) demands that the claim lists the topic.
- Permissions: the first `TopicRule` matching a topic (`Settings.rule_for`) says who may
  subscribe, publish and query presence ("any", "authenticated", "claim", "none") and
  whether browsers (requests with an `Origin`) may publish; the token's claims narrow that
  further, and the application's hooks run after both.
- The JWKS (a JSON Web Key Set, read into `PyJWK`s) is data handed in (`set_jwks`);
  reading or fetching it is the worker's job (worker/jwks.py): nothing here waits. A
  token naming a `kid` not held is `UnknownKeyId` (an InvalidToken), so the worker can
  load the JWKS again, no more often than `jwt_jwks_min_refresh_s`, and check it once more.

Every failure is an `InvalidToken` (HTTP 401 with `WWW-Authenticate: Bearer`) whose reason
names the check that failed and never carries the token or a key.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import jwt
from jwt import PyJWK
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWKError,
    PyJWTError,
)

from broker.errors import ConfigError, HandshakeError

if TYPE_CHECKING:
    from broker.handshake import Request
    from broker.settings import Settings, TopicRule

#: `Sec-WebSocket-Protocol` entry carrying a token: `redwire.token.<jwt>`.
SUBPROTOCOL_TOKEN_PREFIX = "redwire.token."
#: Who may do something on a topic (TopicRule.allow_subscribe / allow_publish / allow_presence).
ACCESS_LEVELS = ("any", "authenticated", "claim", "none")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
KEY_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
#: RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MAX_PATTERNS = 1000  # entries of a `subs`/`pubs` claim
MAX_PATTERN_CHARS = 256
MAX_JWKS_KEYS = 100  # keys read from one JWKS document (the rest are ignored)
_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="redwire"'),)
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class InvalidToken(HandshakeError):
    """A connection token refused: 401 with a Bearer challenge; `reason` names the check."""

    def __init__(self, reason: str, status: int = 401) -> None:
        headers = _CHALLENGE if status == 401 else (("Retry-After", "5"),)
        super().__init__(status, reason, headers)


class UnknownKeyId(InvalidToken):
    """A token whose `kid` names no key we hold: 401, unless a JWKS load (worker/jwks.py)
    brings the key, after which the token is checked once more."""


@dataclass(frozen=True, slots=True)
class Auth:
    """What a connection is allowed, from its verified token (or anonymous)."""

    subject: str | None  # the `sub` claim: the client's identity; None: anonymous
    claims: Mapping[str, Any] = field(default_factory=dict)  # every verified claim
    subs: tuple[str, ...] | None = None  # `subs` claim: patterns; None: no such claim
    pubs: tuple[str, ...] | None = None  # `pubs` claim
    expires_at: float | None = None  # `exp` (seconds since the epoch); None: never

    @property
    def anonymous(self) -> bool:
        return self.subject is None


ANONYMOUS = Auth(None)


def token_from_request(request: Request) -> str | None:
    """The connection token of an upgrade request, from whichever of the three places
    holds it; None when none does. InvalidToken when it is given twice or malformed."""
    found: list[str] = []
    query = parse_qs(request.query, keep_blank_values=True).get("token", [])
    found.extend(query)
    for entry in _comma_list(request.header_values("Sec-WebSocket-Protocol")):
        if entry.startswith(SUBPROTOCOL_TOKEN_PREFIX):
            found.append(entry[len(SUBPROTOCOL_TOKEN_PREFIX) :])
    for value in request.header_values("Authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() == "bearer":
            found.append(credentials.strip())
    if not found:
        return None
    if len(found) > 1:
        raise InvalidToken("more than one token in the request: send it in one place")
    token = found[0]
    if not _JWT_SHAPE.fullmatch(token):
        raise InvalidToken("invalid token: not a JWT (header.payload.signature)")
    return token


def _comma_list(values: Sequence[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def jwt_configured(settings: Settings) -> bool:
    """Whether any verification key is configured (then tokens are checked)."""
    return bool(
        settings.jwt_secrets or settings.jwt_public_key_file is not None or settings.jwt_jwks
    )


def algorithms(settings: Settings) -> tuple[str, ...]:
    """The pinned algorithms: `jwt_algorithms`, or by default HS256 with secrets and RS256
    with a public key or JWKS."""
    if settings.jwt_algorithms:
        return settings.jwt_algorithms
    chosen: list[str] = []
    if settings.jwt_secrets:
        chosen.append("HS256")
    if settings.jwt_public_key_file is not None or settings.jwt_jwks:
        chosen.append("RS256")
    return tuple(chosen)


def check_settings(settings: Settings) -> None:
    """ConfigError unless the JWT settings make a usable verifier (keys readable, algorithms
    known and matching the keys, secrets long enough). Reads the public key file."""
    TokenVerifier.from_settings(settings)


class TokenVerifier:
    """Checks connection tokens against the configured keys (see the module docstring)."""

    def __init__(
        self,
        *,
        algorithms: Sequence[str],
        secrets: Sequence[str] = (),
        public_key: Any = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 5.0,
        require_exp: bool = True,
        expects_jwks: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        algs = tuple(algorithms)
        if not algs:
            raise ConfigError("jwt_algorithms: no algorithm")
        for alg in algs:
            if alg not in HMAC_ALGORITHMS and alg not in KEY_ALGORITHMS:
                raise ConfigError(
                    f"jwt_algorithms: {alg!r} is not one of "
                    + ", ".join(HMAC_ALGORITHMS + KEY_ALGORITHMS)
                    + (" ('none' is never accepted)" if alg.lower() == "none" else "")
                )
            if alg in HMAC_ALGORITHMS:
                if not secrets:
                    raise ConfigError(f"jwt_algorithms: {alg} needs jwt_secrets or jwt_secret_file")
                for secret in secrets:
                    if len(secret.encode()) < MIN_SECRET_BYTES[alg]:
                        raise ConfigError(
                            f"jwt secrets: {alg} needs secrets of at least"
                            f" {MIN_SECRET_BYTES[alg]} bytes (RFC 7518 section 3.2)"
                        )
            elif public_key is None and not expects_jwks:
                raise ConfigError(f"jwt_algorithms: {alg} needs jwt_public_key_file or jwt_jwks")
        self.algorithms = algs
        self.secrets = tuple(secrets)
        self.public_key = public_key
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        self.require_exp = require_exp
        self.expects_jwks = expects_jwks
        self.jwks: list[tuple[Any, str | None, PyJWK]] | None = None  # (kid, alg, key)
        self.jwks_loaded_at: float | None = None
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier | None:
        """The verifier the settings describe, or None when no key is configured."""
        if not jwt_configured(settings):
            return None
        public_key = None
        if settings.jwt_public_key_file is not None:
            public_key = load_public_key(settings.jwt_public_key_file)
        return cls(
            algorithms=algorithms(settings),
            secrets=settings.jwt_secrets,
            public_key=public_key,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway_s=settings.jwt_leeway_s,
            require_exp=settings.jwt_require_exp,
            expects_jwks=bool(settings.jwt_jwks),
        )

    # --- keys ----------------------------------------------------------------------------------

    def set_jwks(self, document: str | bytes) -> int:
        """Replace the JWKS keys with the usable ones of `document` (JSON); returns how many
        there are. ValueError when it holds none (the old keys stay)."""
        try:
            data = json.loads(document)
        except ValueError as exc:
            raise ValueError(f"not a JWKS: not JSON ({exc})"[:200]) from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError("not a JWKS: no `keys` list")
        keys: list[tuple[Any, str | None, PyJWK]] = []
        for entry in entries[:MAX_JWKS_KEYS]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                jwk = PyJWK(entry)
            except (PyJWKError, PyJWTError, ValueError, TypeError):
                continue  # a key type or algorithm we cannot use (PyJWKSet skips them too)
            alg = entry.get("alg")
            keys.append((entry.get("kid"), alg if isinstance(alg, str) else None, jwk))
        if not keys:
            raise ValueError("not a JWKS: no usable signing key")
        self.jwks = keys
        self.jwks_loaded_at = self._clock()
        return len(keys)

    def _keys_for(self, alg: str, kid: Any) -> list[Any]:
        if alg in HMAC_ALGORITHMS:
            return list(self.secrets)
        keys: list[Any] = [
            jwk
            for key_id, key_alg, jwk in self.jwks or ()
            if (kid is None or key_id == kid)
            and key_alg in (None, alg)
            and jwk.key_type == _KEY_TYPES[alg[:2]]
        ]
        public_key = self.public_key
        if public_key is not None and (kid is None or not keys) and _fits(alg, public_key):
            keys.append(public_key)
        if not keys:
            if self.expects_jwks and self.jwks is None:
                raise InvalidToken("token keys not loaded yet (JWKS): try again", status=503)
            if kid is not None:
                raise UnknownKeyId("invalid token: unknown key id (kid)")
            raise InvalidToken(f"invalid token: no key for {alg}")
        return keys

    # --- verification --------------------------------------------------------------------------

    def verify(self, token: str) -> Auth:
        """The Auth a token grants, or InvalidToken naming the check that failed."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise InvalidToken("invalid token: malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            # Pinned by configuration: the token never chooses (`none` is never listed).
            raise InvalidToken("invalid token: algorithm not allowed")
        required = ["sub", "exp"] if self.require_exp else ["sub"]
        if self.audience is not None:
            required.append("aud")
        if self.issuer is not None:
            required.append("iss")
        options = {"require": required, "verify_sub": True}
        claims: dict[str, Any] | None = None
        for key in self._keys_for(alg, header.get("kid")):
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway_s,
                    options=options,  # type: ignore[arg-type]
                )
                break
            except (InvalidSignatureError, InvalidKeyError, TypeError, ValueError):
                continue  # rotation: another secret (or key) may have signed it
            except ExpiredSignatureError:
                raise InvalidToken("invalid token: expired") from None
            except ImmatureSignatureError:
                raise InvalidToken(
                    "invalid token: not valid yet (nbf or iat in the future)"
                ) from None
            except InvalidAudienceError:
                raise InvalidToken("invalid token: wrong audience (aud)") from None
            except InvalidIssuerError:
                raise InvalidToken("invalid token: wrong issuer (iss)") from None
            except MissingRequiredClaimError as exc:
                raise InvalidToken(f"invalid token: no {exc.claim} claim") from None
            except DecodeError:
                raise InvalidToken("invalid token: malformed") from None
            except PyJWTError as exc:  # a key of the wrong type, a claim of the wrong type, ...
                raise InvalidToken(f"invalid token: {type(exc).__name__}") from None
        if claims is None:
            raise InvalidToken("invalid token: bad signature")
        return auth_from_claims(claims)


def auth_from_claims(claims: Mapping[str, Any]) -> Auth:
    """The Auth of verified claims; InvalidToken for a `sub`, `subs` or `pubs` of the wrong
    shape."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("invalid token: sub must be a non-empty string")
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
    return Auth(
        subject,
        dict(claims),
        _patterns(claims, "subs"),
        _patterns(claims, "pubs"),
        expires_at,
    )


def _patterns(claims: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_PATTERNS
        or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_CHARS for p in value)
    ):
        raise InvalidToken(f"invalid token: {name} must be a list of topic patterns")
    return tuple(value)


_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}  # alg prefix -> JWK kty


def _fits(alg: str, key: Any) -> bool:
    """Whether a public key object is of the type `alg` needs (an EC key for ES256, ...)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey)
    return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


def load_public_key(path: str) -> Any:
    """The PEM public key in `path` (RSA, EC, Ed25519/Ed448); ConfigError if unusable."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(
            f"setting jwt_public_key_file: cannot read {path}: {exc.strerror}"
        ) from None
    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"setting jwt_public_key_file: {path} is not a PEM public key ({exc})"[:300]
        ) from None


# --- permissions --------------------------------------------------------------------------------

ACTIONS = ("subscribe", "publish", "presence")


def permission(
    rule: TopicRule | None, auth: Auth, action: str, topic: str, *, browser: bool = False
) -> str | None:
    """None when `auth` may do `action` ("subscribe", "publish", "presence") on `topic`
    under `rule` (None: no rule, anyone may), else the reason for a `forbidden` reply.
    `browser`: the connection's upgrade carried an `Origin` (only a browser must)."""
    access = getattr(rule, f"allow_{action}") if rule is not None else "any"
    if access == "none":
        return f"nobody may {action} on {topic} (topic rules)"
    if access != "any" and auth.anonymous:
        return f"{action} on {topic} needs a token"
    if action == "publish" and browser and rule is not None and not rule.allow_browser_publish:
        return f"browsers may not publish to {topic} (topic rules)"
    patterns = auth.pubs if action == "publish" else auth.subs
    if patterns is None:
        if access == "claim":
            claim = "pubs" if action == "publish" else "subs"
            return f"{action} on {topic} needs a token whose {claim} claim lists it"
        return None
    if not any(fnmatch.fnmatchcase(topic, p) for p in patterns):
        return f"the token does not allow {action} on {topic}"
    return None
