"""broker/auth.py: connection tokens, where they travel, and per-topic permissions; and
worker/jwks.py's load for a token naming an unknown `kid`.

Table-driven: each row is a token made here (pyjwt, keys from `cryptography`) and the
outcome the verifier must give. No server; tokens are dated from now (only the JWKS
refresher's own interval runs on a clock moved by hand).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.auth import (
    ANONYMOUS,
    Auth,
    InvalidToken,
    TokenVerifier,
    UnknownKeyId,
    permission,
    token_from_request,
)
from broker.errors import ConfigError, HandshakeError
from broker.handshake import Request
from broker.settings import Settings, TopicRule
from worker.jwks import JwksRefresher

SECRET = "s" * 32
OLD_SECRET = "o" * 32
OTHER_SECRET = "x" * 32


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "exp": now + 600, "iat": now}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256", **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm=alg, headers=headers or None)


def unsigned(payload: dict[str, Any]) -> str:
    """An `alg: none` token (pyjwt refuses to make one with a key)."""

    def b64(obj: dict[str, Any]) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


def hmac_signed(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed with any bytes (pyjwt refuses a PEM key as an HMAC secret)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def forged(payload: dict[str, Any]) -> str:
    """A token signed with SECRET whose payload was then changed (sub: mallory)."""
    head, _, sig = hs(payload).split(".")
    body = base64.urlsafe_b64encode(json.dumps({**payload, "sub": "mallory"}).encode())
    return f"{head}.{body.rstrip(b'=').decode()}.{sig}"


def hs_verifier(**kwargs: Any) -> TokenVerifier:
    options: dict[str, Any] = {"algorithms": ["HS256"], "secrets": [SECRET, OLD_SECRET]}
    options.update(kwargs)
    return TokenVerifier(**options)


HS_CASES: list[tuple[str, Any, str | None]] = [
    ("good", lambda: hs(claims()), None),
    ("signed with the old secret (rotation)", lambda: hs(claims(), OLD_SECRET), None),
    ("forged signature", lambda: forged(claims()), "bad signature"),
    ("unknown secret", lambda: hs(claims(), OTHER_SECRET), "bad signature"),
    ("expired", lambda: hs(claims(exp=int(time.time()) - 60)), "expired"),
    ("expired within the leeway", lambda: hs(claims(exp=int(time.time()) - 2)), None),
    ("nbf in the future", lambda: hs(claims(nbf=int(time.time()) + 600)), "not valid yet"),
    ("alg none", lambda: unsigned(claims()), "algorithm not allowed"),
    ("alg not pinned (HS512)", lambda: hs(claims(), "s" * 64, "HS512"), "algorithm not allowed"),
    ("no exp", lambda: hs(claims(exp=None)), "no exp claim"),
    ("no sub", lambda: hs(claims(sub=None)), "no sub claim"),
    ("sub not a string", lambda: hs(claims(sub=42)), "invalid token"),
    ("garbage", lambda: "not-a-token", "malformed"),
    ("subs not a list", lambda: hs(claims(subs="chat.*")), "subs must be a list"),
]


@pytest.mark.parametrize(("name", "make", "error"), HS_CASES, ids=[c[0] for c in HS_CASES])
def test_hs256_tokens(name: str, make: Any, error: str | None) -> None:
    verifier = hs_verifier()
    if error is None:
        auth = verifier.verify(make())
        assert auth.subject == "alice" and not auth.anonymous
        assert auth.expires_at is not None
        return
    with pytest.raises(InvalidToken) as info:
        verifier.verify(make())
    assert info.value.status == 401
    assert error in info.value.reason
    assert ("WWW-Authenticate", 'Bearer realm="redwire"') in info.value.headers
    assert SECRET not in info.value.reason


AUD_ISS_CASES = [
    ("right audience and issuer", {"aud": "redwire", "iss": "https://login.example"}, None),
    ("wrong audience", {"aud": "other", "iss": "https://login.example"}, "wrong audience"),
    ("wrong issuer", {"aud": "redwire", "iss": "https://evil.example"}, "wrong issuer"),
    ("no audience", {"iss": "https://login.example"}, "no aud claim"),
    ("audience in a list", {"aud": ["x", "redwire"], "iss": "https://login.example"}, None),
]


@pytest.mark.parametrize(
    ("name", "extra", "error"), AUD_ISS_CASES, ids=[c[0] for c in AUD_ISS_CASES]
)
def test_audience_and_issuer(name: str, extra: dict[str, Any], error: str | None) -> None:
    verifier = hs_verifier(audience="redwire", issuer="https://login.example")
    token = hs(claims(**extra))
    if error is None:
        assert verifier.verify(token).subject == "alice"
    else:
        with pytest.raises(InvalidToken, match=error):
            verifier.verify(token)


def test_a_token_with_an_audience_is_refused_when_none_is_configured() -> None:
    with pytest.raises(InvalidToken, match="audience"):
        hs_verifier().verify(hs(claims(aud="someone-else")))


def test_claims_subs_and_pubs() -> None:
    auth = hs_verifier().verify(hs(claims(subs=["chat.a", "news.*"], pubs=["chat.a"], role="x")))
    assert auth.subs == ("chat.a", "news.*") and auth.pubs == ("chat.a",)
    assert auth.claims["role"] == "x"


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_rs256_with_a_public_key_file(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem_public(rsa_key))
    settings = Settings(jwt_public_key_file=str(path))
    verifier = TokenVerifier.from_settings(settings)
    assert verifier is not None and verifier.algorithms == ("RS256",)
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")).subject == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidToken, match="bad signature"):
        verifier.verify(jwt.encode(claims(), other, algorithm="RS256"))
    # An HS256 token "signed" with the public key's PEM (the classic confusion attack).
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        verifier.verify(hmac_signed(claims(), pem_public(rsa_key)))


@pytest.mark.parametrize(
    ("alg", "make"),
    [
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate),
    ],
)
def test_es256_and_eddsa(alg: str, make: Any, tmp_path: Path) -> None:
    key = make()
    path = tmp_path / "key.pem"
    path.write_bytes(pem_public(key))
    verifier = TokenVerifier.from_settings(
        Settings(jwt_public_key_file=str(path), jwt_algorithms=(alg,))
    )
    assert verifier is not None
    assert verifier.verify(jwt.encode(claims(), key, algorithm=alg)).subject == "alice"


def jwk_of(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def test_jwks_file(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    second = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "k1"), jwk_of(second, "k2")]}))
    verifier = TokenVerifier.from_settings(Settings(jwt_jwks=str(path)))
    assert verifier is not None
    token = jwt.encode(claims(), second, algorithm="RS256", headers={"kid": "k2"})
    with pytest.raises(InvalidToken) as info:  # the worker has not loaded it yet
        verifier.verify(token)
    assert info.value.status == 503
    assert verifier.set_jwks(path.read_text()) == 2
    assert verifier.verify(token).subject == "alice"
    no_kid = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert verifier.verify(no_kid).subject == "alice"  # every key is tried
    wrong_kid = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k2"})
    with pytest.raises(InvalidToken, match="bad signature"):
        verifier.verify(wrong_kid)
    unknown = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k9"})
    with pytest.raises(UnknownKeyId, match="unknown key id") as unknown_info:
        verifier.verify(unknown)
    assert unknown_info.value.status == 401
    with pytest.raises(ValueError, match="JWKS"):
        verifier.set_jwks('{"keys": []}')
    assert verifier.verify(token).subject == "alice"  # a bad document keeps the old keys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_an_unknown_kid_loads_the_jwks_again_at_most_so_often(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    second = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "k1")]}))
    settings = Settings(jwt_jwks=str(path), jwt_jwks_min_refresh_s=30)
    verifier = TokenVerifier.from_settings(settings)
    assert verifier is not None
    clock = Clock()
    refresher = JwksRefresher(verifier, settings, clock=clock)
    assert await refresher.load_once()  # what `start` does first
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "k1"), jwk_of(second, "k2")]}))
    rotated = jwt.encode(claims(), second, algorithm="RS256", headers={"kid": "k2"})
    with pytest.raises(UnknownKeyId):
        verifier.verify(rotated)
    clock.now += 29  # too soon after the last load: no load, the token stays refused
    assert await refresher.load_for_unknown_kid() is False
    assert refresher.loads == 1
    clock.now += 1
    waiting = [refresher.load_for_unknown_kid() for _ in range(5)]
    assert await asyncio.gather(*waiting) == [True] * 5  # five callers, one load
    assert refresher.loads == 2
    assert verifier.verify(rotated).subject == "alice"
    made_up = jwt.encode(claims(), second, algorithm="RS256", headers={"kid": "k-made-up"})
    for _ in range(10):  # made-up kids right after a load: no fetch each
        with pytest.raises(UnknownKeyId):
            verifier.verify(made_up)
        assert await refresher.load_for_unknown_kid() is False
    assert refresher.loads == 2
    refresher.stop()


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"jwt_secrets": ("short",)}, "at least 32 bytes"),
        ({"jwt_secrets": (SECRET,), "jwt_algorithms": ("none",)}, "never accepted"),
        ({"jwt_secrets": (SECRET,), "jwt_algorithms": ("RS256",)}, "needs jwt_public_key_file"),
        ({"jwt_algorithms": ("HS256",)}, "no JWT key"),
        ({"jwt_public_key_file": "/nonexistent.pem"}, "cannot read"),
        ({"jwt_jwks": "/nonexistent.json"}, "not a file"),
        ({"jwt_secrets": (SECRET,), "jwt_jwks_min_refresh_s": 0.5}, "must be >= 1"),
        ({"allow_anonymous": False}, "needs JWT keys"),
        ({"topics": (TopicRule("a.*", allow_publish="authenticated"),)}, "needs JWT keys"),
        ({"topics": (TopicRule("a.*", allow_publish="admins"),)}, "is not one of"),
    ],
)
def test_settings_refused(settings: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Settings(**settings)


def test_secret_file_one_per_line_and_hidden(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text(f"{SECRET}\n\n{OLD_SECRET}\n")
    settings = Settings.load(environ={"REDWIRE_JWT_SECRET_FILE": str(path)})
    assert settings.jwt_secrets == (SECRET, OLD_SECRET)
    assert SECRET not in repr(settings)
    env = settings.to_env()
    assert SECRET not in "".join(env.values())  # the workers read the file themselves
    assert Settings.load(environ=env).jwt_secrets == (SECRET, OLD_SECRET)
    assert not settings.anonymous_allowed and Settings().anonymous_allowed
    with pytest.raises(ConfigError, match="both set"):
        Settings.load(overrides={"jwt_secrets": (SECRET,), "jwt_secret_file": str(path)})


def request(target: str = "/ws", headers: tuple[tuple[str, str], ...] = ()) -> Request:
    path, _, query = target.partition("?")
    return Request("GET", target, path, query, "1.1", (("Host", "h"), *headers))


TOKEN = "aaa.bbb.ccc"
TRANSPORT_CASES: list[tuple[str, Request, str | None]] = [
    ("none", request(), None),
    ("query", request(f"/ws?x=1&token={TOKEN}"), TOKEN),
    (
        "subprotocol",
        request(headers=(("Sec-WebSocket-Protocol", f"redwire.json, redwire.token.{TOKEN}"),)),
        TOKEN,
    ),
    ("bearer", request(headers=(("Authorization", f"Bearer {TOKEN}"),)), TOKEN),
    ("other auth scheme", request(headers=(("Authorization", "Basic dTpw"),)), None),
]


@pytest.mark.parametrize(
    ("name", "req", "token"), TRANSPORT_CASES, ids=[c[0] for c in TRANSPORT_CASES]
)
def test_where_the_token_travels(name: str, req: Request, token: str | None) -> None:
    assert token_from_request(req) == token


@pytest.mark.parametrize(
    "req",
    [
        request(f"/ws?token={TOKEN}", (("Authorization", f"Bearer {TOKEN}"),)),
        request(f"/ws?token={TOKEN}&token={TOKEN}"),
        request("/ws?token=not%20a%20jwt"),
    ],
    ids=["two places", "twice", "not a jwt"],
)
def test_ambiguous_or_malformed_transport(req: Request) -> None:
    with pytest.raises(HandshakeError) as info:
        token_from_request(req)
    assert info.value.status == 401


ALICE = Auth("alice", subs=("chat.a", "news.*"), pubs=("chat.a",))
FREE = Auth("bob")  # a token without subs/pubs claims
RULE = TopicRule("*", allow_presence="authenticated")
CLAIM = TopicRule("*", allow_subscribe="claim", allow_publish="claim")
NOBODY = TopicRule("*", allow_publish="none")
NO_BROWSERS = TopicRule("*", allow_browser_publish=False)
PERMISSION_CASES: list[tuple[str, TopicRule | None, Auth, str, str, bool, str | None]] = [
    ("no rule, anonymous", None, ANONYMOUS, "subscribe", "x", False, None),
    ("claim lists it", None, ALICE, "subscribe", "chat.a", False, None),
    ("claim pattern", None, ALICE, "subscribe", "news.eu", False, None),
    ("claim does not list it", None, ALICE, "subscribe", "chat.b", False, "does not allow"),
    ("publish claim", None, ALICE, "publish", "chat.a", False, None),
    ("publish not in pubs", None, ALICE, "publish", "news.eu", False, "does not allow"),
    ("presence follows subs", None, ALICE, "presence", "chat.b", False, "does not allow"),
    ("authenticated rule, anonymous", RULE, ANONYMOUS, "presence", "x", False, "needs a token"),
    ("authenticated rule, token", RULE, FREE, "presence", "x", False, None),
    ("claim rule, no claim", CLAIM, FREE, "subscribe", "x", False, "subs claim"),
    ("claim rule, claim", CLAIM, ALICE, "publish", "chat.a", False, None),
    ("nobody", NOBODY, ALICE, "publish", "chat.a", False, "nobody may"),
    ("browser publish off", NO_BROWSERS, FREE, "publish", "x", True, "browsers may not"),
    ("browser publish off, not a browser", NO_BROWSERS, FREE, "publish", "x", False, None),
    ("browser publish off, subscribe", NO_BROWSERS, FREE, "subscribe", "x", True, None),
]


@pytest.mark.parametrize(
    ("name", "rule", "auth", "action", "topic", "browser", "denied"),
    PERMISSION_CASES,
    ids=[c[0] for c in PERMISSION_CASES],
)
def test_permissions(
    name: str,
    rule: TopicRule | None,
    auth: Auth,
    action: str,
    topic: str,
    browser: bool,
    denied: str | None,
) -> None:
    reason = permission(rule, auth, action, topic, browser=browser)
    if denied is None:
        assert reason is None
    else:
        assert reason is not None and denied in reason


def test_topic_rules_from_the_environment() -> None:
    rules = json.dumps([{"pattern": "admin.*", "allow_subscribe": "none", "allow_publish": "none"}])
    settings = Settings.load(environ={"REDWIRE_TOPICS": rules})
    assert settings.rule_for("admin.x") == TopicRule(
        "admin.*", allow_subscribe="none", allow_publish="none"
    )


def b64json(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


GARBAGE = [
    "a.b.c",
    f"{b64json([1, 2])}.{b64json({'sub': 'a'})}.",
    f"{b64json({'alg': 'HS256'})}.{b64json(b'not json')}.AAAA",
    f"{b64json({'alg': 'HS256'})}.{b64json([1])}.AAAA",
    f"{b64json({'alg': ['HS256']})}.{b64json({'sub': 'a'})}.AAAA",
    f"{b64json({'alg': 'RS256', 'kid': ['x']})}.{b64json({'sub': 'a'})}.AAAA",
    f"{b64json({'alg': 'HS256', 'crit': ['exp']})}.{b64json({'sub': 'a'})}.AAAA",
    hs(claims(exp="tomorrow")),
    hs(claims(nbf={"x": 1})),
    hs(claims(pubs=[1, 2])),
    hs(claims(subs=["x" * 1000])),
]


@pytest.mark.parametrize("token", GARBAGE)
def test_any_bad_token_is_an_invalid_token_and_nothing_else(token: str) -> None:
    verifier = TokenVerifier(algorithms=["HS256", "RS256"], secrets=[SECRET], expects_jwks=True)
    verifier.set_jwks(json.dumps({"keys": [{"kty": "oct", "k": b64json(b"k" * 32)}]}))
    with pytest.raises(InvalidToken):
        verifier.verify(token)


def test_a_key_of_another_type_is_skipped(rsa_key: rsa.RSAPrivateKey) -> None:
    """An RS256 token, an EC public key and a JWKS with an EC and an RSA key (no `alg`,
    no `kid`): only the RSA one is tried, and a key of the wrong type is never a 500."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    only_ec = TokenVerifier(algorithms=["RS256", "ES256"], public_key=ec_key.public_key())
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    with pytest.raises(InvalidToken, match="no key for RS256"):
        only_ec.verify(token)
    mixed = TokenVerifier(algorithms=["RS256", "ES256"], expects_jwks=True)
    keys = [
        json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())),
        json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())),
    ]
    assert mixed.set_jwks(json.dumps({"keys": keys})) == 2
    assert mixed.verify(token).subject == "alice"
    assert mixed.verify(jwt.encode(claims(), ec_key, algorithm="ES256")).subject == "alice"
