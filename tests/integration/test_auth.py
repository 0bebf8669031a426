"""Connection JWT and per-topic permissions against a real `redwire serve` and a real Redis.

Independent clients (`websockets`, `aiohttp`), tokens made here with pyjwt:
- a token in each of its three places (query, `Sec-WebSocket-Protocol` entry, Bearer)
  gets a welcome, and the subprotocol selected is `redwire.json`, never the token entry;
- no token, a forged one, an expired one: 401 before any session;
- a token for `chat.a` used on `chat.b`: `forbidden` on subscribe and publish, and the
  connection keeps working; topic rules (read-only topics, no browser publishing, topics
  for tokens whose claim lists them) are `forbidden` too;
- a token expiring mid-connection: the server asks (`refresh`); answered with a new token,
  the connection outlives the old exp; not answered, it is closed 4001;
- the application's on_connect hook runs after the token check and sees its claims;
- the Python client and redwire.js (in Node, over the `ws` package) answer the server's
  refresh requests from their token functions, and with a fixed token end at the 4001 close;
- redwire.js in headless Chromium with the token as a `Sec-WebSocket-Protocol` entry;
- `allow_anonymous` beside tokens: anonymous connections reach only topics open to "any";
- RS256 tokens against a JWKS URL: a key added to the JWKS is picked up by the next reload,
  and the keys loaded stay while the URL is unreachable.
Short tokens (3 s) with generous waits on conditions: nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import rsa
from support.processes import REPO, ServerProcess, serve
from support.waiting import eventually
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.errors import ClientError, ConnectionClosedError
from client import connect
from client.subscriber import Message

SECRET = secrets.token_hex(32)
OLD_SECRET = secrets.token_hex(32)
LEEWAY_S = 0.5
MARGIN_S = 1.5  # the server asks for a new token this long before exp
SHORT_S = 3  # a short token's lifetime
WAIT_S = 30.0  # generous: how long a condition may take on a busy machine

HOOKS = """
from broker.errors import ClientError


class Hooks:
    async def on_connect(self, request, auth):
        return {"sub": auth.subject, "role": auth.claims.get("role")}

    async def on_subscribe(self, session, topic):
        if topic == "room.hooked":
            raise ClientError("forbidden", "the hook says no")
"""

TOPICS = [
    {"pattern": "room.*", "presence": True, "allow_presence": "authenticated"},
    {"pattern": "lobby.*", "presence": True, "join_leave": True, "allow_presence": "claim"},
    {"pattern": "ro.*", "allow_publish": "none"},
    {"pattern": "web.*", "allow_browser_publish": False},
    {"pattern": "strict.*", "allow_subscribe": "claim", "allow_publish": "claim"},
]


@pytest.fixture(scope="module")
def broker(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("auth")
    secret_file = root / "jwt_secrets"
    secret_file.write_text(f"{SECRET}\n{OLD_SECRET}\n")
    (root / "auth_hooks.py").write_text(HOOKS)
    server = serve(
        redis_server.url,
        workers=1,
        env={
            "PYTHONPATH": str(root),
            "REDWIRE_APP": "auth_hooks:Hooks",
            "REDWIRE_JWT_SECRET_FILE": str(secret_file),
            "REDWIRE_JWT_AUDIENCE": "redwire-tests",
            "REDWIRE_JWT_LEEWAY_S": str(LEEWAY_S),
            "REDWIRE_TOKEN_REFRESH_MARGIN_S": str(MARGIN_S),
            "REDWIRE_TOPICS": json.dumps(TOPICS),
            "REDWIRE_CHANNEL_PREFIX": "auth-tests:",
        },
    )
    yield server
    assert server.stop() == 0
    output = "".join(server.output)
    assert SECRET not in output and OLD_SECRET not in output, "a secret reached the log"
    assert "Traceback" not in output


def token(sub: str = "alice", *, ttl_s: float = 600, secret: str = SECRET, **claims: Any) -> str:
    now = time.time()
    payload = {"sub": sub, "aud": "redwire-tests", "iat": int(now), "exp": int(now + ttl_s)}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


class Peer:
    """One `websockets` connection speaking the JSON protocol, with request ids."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = iter(range(1, 1_000_000))
        self.frames: list[dict[str, Any]] = []  # frames read while waiting for others

    async def recv(self) -> dict[str, Any]:
        if self.frames:
            return self.frames.pop(0)
        return json.loads(await asyncio.wait_for(self.ws.recv(), WAIT_S))

    async def wait_for(self, **match: Any) -> dict[str, Any]:
        """The first frame whose fields include `match` (others are kept for later)."""
        for i, frame in enumerate(self.frames):
            if all(frame.get(k) == v for k, v in match.items()):
                return self.frames.pop(i)
        kept: list[dict[str, Any]] = []
        try:
            while True:
                frame = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT_S))
                if all(frame.get(k) == v for k, v in match.items()):
                    return frame
                kept.append(frame)
        finally:
            self.frames.extend(kept)

    async def request(self, **fields: Any) -> dict[str, Any]:
        req_id = next(self.ids)
        await self.ws.send(json.dumps({**fields, "id": req_id}))
        return await self.wait_for(id=req_id)


async def open_peer(broker: ServerProcess, tok: str | None, **kwargs: Any) -> Peer:
    url = f"{broker.url}/ws" + (f"?token={tok}" if tok else "")
    ws = await websockets.connect(url, subprotocols=["redwire.json"], **kwargs)
    peer = Peer(ws)
    welcome = await peer.recv()
    assert welcome["op"] == "welcome", welcome
    return peer


# --- where the token travels ----------------------------------------------------------------


@pytest.mark.parametrize("place", ["query", "subprotocol", "bearer"])
async def test_a_token_in_each_place(broker: ServerProcess, place: str) -> None:
    tok = token()
    url, kwargs = f"{broker.url}/ws", {}
    protocols = ["redwire.json"]
    if place == "query":
        url += f"?token={tok}"
    elif place == "subprotocol":
        protocols.append(f"redwire.token.{tok}")
    else:
        kwargs["additional_headers"] = {"Authorization": f"Bearer {tok}"}
    async with websockets.connect(url, subprotocols=protocols, **kwargs) as ws:
        assert ws.subprotocol == "redwire.json"  # the token entry is never selected
        peer = Peer(ws)
        assert (await peer.recv())["op"] == "welcome"
        assert (await peer.request(op="subscribe", topic="room.lobby"))["op"] == "ack"
        reply = await peer.request(op="presence", topic="room.lobby")
        infos = [c["identity"] for c in reply["clients"].values()]
        assert {"sub": "alice", "role": None} in infos  # the hook saw the verified claims


REFUSED = [
    ("no token", None),
    ("forged", lambda: token()[:-4] + "AAAA"),
    ("unknown secret", lambda: token(secret=secrets.token_hex(32))),
    ("expired", lambda: token(ttl_s=-60)),
    ("wrong audience", lambda: token(aud="someone-else")),
]


@pytest.mark.parametrize(("name", "make"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_refused_at_connect_with_401(broker: ServerProcess, name: str, make: Any) -> None:
    tok = make() if make else None
    url = f"{broker.url}/ws" + (f"?token={tok}" if tok else "")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(url, protocols=["redwire.json"])
    assert info.value.status == 401
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url)
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert SECRET not in response.body.decode()


async def test_the_rotated_secret_still_verifies(broker: ServerProcess) -> None:
    peer = await open_peer(broker, token(secret=OLD_SECRET))
    assert (await peer.request(op="ping"))["op"] == "pong"
    await peer.ws.close()


# --- permissions ------------------------------------------------------------------------------


async def test_a_token_for_chat_a_used_on_chat_b(broker: ServerProcess) -> None:
    peer = await open_peer(broker, token(subs=["chat.a"], pubs=["chat.a"]))
    for op in ("subscribe", "publish"):
        denied = await peer.request(op=op, topic="chat.b", data={"x": 1})
        assert denied["op"] == "error" and denied["code"] == "forbidden", denied
    # Denials are answers, not a close, and not an error flood (far more than 20 of them).
    for _ in range(30):
        denied = await peer.request(op="publish", topic="chat.b", data=1)
        assert denied["code"] == "forbidden"
    assert (await peer.request(op="subscribe", topic="chat.a"))["op"] == "ack"
    assert (await peer.request(op="publish", topic="chat.a", data={"n": 1}))["op"] == "ack"
    message = await peer.wait_for(op="message", topic="chat.a")
    assert message["data"] == {"n": 1}
    await peer.ws.close()


RULE_CASES = [
    # (what, claims, op, topic, origin?, allowed)
    ("read-only topic: subscribe", {}, "subscribe", "ro.news", False, True),
    ("read-only topic: publish", {}, "publish", "ro.news", False, False),
    ("no browser publishing: not a browser", {}, "publish", "web.feed", False, True),
    ("no browser publishing: a browser", {}, "publish", "web.feed", True, False),
    ("a browser may subscribe", {}, "subscribe", "web.feed", True, True),
    ("claim needed, none", {}, "subscribe", "strict.x", False, False),
    ("claim needed, listed", {"subs": ["strict.*"]}, "subscribe", "strict.x", False, True),
    ("claim needed for publish", {"subs": ["strict.*"]}, "publish", "strict.x", False, False),
    ("the hook narrows it", {}, "subscribe", "room.hooked", False, False),
]


@pytest.mark.parametrize(
    ("what", "claims", "op", "topic", "browser", "allowed"),
    RULE_CASES,
    ids=[c[0] for c in RULE_CASES],
)
async def test_topic_rules(
    broker: ServerProcess,
    what: str,
    claims: dict[str, Any],
    op: str,
    topic: str,
    browser: bool,
    allowed: bool,
) -> None:
    kwargs = {"origin": f"http://{broker.host}:{broker.port}"} if browser else {}
    peer = await open_peer(broker, token(**claims), **kwargs)
    reply = await peer.request(op=op, topic=topic, data=1)
    if allowed:
        assert reply["op"] == "ack", reply
    else:
        assert reply["op"] == "error" and reply["code"] == "forbidden", reply
        assert (await peer.request(op="ping"))["op"] == "pong"  # still open
    await peer.ws.close()


# --- expiry during the connection -------------------------------------------------------------


async def test_refreshed_before_exp_stays_open(broker: ServerProcess) -> None:
    first = token(ttl_s=SHORT_S, subs=["chat.*"])
    old_exp = jwt.decode(first, options={"verify_signature": False})["exp"]
    peer = await open_peer(broker, first)
    assert (await peer.request(op="subscribe", topic="chat.r"))["op"] == "ack"
    asked = await peer.wait_for(op="refresh")
    assert asked["expires_in"] <= SHORT_S
    # Another sub is refused; the connection keeps its token.
    other = await peer.request(op="refresh", token=token("mallory"))
    assert other["op"] == "error" and other["code"] == "unauthorized", other
    ack = await peer.request(op="refresh", token=token(ttl_s=600, subs=["chat.*"]))
    assert ack["op"] == "ack" and ack["expires_in"] > SHORT_S, ack
    # Past the old token's exp (and leeway), the connection still works.
    while time.time() < old_exp + LEEWAY_S + 1:
        assert (await peer.request(op="ping"))["op"] == "pong"
        await asyncio.sleep(0.2)  # pace the pings while the old exp passes
    assert (await peer.request(op="publish", topic="chat.r", data="after"))["op"] == "ack"
    assert (await peer.wait_for(op="message", topic="chat.r"))["data"] == "after"
    await peer.ws.close()


async def test_a_narrower_token_leaves_what_it_no_longer_allows(broker: ServerProcess) -> None:
    peer = await open_peer(broker, token(subs=["chat.*"]))
    assert (await peer.request(op="subscribe", topic="chat.x"))["op"] == "ack"
    assert (await peer.request(op="subscribe", topic="chat.y"))["op"] == "ack"
    assert (await peer.request(op="refresh", token=token(subs=["chat.x"])))["op"] == "ack"
    dropped = await peer.wait_for(op="error", topic="chat.y")
    assert dropped["code"] == "forbidden"
    assert (await peer.request(op="publish", topic="chat.x", data=1))["op"] == "ack"
    await peer.ws.close()


async def test_not_refreshed_is_closed_4001(broker: ServerProcess) -> None:
    peer = await open_peer(broker, token(ttl_s=SHORT_S))
    assert (await peer.wait_for(op="refresh"))["op"] == "refresh"
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(peer.ws.recv(), WAIT_S)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4001
    assert "new token" in closed.value.rcvd.reason


# --- the Python client ------------------------------------------------------------------------


async def test_the_python_client_refreshes_through_its_provider(broker: ServerProcess) -> None:
    asked: list[str] = []

    async def provider() -> str:
        asked.append(token(ttl_s=SHORT_S, subs=["py.*"], pubs=["py.*"]))
        return asked[-1]

    rw = await connect(f"{broker.url}/ws", token=provider, token_transport="header")
    try:
        sub = await rw.subscribe("py.t")

        async def refreshed_past_the_first_exp() -> bool:
            first_exp = jwt.decode(asked[0], options={"verify_signature": False})["exp"]
            return rw.token_refreshes >= 2 and time.time() > first_exp + LEEWAY_S

        await eventually(refreshed_past_the_first_exp, timeout_s=WAIT_S)
        assert rw.disconnects == 0  # the same connection all along
        await rw.publish("py.t", {"still": "here"})
        message = await sub.get(timeout_s=WAIT_S)
        assert isinstance(message, Message) and message.data == {"still": "here"}
        with pytest.raises(ClientError) as denied:
            await rw.publish("other.t", 1)
        assert denied.value.code == "forbidden"
    finally:
        await rw.close()


async def test_the_python_client_with_a_fixed_token_stops_at_4001(broker: ServerProcess) -> None:
    rw = await connect(f"{broker.url}/ws", token=token(ttl_s=SHORT_S))
    try:
        sub = await rw.subscribe("py.fixed")
        with pytest.raises(ConnectionClosedError) as closed:
            while True:
                await sub.get(timeout_s=WAIT_S)
        assert closed.value.code == 4001
        assert rw.state == "closed" and rw.last_close_code == 4001
    finally:
        await rw.close()


# --- redwire.js (in Node, with the `ws` package as its WebSocket) ------------------------------

NODE_DIR = REPO / "tests" / "interop" / "node"
REDWIRE_JS = REPO / "client" / "js" / "redwire.js"
JS_REFRESH = """
import { createHmac } from "node:crypto";
import WebSocket from "ws";
import * as rw from %(client)s;

const [url, secret, audience, ttl, leeway] = %(args)s;
const b64 = (x) => Buffer.from(typeof x === "string" ? x : JSON.stringify(x)).toString("base64url");
function sign(claims) {  // an HS256 JWT, as an application's login endpoint would make it
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ aud: audience, iat: now,
                                                          exp: now + ttl, ...claims })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
const within = (promise, what, ms = 30000) => {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
};
const until = (check, what) => within(new Promise((resolve) => {
  const poll = () => (check() ? resolve() : setTimeout(poll, 50));
  poll();
}), what);

const result = {};
// 1. A token function: the client answers each refresh request and stays connected.
let firstExp = null;
const provider = async () => {
  const token = sign({ sub: "js-alice", subs: ["js.*"], pubs: ["js.*"] });
  firstExp ??= JSON.parse(Buffer.from(token.split(".")[1], "base64url")).exp;
  return token;
};
const client = rw.connect(url, { WebSocketImpl: WebSocket, token: provider,
                                 tokenTransport: "protocol" });
const disconnects = [];
client.on("disconnected", (info) => disconnects.push(info.code));
const got = [];
const sub = client.subscribe("js.t", (data) => got.push(data));
await within(sub.ready, "subscribe");
await until(() => client.stats.tokenRefreshes >= 2 && Date.now() / 1000 > firstExp + leeway,
            "two refreshes, past the first token's exp");
await within(client.publish("js.t", { still: "here" }), "publish");
await until(() => got.length > 0, "the message");
result.got = got;
result.disconnects = [...disconnects];  // before close() adds its own 1000
result.denied = await within(client.publish("other.t", 1).then(() => "acked", (e) => e.code),
                             "a forbidden publish");
result.url = client.url;
client.close();

// 2. A fixed token: closed 4001 at its exp, and the client stops (it cannot refresh).
const fixed = rw.connect(url, { WebSocketImpl: WebSocket, token: sign({ sub: "js-bob" }) });
const ended = new Promise((resolve) => fixed.on("disconnected", resolve));
const errors = [];
fixed.on("error", (e) => errors.push({ code: e.code, closeCode: e.closeCode ?? null }));
const info = await within(ended, "the 4001 close");
result.fixed = { code: info.code, willReconnect: info.willReconnect, state: fixed.state, errors };
console.log(JSON.stringify(result));
"""


def test_redwire_js_refreshes_through_its_token_function(broker: ServerProcess) -> None:
    node = shutil.which("node")
    assert node, "node is required (.ci/run installs it)"
    assert (NODE_DIR / "node_modules" / "ws").is_dir(), "run npm install in tests/interop/node"
    args = [f"{broker.url}/ws", SECRET, "redwire-tests", SHORT_S, LEEWAY_S]
    script = JS_REFRESH % {
        "client": json.dumps(REDWIRE_JS.as_uri()),
        "args": json.dumps(args),
    }
    done = subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["got"] == [{"still": "here"}]
    assert result["disconnects"] == []  # one connection all along
    assert result["denied"] == "forbidden"
    assert "token" not in result["url"]  # sent as a subprotocol entry, not in the URL
    assert result["fixed"]["code"] == 4001
    assert result["fixed"]["willReconnect"] is False and result["fixed"]["state"] == "closed"
    assert {"code": "closed", "closeCode": 4001} in result["fixed"]["errors"]


# --- a JWKS served over HTTP, reloaded by the workers ------------------------------------------


class JwksServer:
    """A JWKS document on a loopback HTTP server (a thread), replaceable and stoppable."""

    def __init__(self) -> None:
        self.document = b'{"keys": []}'
        self.stopped = False
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the http.server API names it
                outer.fetches += 1
                body = outer.document
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, *keys: tuple[str, rsa.RSAPrivateKey]) -> None:
        entries = []
        for kid, key in keys:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            entries.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        self.document = json.dumps({"keys": entries}).encode()

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()


def rsa_token(key: rsa.RSAPrivateKey, kid: str) -> str:
    now = int(time.time())
    claims = {"sub": "carol", "aud": "redwire-tests", "iat": now, "exp": now + 600}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


async def connects(broker: ServerProcess, tok: str) -> bool:
    """Whether an upgrade with `tok` is welcomed (False on 401/503)."""
    try:
        async with websockets.connect(f"{broker.url}/ws?token={tok}") as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))["op"] == "welcome"
    except InvalidStatus as exc:
        assert exc.response.status_code in (401, 503), exc.response.status_code
        return False


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def serve_with_jwks(
    redis_url: str, key: rsa.RSAPrivateKey, **env: str
) -> tuple[JwksServer, ServerProcess]:
    """A JWKS URL holding `key` as "k1", and one worker taking RS256 tokens for
    `redwire-tests` against it; `env` on top."""
    jwks = JwksServer()
    jwks.publish(("k1", key))
    base = {"REDWIRE_JWT_JWKS": jwks.url, "REDWIRE_JWT_AUDIENCE": "redwire-tests"}
    return jwks, serve(redis_url, workers=1, env={**base, **env})


async def test_a_jwks_url_is_reloaded_and_kept_when_unreachable(redis_server) -> None:
    first, second = new_rsa_key(), new_rsa_key()
    jwks, server = serve_with_jwks(
        redis_server.url,
        first,
        REDWIRE_JWT_JWKS_REFRESH_S="0.5",
        REDWIRE_CHANNEL_PREFIX="auth-jwks:",
    )
    try:
        assert await connects(server, rsa_token(first, "k1"))
        assert not await connects(server, rsa_token(second, "k2"))  # not published yet
        jwks.publish(("k1", first), ("k2", second))  # key rotation: the new key appears

        async def second_key_works() -> bool:
            return await connects(server, rsa_token(second, "k2"))

        await eventually(second_key_works, timeout_s=WAIT_S, interval_s=0.2)
        start = len(server.output)
        jwks.stop()  # the JWKS endpoint goes away: the keys loaded stay
        await asyncio.to_thread(server.wait_for_output, "JWKS .* not loaded", WAIT_S, start)
        assert await connects(server, rsa_token(first, "k1"))
        assert await connects(server, rsa_token(second, "k2"))
    finally:
        jwks.stop()
        assert server.stop() == 0
    assert "Traceback" not in "".join(server.output)


async def test_a_key_rotated_in_is_taken_at_once_and_made_up_kids_cost_no_fetch_each(
    redis_server,
) -> None:
    """The periodic reload is 300 s away: a token signed with a key just added to the JWKS
    is taken at its upgrade (and in a `refresh`), because an unknown kid loads the JWKS
    again; tokens with made-up kids make at most one fetch per `jwt_jwks_min_refresh_s`."""
    first, second, third = new_rsa_key(), new_rsa_key(), new_rsa_key()
    jwks, server = serve_with_jwks(
        redis_server.url,
        first,
        REDWIRE_JWT_JWKS_REFRESH_S="300",
        REDWIRE_JWT_JWKS_MIN_REFRESH_S="1",
        REDWIRE_CHANNEL_PREFIX="auth-kid:",
    )
    try:
        assert await connects(server, rsa_token(first, "k1"))
        jwks.publish(("k1", first), ("k2", second))

        async def second_key_works() -> bool:  # refused only within 1 s of the start's load
            return await connects(server, rsa_token(second, "k2"))

        await eventually(second_key_works, timeout_s=WAIT_S, interval_s=0.2)

        fetches, started = jwks.fetches, time.monotonic()
        for i in range(20):
            assert not await connects(server, rsa_token(second, f"made-up-{i}"))
        elapsed_s = time.monotonic() - started
        assert jwks.fetches - fetches <= 1 + elapsed_s  # one per second at most, not 20

        jwks.publish(("k1", first), ("k2", second), ("k3", third))
        async with websockets.connect(f"{server.url}/ws?token={rsa_token(second, 'k2')}") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))["op"] == "welcome"

            async def refreshed_with_the_third_key() -> bool:
                request = {"op": "refresh", "id": 1, "token": rsa_token(third, "k3")}
                await ws.send(json.dumps(request))
                reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
                assert reply["id"] == 1 and reply["op"] in ("ack", "error"), reply
                return reply["op"] == "ack"

            # 0.5 s apart: the refusals before the load (within 1 s) stay far from the
            # error flood limit (max_errors_per_window)
            await eventually(refreshed_with_the_third_key, timeout_s=WAIT_S, interval_s=0.5)
    finally:
        jwks.stop()
        assert server.stop() == 0
    assert "Traceback" not in "".join(server.output)


# --- redwire.js in headless Chromium: the token as a subprotocol entry --------------------------

CHROMIUM = os.environ.get("REDWIRE_CHROMIUM", "/usr/bin/chromium")
BROWSER_REFRESH = """
async (waitMs) => {
  const rw = await import("/redwire.js");
  const client = rw.connect(undefined, { token: () => window.newToken(),
                                         tokenTransport: "protocol" });
  const disconnects = [];
  client.on("disconnected", (info) => disconnects.push(info.code));
  const deadline = Date.now() + waitMs;
  const until = async (check) => {
    while (!check()) {
      if (Date.now() > deadline) throw new Error("timed out");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };
  const got = [];
  const sub = client.subscribe("web.page", (data) => got.push(data));
  await sub.ready;
  await until(() => client.stats.tokenRefreshes >= 2);
  const denied = await client.publish("web.page", 1).then(() => "acked", (e) => e.code);
  client.close();
  return { refreshes: client.stats.tokenRefreshes, disconnects: disconnects.slice(0, -1),
           denied, url: client.url };
}
"""


def test_redwire_js_in_chromium_with_the_token_as_a_subprotocol(broker: ServerProcess) -> None:
    """Chromium accepts `redwire.token.<jwt>` beside `redwire.json` (the server selects the
    latter), refreshes through the token function, and gets `forbidden` from a topic rule
    that stops browsers publishing (`web.*`)."""
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"http://{broker.host}:{broker.port}/")
            page.expose_function("newToken", lambda: token("web-dave", ttl_s=SHORT_S))
            result = page.evaluate(BROWSER_REFRESH, WAIT_S * 1000)
        finally:
            browser.close()
    assert result["refreshes"] >= 2
    assert result["disconnects"] == []  # one connection while the tokens came and went
    assert result["denied"] == "forbidden"  # a browser (it sent Origin) on a web.* topic
    assert "token" not in result["url"]


# --- anonymous access beside tokens ----------------------------------------------------------


async def test_join_and_leave_only_reach_those_who_may_see_presence(
    broker: ServerProcess,
) -> None:
    """`join`/`leave` frames are presence: on a topic whose rule says allow_presence =
    "claim", a subscriber whose token's subs claim lists the topic sees them, one whose
    token has no subs claim (it may subscribe: allow_subscribe is "any") does not."""
    watcher = await open_peer(broker, token("watcher", subs=["lobby.*"]))
    blind = await open_peer(broker, token("blind"))
    for peer in (watcher, blind):
        assert (await peer.request(op="subscribe", topic="lobby.1"))["op"] == "ack"
    assert (await blind.request(op="presence", topic="lobby.1"))["code"] == "forbidden"
    newcomer = await open_peer(broker, token("newcomer"))
    assert (await newcomer.request(op="subscribe", topic="lobby.1"))["op"] == "ack"
    joined = await watcher.wait_for(op="join")
    assert joined["topic"] == "lobby.1"
    # A message after the join, on the same channel: the blind subscriber gets the message
    # and nothing before it.
    assert (await newcomer.request(op="publish", topic="lobby.1", data="hi"))["op"] == "ack"
    message = await blind.wait_for(op="message")
    assert message["data"] == "hi"
    assert not [f for f in blind.frames if f.get("op") in ("join", "leave")]
    for peer in (watcher, blind, newcomer):
        await peer.ws.close()


async def test_anonymous_access_when_allowed(redis_server, tmp_path: Path) -> None:
    secret_file = tmp_path / "jwt_secrets"
    secret_file.write_text(SECRET)
    rules = [{"pattern": "members.*", "allow_subscribe": "authenticated"}]
    server = serve(
        redis_server.url,
        workers=1,
        args=("--jwt-secret-file", str(secret_file)),
        env={
            "REDWIRE_ALLOW_ANONYMOUS": "true",
            "REDWIRE_JWT_AUDIENCE": "redwire-tests",
            "REDWIRE_TOPICS": json.dumps(rules),
            "REDWIRE_CHANNEL_PREFIX": "auth-anon:",
        },
    )
    try:
        anonymous = await open_peer(server, None)
        assert (await anonymous.request(op="subscribe", topic="public.x"))["op"] == "ack"
        denied = await anonymous.request(op="subscribe", topic="members.x")
        assert denied["code"] == "forbidden" and "needs a token" in denied["reason"]
        member = await open_peer(server, token())
        assert (await member.request(op="subscribe", topic="members.x"))["op"] == "ack"
        # A bad token is refused, not taken as anonymous.
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{server.url}/ws?token={token(ttl_s=-60)}")
        assert refused.value.response.status_code == 401
        await anonymous.ws.close()
        await member.ws.close()
    finally:
        assert server.stop() == 0
