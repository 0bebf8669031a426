"""client/js/redwire.js recovers what it missed while offline; presence between two pages.

`redwire serve --workers 2` with history and presence for `feed.*` (REDWIRE_TOPICS). Each
page keeps its client and what it saw in `window.t`; messages are published from Python over
a plain WebSocket (`websockets`), so that publishing does not depend on the page under test.

Going offline: Playwright's `context.set_offline(True)` does not close a WebSocket that is
already open in Chromium; the socket stays OPEN and frames in both directions are held until
the context is online again (new sockets fail at once). What ends the connection is the
client's heartbeat: a ping gets no answer within `heartbeat.timeout`, so the client abandons
the socket (held frames and all) and keeps reconnecting. The server's heartbeat here is
0.5 s / 1 s, so that happens within the 3 s offline period, and the test checks that it did.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from support.processes import ServerProcess, serve
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

WORKERS = 2
WAIT_MS = 20_000
WAIT_S = WAIT_MS / 1000
MAX_PAGES = 24  # pages opened at most while looking for one on the other worker
OFFLINE_S = 3.0
TOPICS = [{"pattern": "feed.*", "history_size": 10_000, "presence": True, "join_leave": True}]
FAST_RECONNECT = {"reconnect": {"minDelayMs": 50, "maxDelayMs": 500}, "connectTimeoutMs": 1500}

# window.t = {client, got, gaps, onGap, presence, events}; t.within settles within a deadline
# (page.evaluate has no timeout of its own).
SETUP = """
async ([options, waitMs]) => {
  const rw = await import("/redwire.js");
  const client = rw.connect(undefined, options);
  const t = (window.t = { client, got: [], gaps: [], onGap: [], presence: [], onPresence: [],
                          events: [], subs: {} });
  client.on("connected", (i) => t.events.push({ type: "connected", worker: i.worker,
                                               reconnected: i.reconnected }));
  client.on("disconnected", (i) => t.events.push({ type: "disconnected", code: i.code,
                                                  reason: i.reason }));
  client.on("gap", (g) => t.gaps.push(g));
  client.on("presence", (e) => t.presence.push(e));
  t.within = (promise, what) => {
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer to ${what} in ${waitMs} ms`)), waitMs);
    });
    return Promise.race([promise, late]).finally(() => clearTimeout(timer));
  };
  t.subscribe = (topic, since) => {
    const sub = client.subscribe(topic, (data, meta) => t.got.push({ data, meta }), {
      since,
      onGap: (g) => t.onGap.push(g),
      onPresence: (e) => t.onPresence.push(e),
    });
    t.subs[topic] = sub;
    return t.within(sub.ready.then(() => "ready", (e) => ({ code: e.code, reason: e.reason })),
                    `subscribe ${topic}`);
  };
  await t.within(new Promise((resolve) => client.on("connected", resolve)), "connect");
  return [client.worker, client.clientId];
}
"""


@pytest.fixture(scope="module")
def broker(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        workers=WORKERS,
        env={
            "REDWIRE_TOPICS": json.dumps(TOPICS),
            # A fast heartbeat: an offline page notices within the offline period.
            "REDWIRE_HEARTBEAT_INTERVAL_S": "0.5",
            "REDWIRE_HEARTBEAT_TIMEOUT_S": "1",
        },
    )
    yield server
    server.stop()


@pytest.fixture
def publisher(broker: ServerProcess) -> Iterator[Publisher]:
    """A plain WebSocket peer that publishes (the page under test only receives)."""
    with connect(
        f"{broker.url}/ws", subprotocols=[Subprotocol("redwire.json")], open_timeout=WAIT_S
    ) as ws:
        yield Publisher(ws)


class Publisher:
    """Publishes over its own WebSocket, each publish waiting for its ack."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 1
        assert self._recv()["op"] == "welcome"

    def _recv(self) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=WAIT_S))

    def publish(self, topic: str, data: Any) -> dict[str, Any]:
        """Publish; returns the ack (with `offset` and `epoch` on a topic with history)."""
        req_id, self.next_id = self.next_id, self.next_id + 1
        self.ws.send(json.dumps({"op": "publish", "id": req_id, "topic": topic, "data": data}))
        while True:
            frame = self._recv()
            if frame.get("id") == req_id:
                assert frame["op"] == "ack", frame
                return frame


def open_client(
    browser: Browser, pages: list[Page], broker: ServerProcess, options: dict[str, Any]
) -> tuple[Page, str, str]:
    """A page whose redwire client is connected: the page, its worker and client id."""
    page = browser.new_context().new_page()
    pages.append(page)
    page.goto(f"http://{broker.host}:{broker.port}/healthz")
    worker, client_id = page.evaluate(SETUP, [options, WAIT_MS])
    return page, worker, client_id


def wait_for_messages(page: Page, count: int) -> list[dict[str, Any]]:
    """What the page received once it has `count` messages; fails saying what it has."""
    try:
        page.wait_for_function("(n) => t.got.length >= n", arg=count, timeout=WAIT_MS)
    except PlaywrightTimeoutError:
        got = page.evaluate("t.got")
        raise AssertionError(f"{len(got)} of {count} messages arrived: {got}") from None
    return page.evaluate("t.got")


def new_topic() -> str:
    return f"feed.e2e.{uuid.uuid4().hex[:12]}"


def test_a_page_offline_for_3_s_gets_every_message_in_order_once(
    browser: Browser, pages: list[Page], broker: ServerProcess, publisher: Publisher
) -> None:
    page, _, _ = open_client(browser, pages, broker, FAST_RECONNECT)
    topic = new_topic()
    assert page.evaluate("(topic) => t.subscribe(topic)", topic) == "ready"
    expected: list[dict[str, Any]] = []

    def publish(phase: str, count: int) -> None:
        for i in range(count):
            data = {"phase": phase, "i": i}
            ack = publisher.publish(topic, data)
            assert isinstance(ack.get("offset"), int), ack  # the topic has history
            expected.append(data)

    publish("before", 5)
    wait_for_messages(page, len(expected))

    offline_at = time.monotonic()
    page.context.set_offline(True)
    # The socket is still open: what the browser holds back is abandoned with it.
    publish("offline, socket still open", 10)
    remaining_ms = (offline_at + OFFLINE_S - time.monotonic()) * 1000
    page.wait_for_function(
        "() => t.events.some((e) => e.type === 'disconnected')", timeout=max(remaining_ms, 1)
    )
    publish("offline, disconnected", 10)
    time.sleep(max(0.0, offline_at + OFFLINE_S - time.monotonic()))  # the offline period
    assert page.evaluate("t.client.state") == "connecting"
    page.context.set_offline(False)

    page.wait_for_function(
        "() => t.events.some((e) => e.type === 'connected' && e.reconnected)", timeout=WAIT_MS
    )
    publish("after", 5)
    got = wait_for_messages(page, len(expected))
    assert [m["data"] for m in got] == expected  # all of them, in order, once
    offsets = [m["meta"]["offset"] for m in got]
    assert offsets == list(range(offsets[0], offsets[0] + len(expected)))
    assert len({m["meta"]["epoch"] for m in got}) == 1
    assert page.evaluate("[t.gaps, t.onGap]") == [[], []]
    assert page.evaluate("t.client.stats.duplicatesDropped") == 0
    assert page.evaluate("(topic) => t.client.position(topic)", topic) == {
        "offset": offsets[-1],
        "epoch": got[-1]["meta"]["epoch"],
    }
    lost = page.evaluate("t.events.find((e) => e.type === 'disconnected')")
    assert lost["code"] == 1006 and "heartbeat" in lost["reason"]


def test_a_stored_position_from_another_epoch_is_reported_as_a_gap(
    browser: Browser, pages: list[Page], broker: ServerProcess, publisher: Publisher
) -> None:
    topic = new_topic()
    head = publisher.publish(topic, "already there")
    page, _, _ = open_client(browser, pages, broker, {})
    since = {"offset": 1, "epoch": "an epoch that never was"}
    assert page.evaluate("([topic, since]) => t.subscribe(topic, since)", [topic, since]) == "ready"
    # Not recovered: a gap first, before anything else; the server may announce the lost
    # epoch with a `gap` frame of its own (reason "server") and replay the current epoch
    # from where its ack says the subscription starts.
    gaps = page.evaluate("t.gaps")
    assert gaps[0] == {"topic": topic, "reason": "not_recovered"}
    assert {g["reason"] for g in gaps} <= {"not_recovered", "server"}
    assert page.evaluate("t.onGap") == gaps
    nxt = publisher.publish(topic, "next")
    assert nxt["offset"] == head["offset"] + 1 and nxt["epoch"] == head["epoch"]
    page.wait_for_function("() => t.got.some((m) => m.data === 'next')", timeout=WAIT_MS)
    got = page.evaluate("t.got")
    assert got[-1] == {
        "data": "next",
        "meta": {"topic": topic, "offset": nxt["offset"], "epoch": nxt["epoch"]},
    }
    offsets = [m["meta"]["offset"] for m in got]
    assert offsets == sorted(set(offsets))  # in order, once
    assert {m["meta"]["epoch"] for m in got} == {head["epoch"]}
    assert page.evaluate("(topic) => t.client.position(topic)", topic) == {
        "offset": nxt["offset"],
        "epoch": nxt["epoch"],
    }
    assert page.evaluate("t.client.stats.duplicatesDropped") == 0


def test_presence_join_and_leave_are_seen_by_another_page(
    browser: Browser, pages: list[Page], broker: ServerProcess
) -> None:
    watcher, watcher_worker, watcher_id = open_client(browser, pages, broker, {})
    topic = new_topic()
    assert watcher.evaluate("(topic) => t.subscribe(topic)", topic) == "ready"
    # The visitor on the other worker: presence crosses workers through the bus.
    for _ in range(MAX_PAGES):
        visitor, visitor_worker, visitor_id = open_client(browser, pages, broker, {})
        if visitor_worker != watcher_worker:
            break
        pages.remove(visitor)
        visitor.context.close()
    else:
        raise AssertionError(f"{MAX_PAGES} pages all landed on worker {watcher_worker}")
    assert visitor.evaluate("(topic) => t.subscribe(topic)", topic) == "ready"

    seen = "(type, id) => t.presence.some((e) => e.type === type && e.client === id)"
    watcher.wait_for_function(f"([id]) => ({seen})('join', id)", arg=[visitor_id], timeout=WAIT_MS)
    join = watcher.evaluate("([id]) => t.presence.find((e) => e.client === id)", [visitor_id])
    assert join["type"] == "join" and join["topic"] == topic
    assert join["info"]["worker"] == visitor_worker

    here = watcher.evaluate("(topic) => t.within(t.client.presence(topic), 'presence')", topic)
    assert {watcher_id, visitor_id} <= set(here)
    assert here[visitor_id]["worker"] == visitor_worker

    visitor.evaluate("t.client.close()")
    watcher.wait_for_function(f"([id]) => ({seen})('leave', id)", arg=[visitor_id], timeout=WAIT_MS)
    # The subscription's onPresence saw what the client event saw.
    assert watcher.evaluate("t.onPresence") == watcher.evaluate("t.presence")
    here = watcher.evaluate("(topic) => t.within(t.client.presence(topic), 'presence')", topic)
    assert visitor_id not in here and watcher_id in here
