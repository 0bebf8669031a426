"""client/js/redwire.js in node against a scripted fake WebSocket: the client's own logic.

Each test runs one ES module in `node --input-type=module`; the module drives the client
through a `FakeSocket` (the `WebSocketImpl` option) playing the server, and prints one JSON
result for the assertions here. Waiting is on the client's events, with a deadline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from client.pubsub import CLOSE_CODE_POLICY, reconnect_policy

CLIENT = Path(__file__).resolve().parents[2] / "client" / "js" / "redwire.js"

HARNESS = """
import * as rw from %(client)s;

class FakeSocket {
  static all = [];
  static onCreate = null;
  constructor(url, protocols) {
    Object.assign(this, { url, protocols, sent: [], closedWith: null, onSend: null });
    FakeSocket.all.push(this);
    const hook = FakeSocket.onCreate;
    FakeSocket.onCreate = null;
    hook?.(this);
  }
  send(text) {
    const frame = JSON.parse(text);
    this.sent.push(frame);
    this.onSend?.(frame);
  }
  close(code, reason) { this.closedWith = [code, reason]; }
  deliver(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  welcome(heartbeat = { interval: 3600, timeout: 3600 }, worker = "0") {
    this.deliver({ op: "welcome", version: 1, client: `${worker}-1`, worker, heartbeat });
  }
  ackAll(op) {
    for (const f of this.sent.filter((f) => f.op === op)) this.deliver({ op: "ack", id: f.id });
  }
  serverClose(code, reason = "") { this.onclose?.({ code, reason }); }
  ops() { return this.sent.map((f) => f.op === "publish" || f.op === "subscribe"
    ? `${f.op}:${f.topic}` : f.op); }
}

function deadline(promise, what, ms = 3000) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
const nextSocket = () => deadline(new Promise((r) => { FakeSocket.onCreate = r; }), "socket");
const nextEvent = (client, name) =>
  deadline(new Promise((r) => { const off = client.on(name, (x) => { off(); r(x); }); }), name);
const settle = (p) => p.then(() => "resolved", (e) => ({ code: e.code, reason: e.reason,
  topic: e.topic, closeCode: e.closeCode, name: e.name }));
const open = (opts = {}) => rw.connect("ws://test.invalid/ws", {
  WebSocketImpl: FakeSocket, reconnect: { minDelayMs: 1, maxDelayMs: 5 }, ...opts });

const result = await (async () => {
%(body)s
})();
console.log(JSON.stringify(result));
process.exit(0);
"""


def run_js(body: str) -> Any:
    node = shutil.which("node")
    assert node, "node is needed for the JS client tests (apt-get install -y nodejs)"
    source = HARNESS % {"client": json.dumps(CLIENT.as_uri()), "body": body}
    proc = subprocess.run(
        [node, "--input-type=module", "-e", source],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_backoff_is_full_jitter_under_a_capped_exponential() -> None:
    result = run_js(
        """
        const d = (attempt, r) => rw.backoffDelay(attempt, 100, 5000, () => r);
        return {
          low: [0, 1, 5, 10].map((a) => d(a, 0)),
          high: [0, 1, 2, 3, 5, 6, 10, 1000].map((a) => d(a, 0.999999)),
          mid: d(2, 0.5),
        };
        """
    )
    assert result["low"] == [0, 0, 0, 0]
    assert result["high"] == [99, 199, 399, 799, 3199, 4999, 4999, 4999]
    assert result["mid"] == 200


# The contract's close-code table (docs/protocol.md, "Close codes"): both clients follow it.
CLOSE_CODE_TABLE = {
    1000: "never",
    1001: "now",
    1002: "never",
    1003: "never",
    1005: "backoff",
    1006: "backoff",
    1007: "never",
    1008: "never",
    1009: "never",
    1010: "never",
    1011: "backoff",
    1012: "backoff",
    1013: "backoff",
    1014: "backoff",
    4000: "backoff",
}


def test_both_clients_follow_one_close_code_table() -> None:
    codes = json.dumps(sorted(CLOSE_CODE_TABLE))
    result = run_js(
        f"""
        const codes = {codes};
        return {{ policy: codes.map((c) => [c, rw.reconnectPolicy(c)]),
                 table: rw.CLOSE_CODE_POLICY, never: rw.NO_RECONNECT_CLOSE_CODES,
                 frozen: Object.isFrozen(rw.CLOSE_CODE_POLICY) }};
        """
    )
    js = {int(code): policy for code, policy in result["policy"]}
    python = {code: reconnect_policy(code) for code in CLOSE_CODE_TABLE}
    assert js == python == CLOSE_CODE_TABLE
    # The exported constants are one table, the same in both clients.
    assert {int(c): p for c, p in result["table"].items()} == dict(CLOSE_CODE_POLICY)
    assert sorted(result["never"]) == sorted(
        c for c, p in CLOSE_CODE_POLICY.items() if p == "never"
    )
    assert result["frozen"] is True


def test_close_code_policy_and_url_resolution() -> None:
    result = run_js(
        """
        const codes = [1000, 1001, 1002, 1006, 1007, 1008, 1009, 1011, 1013, 4000];
        const page = { href: "https://example.test/app/page.html?x=1#frag" };
        return {
          policy: codes.map((c) => [c, rw.reconnectPolicy(c)]),
          pageDefault: rw.resolveUrl(undefined, undefined, page),
          relative: rw.resolveUrl("stream", "t&k=1", page),
          plain: rw.resolveUrl("http://h.test:8765/ws?a=b", "tok", undefined),
          outside: (() => { try { rw.resolveUrl(undefined, undefined, undefined); }
                            catch (e) { return e.name; } })(),
          badScheme: (() => { try { rw.resolveUrl("ftp://h/", undefined, undefined); }
                              catch (e) { return e.name; } })(),
        };
        """
    )
    assert dict(result["policy"]) == {
        1000: "never",
        1001: "now",
        1002: "never",
        1006: "backoff",
        1007: "never",
        1008: "never",
        1009: "never",
        1011: "backoff",
        1013: "backoff",
        4000: "backoff",
    }
    assert result["pageDefault"] == "wss://example.test/ws"
    assert result["relative"] == "wss://example.test/app/stream?token=t%26k%3D1"
    assert result["plain"] == "ws://h.test:8765/ws?a=b&token=tok"
    assert result["outside"] == "TypeError"
    assert result["badScheme"] == "TypeError"


def test_requests_wait_for_welcome_then_subscriptions_go_before_queued_publishes() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        const states = [client.state];
        const got = [];
        const sub = client.subscribe("news", (data, meta) => got.push([data, meta]));
        const p1 = client.publish("news", { n: 1 });
        const p2 = client.publish("news", "two");
        const sentBeforeWelcome = ws.sent.length;
        const connected = nextEvent(client, "connected");
        ws.welcome(undefined, "3");
        const info = await connected;
        states.push(client.state);
        const order = ws.ops();
        ws.ackAll("subscribe");
        ws.ackAll("publish");
        ws.deliver({ op: "message", topic: "news", data: { n: 1 } });
        ws.deliver({ op: "message", topic: "other", data: "not for us" });
        return { sentBeforeWelcome, states, order, info, worker: client.worker,
                 clientId: client.clientId, protocols: ws.protocols,
                 ready: await settle(sub.ready), p1: await settle(p1), p2: await settle(p2),
                 got, data: ws.sent.filter((f) => f.op === "publish").map((f) => f.data) };
        """
    )
    assert result["sentBeforeWelcome"] == 0
    assert result["states"] == ["connecting", "open"]
    assert result["order"] == ["subscribe:news", "publish:news", "publish:news"]
    assert result["info"] == {"worker": "3", "clientId": "3-1", "reconnected": False}
    assert (result["worker"], result["clientId"]) == ("3", "3-1")
    assert result["protocols"] == ["redwire.json"]
    assert result["ready"] == result["p1"] == result["p2"] == "resolved"
    assert result["got"] == [[{"n": 1}, {"topic": "news"}]]
    assert result["data"] == [{"n": 1}, "two"]


def test_queue_is_bounded_and_rejects_with_queue_full_at_once() -> None:
    result = run_js(
        """
        const client = open({ maxQueuedPublishes: 2 });
        const a = client.publish("t", 1), b = client.publish("t", 2);
        const c = await settle(client.publish("t", 3));
        const queued = client.queuedPublishes;
        const notJson = await settle(client.publish("t", { big: 1n }));
        const undef = await settle(client.publish("t", undefined));
        client.close();
        return { c, queued, notJson: notJson.code, undef: undef.code,
                 a: await settle(a), b: await settle(b), state: client.state };
        """
    )
    assert result["c"]["code"] == "queue_full"
    assert "maxQueuedPublishes" in result["c"]["reason"]
    assert result["queued"] == 2
    assert result["notJson"] == result["undef"] == "bad_request"
    assert result["a"]["code"] == result["b"]["code"] == "closed"
    assert result["state"] == "closed"


def test_server_errors_reject_with_code_and_reason() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        ws.welcome();
        const errors = [];
        client.on("error", (e) => errors.push({ code: e.code, topic: e.topic }));
        const pub = client.publish("bad topic", 1);
        const sub = client.subscribe("secret", () => {});
        const [p, s] = ws.sent;
        ws.deliver({ op: "error", id: p.id, code: "bad_topic", reason: "no spaces" });
        ws.deliver({ op: "error", id: s.id, code: "forbidden", reason: "denied" });
        ws.deliver({ op: "error", code: "bad_request", reason: "unattributed" });
        return { pub: await settle(pub), sub: await settle(sub.ready), active: sub.active,
                 errors, state: client.state };
        """
    )
    assert result["pub"]["code"] == "bad_topic"
    assert result["pub"]["reason"] == "no spaces"
    assert result["pub"]["name"] == "RedwireError"
    assert result["sub"]["code"] == "forbidden"
    assert result["sub"]["topic"] == "secret"
    assert result["active"] is False
    assert result["errors"] == [
        {"code": "forbidden", "topic": "secret"},
        {"code": "bad_request"},  # no topic: JSON drops undefined
    ]
    assert result["state"] == "open"


def test_reconnect_resubscribes_and_rejects_publishes_in_flight() -> None:
    result = run_js(
        """
        const client = open();
        const ws1 = FakeSocket.all[0];
        ws1.welcome(undefined, "0");
        const got = [];
        const a = client.subscribe("a", (d) => got.push(["a", d]));
        client.subscribe("b", (d) => got.push(["b", d]));
        ws1.ackAll("subscribe");
        await a.ready;
        const inFlight = settle(client.publish("a", "lost?"));
        const disconnected = nextEvent(client, "disconnected");
        const next = nextSocket();
        ws1.serverClose(1011, "keepalive ping timeout");
        const info = await disconnected;
        const stateDuring = client.state;
        const queued = client.publish("a", "queued");
        const ws2 = await next;
        const connected = nextEvent(client, "connected");
        ws2.welcome(undefined, "1");
        const again = await connected;
        const order = ws2.ops();
        ws2.ackAll("subscribe");
        ws2.ackAll("publish");
        ws2.deliver({ op: "message", topic: "b", data: "after" });
        return { info, stateDuring, again, order, got, inFlight: await inFlight,
                 queued: await settle(queued), url: ws2.url };
        """
    )
    assert result["info"]["code"] == 1011
    assert result["info"]["willReconnect"] is True
    assert 0 <= result["info"]["delayMs"] <= 5
    assert result["stateDuring"] == "connecting"
    assert result["again"] == {"worker": "1", "clientId": "1-1", "reconnected": True}
    assert result["order"] == ["subscribe:a", "subscribe:b", "publish:a"]
    assert result["got"] == [["b", "after"]]
    assert result["inFlight"]["code"] == "outcome_unknown"  # sent, no answer, no key
    assert result["queued"] == "resolved"
    assert result["url"] == "ws://test.invalid/ws"


def test_close_codes_that_forbid_reconnecting_end_the_client() -> None:
    result = run_js(
        """
        const out = {};
        for (const code of [1000, 1002, 1003, 1007, 1008, 1009, 1010]) {
          const before = FakeSocket.all.length;
          const client = open();
          const ws = FakeSocket.all.at(-1);
          ws.welcome();
          const errors = [];
          client.on("error", (e) => errors.push([e.code, e.closeCode, e.reason]));
          const disconnected = nextEvent(client, "disconnected");
          ws.serverClose(code, "because");
          const info = await disconnected;
          const queued = await settle(client.publish("t", 1));
          const sub = await settle(client.subscribe("t", () => {}).ready);
          out[code] = { info, errors, state: client.state, queued: queued.code, sub: sub.code,
                        sockets: FakeSocket.all.length - before };
        }
        return out;
        """
    )
    for code, r in result.items():
        assert r["info"] == {
            "code": int(code),
            "reason": "because",
            "willReconnect": False,
            "delayMs": None,
        }
        assert r["errors"] == [["closed", int(code), "because"]]
        assert r["state"] == "closed"
        assert r["queued"] == r["sub"] == "closed"
        assert r["sockets"] == 1


def test_going_away_reconnects_at_once_and_attempts_grow_until_healthy() -> None:
    result = run_js(
        """
        const client = open({ reconnect: { minDelayMs: 1000, maxDelayMs: 1000 } });
        FakeSocket.all[0].welcome();
        const drained = nextEvent(client, "disconnected");
        const next = nextSocket();
        FakeSocket.all[0].serverClose(1001, "draining");
        const info = await drained;
        await next;
        client.close();
        return { info, sockets: FakeSocket.all.length };
        """
    )
    assert result["info"] == {
        "code": 1001,
        "reason": "draining",
        "willReconnect": True,
        "delayMs": 0,
    }
    assert result["sockets"] == 2


def test_heartbeat_pings_and_a_silent_server_is_abandoned() -> None:
    result = run_js(
        """
        const client = open();
        const ws1 = FakeSocket.all[0];
        // A server that answers: five pings, each answered, no disconnect.
        let pongs = 0;
        const answered = deadline(new Promise((resolve) => {
          ws1.onSend = (f) => {
            if (f.op !== "ping") return;
            ws1.deliver({ op: "pong", id: f.id });
            if (++pongs === 5) resolve();
          };
        }), "five pongs");
        let drops = 0;
        client.on("disconnected", () => drops++);
        ws1.welcome({ interval: 0.01, timeout: 0.05 });
        await answered;
        const dropsWhileAnswered = drops;
        // Then it stops answering: the client gives up on the socket and opens another.
        ws1.onSend = null;
        const disconnected = nextEvent(client, "disconnected");
        const next = nextSocket();
        const info = await disconnected;
        await next;
        client.close();
        return { dropsWhileAnswered, info, closedWith: ws1.closedWith,
                 pings: ws1.sent.filter((f) => f.op === "ping").length };
        """
    )
    assert result["dropsWhileAnswered"] == 0
    assert result["info"]["code"] == 1006
    assert result["info"]["willReconnect"] is True
    assert "heartbeat" in result["info"]["reason"]
    assert result["closedWith"][0] == 4000
    assert result["pings"] >= 6


def test_no_welcome_in_time_is_retried() -> None:
    result = run_js(
        """
        const client = open({ connectTimeoutMs: 20 });
        const disconnected = nextEvent(client, "disconnected");
        const next = nextSocket();
        const info = await disconnected;
        await next;
        client.close();
        return { info, closedWith: FakeSocket.all[0].closedWith };
        """
    )
    assert result["info"]["code"] == 1006
    assert "welcome" in result["info"]["reason"]
    assert result["closedWith"][0] == 4000


def test_subscriptions_to_one_topic_share_the_wire_and_handlers_are_isolated() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        ws.welcome();
        const got = [];
        const s1 = client.subscribe("t", () => { throw new Error("handler bug"); });
        const s2 = client.subscribe("t", (d) => got.push(["s2", d]));
        ws.ackAll("subscribe");
        const ready = [await settle(s1.ready), await settle(s2.ready)];
        const s3 = client.subscribe("t", (d) => got.push(["s3", d]));
        const lateReady = await settle(s3.ready);
        const reported = [];
        console.error = (e) => reported.push(String(e.message ?? e));
        ws.deliver({ op: "message", topic: "t", data: 1 });
        await s1.unsubscribe();
        await s2.unsubscribe();
        const opsAfterTwo = ws.ops();
        const last = s3.unsubscribe();
        ws.ackAll("unsubscribe");
        await last;
        ws.deliver({ op: "message", topic: "t", data: 2 });
        return { ready, lateReady, got, reported, opsAfterTwo, ops: ws.ops(),
                 active: [s1.active, s2.active, s3.active] };
        """
    )
    assert result["ready"] == ["resolved", "resolved"]
    assert result["lateReady"] == "resolved"
    assert result["got"] == [["s2", 1], ["s3", 1]]
    assert result["reported"] == ["handler bug"]
    assert result["opsAfterTwo"] == ["subscribe:t"]
    assert result["ops"] == ["subscribe:t", "unsubscribe"]
    assert result["active"] == [False, False, False]


def test_a_resubscription_refused_as_unavailable_is_retried() -> None:
    result = run_js(
        """
        const client = open();
        const ws1 = FakeSocket.all[0];
        ws1.welcome();
        const sub = client.subscribe("t", () => {});
        ws1.ackAll("subscribe");
        await sub.ready;
        const next = nextSocket();
        ws1.serverClose(1006, "");
        const ws2 = await next;
        const errors = [];
        client.on("error", (e) => errors.push([e.code, e.topic]));
        ws2.welcome();
        const retried = deadline(new Promise((resolve) => {
          ws2.onSend = (f) => { if (f.op === "subscribe") resolve(f.topic); };
        }), "resubscribe retry");
        const first = ws2.sent.find((f) => f.op === "subscribe");
        ws2.deliver({ op: "error", id: first.id, code: "unavailable", reason: "bus down" });
        const topic = await retried;
        return { topic, errors, active: sub.active };
        """
    )
    assert result["topic"] == "t"
    assert result["errors"] == [["unavailable", "t"]]
    assert result["active"] is True


# --- history: positions, recovery, gaps; presence ---------------------------------------------


def test_resubscribe_sends_since_the_last_message_and_a_recovery_replays_without_gap() -> None:
    result = run_js(
        """
        const client = open();
        const ws1 = FakeSocket.all[0];
        ws1.welcome();
        const got = [], gaps = [];
        client.on("gap", (g) => gaps.push(g));
        const sub = client.subscribe("feed.a", (data, meta) => got.push([data, meta]));
        const first = ws1.sent.find((f) => f.op === "subscribe");
        ws1.deliver({ op: "ack", id: first.id, offset: 4, epoch: "e1", recovered: false });
        await sub.ready;
        const afterAck = client.position("feed.a");
        ws1.deliver({ op: "message", topic: "feed.a", offset: 5, epoch: "e1", data: "five" });
        ws1.deliver({ op: "message", topic: "feed.a", offset: 6, epoch: "e1", data: "six" });
        const beforeDrop = client.position("feed.a");
        const next = nextSocket();
        ws1.serverClose(1006, "");
        const ws2 = await next;
        ws2.welcome();
        const resub = ws2.sent.find((f) => f.op === "subscribe");
        // The ack's offset is where the subscription starts from; the replay of 7..8 follows.
        ws2.deliver({ op: "ack", id: resub.id, offset: 6, epoch: "e1", recovered: true });
        const afterRecoveredAck = client.position("feed.a");
        ws2.deliver({ op: "message", topic: "feed.a", offset: 7, epoch: "e1", data: "seven" });
        ws2.deliver({ op: "message", topic: "feed.a", offset: 8, epoch: "e1", data: "eight" });
        return { first, afterAck, beforeDrop, resub, afterRecoveredAck, got, gaps,
                 position: client.position("feed.a"), unknown: client.position("nope"),
                 dropped: client.stats.duplicatesDropped };
        """
    )
    assert "since" not in result["first"]
    assert result["afterAck"] == {"offset": 4, "epoch": "e1"}
    assert result["beforeDrop"] == {"offset": 6, "epoch": "e1"}
    assert result["resub"]["topic"] == "feed.a"
    assert result["resub"]["since"] == {"offset": 6, "epoch": "e1"}
    assert result["afterRecoveredAck"] == {"offset": 6, "epoch": "e1"}
    assert result["got"] == [
        [data, {"topic": "feed.a", "offset": offset, "epoch": "e1"}]
        for data, offset in [("five", 5), ("six", 6), ("seven", 7), ("eight", 8)]
    ]
    assert result["gaps"] == []
    assert result["position"] == {"offset": 8, "epoch": "e1"}
    assert result["unknown"] is None
    assert result["dropped"] == 0


def test_not_recovered_reports_a_gap_and_takes_the_acks_position() -> None:
    result = run_js(
        """
        const client = open();
        const ws1 = FakeSocket.all[0];
        ws1.welcome();
        const log = [];
        client.on("gap", (g) => log.push(["event", g]));
        client.subscribe("feed.b", (data, meta) => log.push(["message", data, meta.offset]), {
          onGap: (g) => log.push(["onGap", g]),
        });
        ws1.deliver({ op: "ack", id: ws1.sent[0].id, offset: 10, epoch: "old", recovered: false });
        ws1.deliver({ op: "message", topic: "feed.b", offset: 11, epoch: "old", data: "a" });
        const next = nextSocket();
        ws1.serverClose(1011, "");
        const ws2 = await next;
        ws2.welcome();
        const resub = ws2.sent.find((f) => f.op === "subscribe");
        // Redis came back empty: a new epoch, history cannot reach back to 12.
        ws2.deliver({ op: "ack", id: resub.id, offset: 3, epoch: "new", recovered: false });
        const afterAck = client.position("feed.b");
        ws2.deliver({ op: "message", topic: "feed.b", offset: 3, epoch: "new", data: "seen" });
        ws2.deliver({ op: "message", topic: "feed.b", offset: 4, epoch: "new", data: "b" });
        return { since: resub.since, afterAck, log, position: client.position("feed.b"),
                 dropped: client.stats.duplicatesDropped };
        """
    )
    gap = {"topic": "feed.b", "reason": "not_recovered"}
    assert result["since"] == {"offset": 11, "epoch": "old"}
    assert result["afterAck"] == {"offset": 3, "epoch": "new"}
    # The gap comes before any message that follows the ack; offset 3 is the ack's, seen.
    assert result["log"] == [
        ["message", "a", 11],
        ["onGap", gap],
        ["event", gap],
        ["message", "b", 4],
    ]
    assert result["position"] == {"offset": 4, "epoch": "new"}
    assert result["dropped"] == 1


def test_duplicates_are_dropped_and_another_epoch_starts_over() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        ws.welcome();
        const got = [];
        client.subscribe("feed.c", (data, meta) => got.push([data, meta.offset, meta.epoch]));
        ws.deliver({ op: "ack", id: ws.sent[0].id, offset: 0, epoch: "e" });
        const m = (offset, epoch, data) =>
          ws.deliver({ op: "message", topic: "feed.c", offset, epoch, data });
        m(1, "e", "1"); m(2, "e", "2"); m(2, "e", "2 again"); m(1, "e", "1 again");
        m(0, "e", "ack's own"); m(3, "e", "3");
        m(1, "f", "new epoch"); m(1, "f", "new epoch again"); m(2, "f", "2f");
        // No history on this topic: nothing tracked, nothing dropped.
        client.subscribe("plain", (data, meta) => got.push([data, meta]));
        ws.deliver({ op: "ack", id: ws.sent[1].id });
        ws.deliver({ op: "message", topic: "plain", data: "x" });
        ws.deliver({ op: "message", topic: "plain", data: "x" });
        return { got, dropped: client.stats.duplicatesDropped,
                 c: client.position("feed.c"), plain: client.position("plain") };
        """
    )
    assert result["got"] == [
        ["1", 1, "e"],
        ["2", 2, "e"],
        ["3", 3, "e"],
        ["new epoch", 1, "f"],
        ["2f", 2, "f"],
        ["x", {"topic": "plain"}],
        ["x", {"topic": "plain"}],
    ]
    assert result["dropped"] == 4
    assert result["c"] == {"offset": 2, "epoch": "f"}
    assert result["plain"] is None


def test_a_server_gap_frame_is_reported_and_moves_the_position_past_the_hole() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        ws.welcome();
        const events = [], onGap = [];
        client.on("gap", (g) => events.push(g));
        client.subscribe("feed.d", () => {}, { onGap: (g) => onGap.push(g) });
        client.subscribe("feed.d", () => {});  // no onGap: only the event
        ws.deliver({ op: "ack", id: ws.sent[0].id, offset: 5, epoch: "e" });
        ws.deliver({ op: "gap", topic: "feed.d", from: 6, to: 9 });
        const afterGap = client.position("feed.d");
        ws.deliver({ op: "gap", topic: "feed.d" });
        ws.deliver({ op: "gap", topic: "not.subscribed", from: 1, to: 2 });
        return { events, onGap, afterGap };
        """
    )
    assert result["events"] == [
        {"topic": "feed.d", "reason": "server", "epoch": "e", "from": 6, "to": 9},
        {"topic": "feed.d", "reason": "server", "epoch": "e", "from": None, "to": None},
    ]
    assert result["onGap"] == result["events"]
    assert result["afterGap"] == {"offset": 9, "epoch": "e"}


def test_since_from_the_options_starts_the_first_subscription_and_is_checked() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        const gaps = [];
        const sub = client.subscribe("feed.e", () => {}, {
          since: { offset: 41, epoch: "stored" }, onGap: (g) => gaps.push(g) });
        const before = client.position("feed.e");
        ws.welcome();
        const req = ws.sent.find((f) => f.op === "subscribe");
        ws.deliver({ op: "ack", id: req.id, offset: 41, epoch: "stored", recovered: true });
        await sub.ready;
        const bad = [{ offset: -1, epoch: "e" }, { offset: 1.5, epoch: "e" }, { offset: 1 },
                     "1", { offset: 0, epoch: "e", extra: 1 }].map((since) => {
          try { client.subscribe("feed.x", () => {}, { since }); return "accepted"; }
          catch (e) { return e.name; } });
        const badHandler = (() => {
          try { client.subscribe("feed.y", () => {}, { onPresence: "no" }); return "accepted"; }
          catch (e) { return e.name; } })();
        return { before, since: req.since, gaps, bad, badHandler,
                 position: client.position("feed.e") };
        """
    )
    assert result["before"] == {"offset": 41, "epoch": "stored"}
    assert result["since"] == {"offset": 41, "epoch": "stored"}
    assert result["gaps"] == []
    assert result["position"] == {"offset": 41, "epoch": "stored"}
    assert result["bad"] == ["TypeError", "TypeError", "TypeError", "TypeError", "accepted"]
    assert result["badHandler"] == "TypeError"


def test_presence_requests_resolve_with_the_clients_and_fail_like_publishes() -> None:
    result = run_js(
        """
        const client = open();
        const ws1 = FakeSocket.all[0];
        const early = client.presence("room.1");  // before welcome: waits in the queue
        const queued = [client.queuedPublishes, ws1.sent.length];
        ws1.welcome();
        const clients = { "0-1": { identity: "ann", worker: "0" } };
        const req = ws1.sent.find((f) => f.op === "presence");
        ws1.deliver({ op: "ack", id: req.id, clients });
        const answered = await early;
        const refused = settle(client.presence("plain"));
        const req2 = ws1.sent.filter((f) => f.op === "presence")[1];
        ws1.deliver({ op: "error", id: req2.id, code: "not_enabled", reason: "no presence" });
        const inFlight = settle(client.presence("room.1"));
        const next = nextSocket();
        ws1.serverClose(1006, "");
        await next;
        const lost = await inFlight;
        client.close();
        return { queued, req, answered, refused: await refused, lost,
                 closed: await settle(client.presence("room.1")) };
        """
    )
    assert result["queued"] == [0, 0]
    assert result["req"] == {"op": "presence", "id": result["req"]["id"], "topic": "room.1"}
    assert result["answered"] == {"0-1": {"identity": "ann", "worker": "0"}}
    assert result["refused"]["code"] == "not_enabled"
    assert result["lost"]["code"] == "connection_lost"
    assert result["closed"]["code"] == "closed"


def test_join_and_leave_reach_on_presence_and_the_presence_event() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        ws.welcome();
        const events = [], handler = [], reported = [];
        console.error = (e) => reported.push(String(e.message ?? e));
        client.on("presence", (e) => events.push(e));
        client.subscribe("room.2", () => {}, { onPresence: (e) => handler.push(e) });
        client.subscribe("room.2", () => {}, { onPresence: () => { throw new Error("bug"); } });
        ws.ackAll("subscribe");
        const info = { identity: "bob", worker: "1" };
        ws.deliver({ op: "join", topic: "room.2", client: "1-7", info });
        ws.deliver({ op: "leave", topic: "room.2", client: "1-7", info });
        ws.deliver({ op: "join", topic: "room.other", client: "1-8", info });
        return { events, handler, reported };
        """
    )
    info = {"identity": "bob", "worker": "1"}
    assert result["events"] == [
        {"type": "join", "topic": "room.2", "client": "1-7", "info": info},
        {"type": "leave", "topic": "room.2", "client": "1-7", "info": info},
    ]
    assert result["handler"] == result["events"]
    assert result["reported"] == ["bug", "bug"]


# --- every break surfaced; positions never move past messages not received --------------------


def test_a_topic_without_history_reports_a_gap_after_every_reconnect() -> None:
    result = run_js(
        """
        const client = open();
        const log = [];
        client.on("gap", (g) => log.push(["event", g]));
        const ws1 = FakeSocket.all[0];
        ws1.welcome();
        client.subscribe("plain", (d) => log.push(["message", d]),
                         { onGap: (g) => log.push(["onGap", g]) });
        ws1.ackAll("subscribe");
        ws1.deliver({ op: "message", topic: "plain", data: "before" });
        for (const code of [1006, 1001]) {
          const next = nextSocket();
          FakeSocket.all.at(-1).serverClose(code, "");
          const ws = await next;
          ws.welcome();
          const resub = ws.sent.find((f) => f.op === "subscribe");
          log.push(["since" in resub ? "since!" : "resubscribed"]);
          ws.deliver({ op: "ack", id: resub.id });
          ws.deliver({ op: "message", topic: "plain", data: `after ${code}` });
        }
        return { log, position: client.position("plain") };
        """
    )
    gap = {"topic": "plain", "reason": "not_recovered"}
    assert result["log"] == [
        ["message", "before"],
        ["resubscribed"],
        ["onGap", gap],
        ["event", gap],
        ["message", "after 1006"],
        ["resubscribed"],
        ["onGap", gap],
        ["event", gap],
        ["message", "after 1001"],
    ]
    assert result["position"] is None


def test_a_recovered_ack_that_is_not_where_it_asked_is_a_gap() -> None:
    result = run_js(
        """
        const client = open();
        const ws1 = FakeSocket.all[0];
        ws1.welcome();
        const gaps = [];
        client.on("gap", (g) => gaps.push(g));
        client.subscribe("feed.g", () => {});
        ws1.deliver({ op: "ack", id: ws1.sent[0].id, offset: 3, epoch: "e" });
        const next = nextSocket();
        ws1.serverClose(1012, "");
        const ws2 = await next;
        ws2.welcome();
        const resub = ws2.sent.find((f) => f.op === "subscribe");
        ws2.deliver({ op: "ack", id: resub.id, offset: 7, epoch: "e", recovered: true });
        return { since: resub.since, gaps, position: client.position("feed.g") };
        """
    )
    assert result["since"] == {"offset": 3, "epoch": "e"}
    assert result["gaps"] == [{"topic": "feed.g", "reason": "not_recovered"}]
    assert result["position"] == {"offset": 7, "epoch": "e"}


def test_messages_queued_behind_a_gap_frame_are_delivered_not_dropped() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        ws.welcome();
        const log = [];
        client.subscribe("feed.h", (data, meta) => log.push([data, meta.offset, meta.epoch]),
                         { onGap: (g) => log.push(["gap", g.epoch, g.from, g.to]) });
        ws.deliver({ op: "ack", id: ws.sent[0].id, offset: 5, epoch: "e" });
        const m = (offset, epoch, data) =>
          ws.deliver({ op: "message", topic: "feed.h", offset, epoch, data });
        ws.deliver({ op: "gap", topic: "feed.h", epoch: "e", from: 6, to: 9 });
        m(10, "e", "10"); m(11, "e", "11"); m(11, "e", "11 again"); m(8, "e", "in the hole");
        const afterHole = client.position("feed.h");
        // The epoch ended: no `to`; the position stays until the new epoch's messages come.
        ws.deliver({ op: "gap", topic: "feed.h", epoch: "e", from: 12 });
        const afterEnd = client.position("feed.h");
        // The new epoch's history lacks 1..2: a gap with `to` in it moves the position there.
        ws.deliver({ op: "gap", topic: "feed.h", epoch: "f", from: 1, to: 2 });
        const inNew = client.position("feed.h");
        m(3, "f", "3f");
        return { log, afterHole, afterEnd, inNew, dropped: client.stats.duplicatesDropped,
                 position: client.position("feed.h") };
        """
    )
    assert result["log"] == [
        ["gap", "e", 6, 9],
        ["10", 10, "e"],
        ["11", 11, "e"],
        ["gap", "e", 12, None],
        ["gap", "f", 1, 2],
        ["3f", 3, "f"],
    ]
    assert result["afterHole"] == result["afterEnd"] == {"offset": 11, "epoch": "e"}
    assert result["inNew"] == {"offset": 2, "epoch": "f"}
    assert result["dropped"] == 2
    assert result["position"] == {"offset": 3, "epoch": "f"}


# --- publish outcomes ---------------------------------------------------------------------------


def test_publish_errors_keep_the_wire_code_and_are_not_retried_without_a_key() -> None:
    result = run_js(
        """
        const client = open();
        const ws = FakeSocket.all[0];
        ws.welcome();
        const out = {};
        for (const code of ["unavailable", "outcome_unknown", "too_large"]) {
          const p = settle(client.publish("t", code));
          const req = ws.sent.at(-1);
          ws.deliver({ op: "error", id: req.id, code, reason: "r" });
          out[code] = await p;
        }
        const badKey = await settle(client.publish("t", 1, { key: "" }));
        const longKey = await settle(client.publish("t", 1, { key: "k".repeat(65) }));
        return { out, publishes: ws.sent.filter((f) => f.op === "publish").length,
                 badKey: badKey.code, longKey: longKey.code,
                 keys: ws.sent.filter((f) => "key" in f).length };
        """
    )
    for code in ("unavailable", "outcome_unknown", "too_large"):
        assert result["out"][code]["code"] == code
        assert result["out"][code]["name"] == "RedwireError"
    assert result["publishes"] == 3  # one each: nothing retried
    assert result["badKey"] == result["longKey"] == "bad_request"
    assert result["keys"] == 0


def test_a_keyed_publish_is_resent_first_after_a_reconnect_and_retried_after_bus_errors() -> None:
    result = run_js(
        """
        const client = open();
        const ws1 = FakeSocket.all[0];
        ws1.welcome();
        const keyed = settle(client.publish("t", "once", { key: "k-1" }));
        const plain = settle(client.publish("t", "maybe"));
        const sent1 = ws1.sent.filter((f) => f.op === "publish");
        const next = nextSocket();
        ws1.serverClose(1006, "");
        const lost = await plain;
        const later = settle(client.publish("t", "later"));  // queued while disconnected
        const ws2 = await next;
        ws2.welcome();
        const order = ws2.sent.map((f) => [f.op, f.data, f.key ?? null]);
        const resent = ws2.sent.find((f) => f.key === "k-1");
        const retried = deadline(new Promise((resolve) => {
          ws2.onSend = (f) => { if (f.key === "k-1") resolve(f); };
        }), "the keyed retry");
        ws2.deliver({ op: "error", id: resent.id, code: "unavailable", reason: "bus down" });
        const again = await retried;
        ws2.deliver({ op: "ack", id: again.id, duplicate: true });
        ws2.ackAll("publish");
        return { sent1: sent1.map((f) => [f.data, f.key ?? null]), lost, order,
                 keyed: await keyed, later: await later, again: [again.data, again.key] };
        """
    )
    assert result["sent1"] == [["once", "k-1"], ["maybe", None]]
    assert result["lost"]["code"] == "outcome_unknown"
    assert result["order"] == [["publish", "once", "k-1"], ["publish", "later", None]]
    assert result["again"] == ["once", "k-1"]
    assert result["keyed"] == result["later"] == "resolved"


def test_keyed_retries_are_bounded_and_a_final_close_makes_them_unknown() -> None:
    result = run_js(
        """
        const client = open({ maxPublishRetries: 2 });
        const ws = FakeSocket.all[0];
        ws.welcome();
        const p = settle(client.publish("t", 1, { key: "k" }));
        let refusals = 0;
        ws.onSend = (f) => {
          if (f.op === "publish") {
            refusals++;
            queueMicrotask(() =>
              ws.deliver({ op: "error", id: f.id, code: "outcome_unknown", reason: "r" }));
          }
        };
        ws.deliver({ op: "error", id: ws.sent[0].id, code: "outcome_unknown", reason: "r" });
        const exhausted = await p;
        // A keyed publish sent on a socket that the server then closes for good.
        ws.onSend = null;
        const q = settle(client.publish("t", 2, { key: "k2" }));
        ws.serverClose(1008, "too many errors");
        const final = await q;
        // close() with a publish on the wire: unknown too; one never sent: closed.
        const other = open();
        FakeSocket.all.at(-1).welcome();
        const onWire = settle(other.publish("t", 3));
        other.close();
        const afterClose = await settle(other.publish("t", 4));
        return { exhausted, refusals, final, onWire: await onWire, afterClose };
        """
    )
    assert result["exhausted"]["code"] == "outcome_unknown"
    assert result["refusals"] == 2  # the first send and two retries: three refusals in all
    assert result["final"]["code"] == "outcome_unknown"
    assert result["onWire"]["code"] == "outcome_unknown"
    assert result["afterClose"]["code"] == "closed"
