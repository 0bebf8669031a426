"""client/js/redwire.js in headless Chromium against `redwire serve` with two workers.

Each page imports `/redwire.js` from the broker and keeps its client and what it saw in
`window.t`; the tests wait on that state with `page.wait_for_function`. Killing (SIGKILL)
or stopping (SIGSTOP) the worker a page is connected to exercises reconnecting, the queue
of publishes made while disconnected, and the heartbeat.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page
from support.processes import ServerProcess, serve, worker_pids

WORKERS = 2
WAIT_MS = 20_000
MAX_PAGES = 24  # pages opened at most while looking for one on another worker

# The client under test, in a page: window.t = {client, got, events, errors}. Its helpers
# settle to plain values, within a deadline (page.evaluate has no timeout of its own).
SETUP = """
async ([options, waitMs]) => {
  const rw = await import("/redwire.js");
  const client = rw.connect(undefined, options);
  const t = (window.t = { rw, client, got: [], events: [], errors: [] });
  client.on("connected", (i) => t.events.push({ type: "connected", worker: i.worker,
                                               reconnected: i.reconnected }));
  client.on("disconnected", (i) => t.events.push({ type: "disconnected", ...i }));
  client.on("error", (e) => t.errors.push({ code: e.code, reason: e.reason,
                                           closeCode: e.closeCode ?? null }));
  t.within = (promise, what) => {
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer to ${what} in ${waitMs} ms`)), waitMs);
    });
    return Promise.race([promise, late]).finally(() => clearTimeout(timer));
  };
  t.subscribe = (topic) => {
    const sub = client.subscribe(topic, (data, meta) => t.got.push({ data, meta }));
    return t.within(sub.ready.then(() => "ready", (e) => ({ code: e.code, reason: e.reason })),
                    `subscribe ${topic}`);
  };
  t.publish = (topic, data) => t.within(
    client.publish(topic, data).then(() => "acked", (e) => ({ code: e.code, reason: e.reason })),
    `publish to ${topic}`);
  await t.within(new Promise((resolve) => client.on("connected", resolve)), "connect");
  return client.worker;
}
"""

FAST_RECONNECT = {"reconnect": {"minDelayMs": 50, "maxDelayMs": 500}, "connectTimeoutMs": 1500}


@pytest.fixture(scope="module")
def broker(redis_server) -> Iterator[ServerProcess]:
    server = serve(
        redis_server.url,
        workers=WORKERS,
        # A fast heartbeat, so that a silent worker is noticed within seconds.
        env={"REDWIRE_HEARTBEAT_INTERVAL_S": "0.5", "REDWIRE_HEARTBEAT_TIMEOUT_S": "1"},
    )
    yield server
    server.stop()


def open_client(
    browser: Browser, pages: list[Page], broker: ServerProcess, options: dict[str, Any]
) -> tuple[Page, str]:
    """A page whose redwire client is connected; returns it and the worker it is on."""
    page = browser.new_page()
    pages.append(page)
    page.goto(f"http://{broker.host}:{broker.port}/healthz")
    worker = page.evaluate(SETUP, [options, WAIT_MS])
    return page, worker


def clients_on_two_workers(
    browser: Browser, pages: list[Page], broker: ServerProcess, options: dict[str, Any]
) -> tuple[Page, str, Page, str]:
    """Two connected pages on different workers (the kernel picks; open until it does)."""
    first, first_worker = open_client(browser, pages, broker, options)
    for _ in range(MAX_PAGES):
        page, worker = open_client(browser, pages, broker, options)
        if worker != first_worker:
            return first, first_worker, page, worker
        pages.remove(page)
        page.close()
    raise AssertionError(f"{MAX_PAGES} pages all landed on worker {first_worker}")


def new_topic() -> str:
    return f"e2e.client.{uuid.uuid4().hex[:12]}"


def test_publish_resolves_on_ack_and_rejects_with_the_server_error(
    browser: Browser, pages: list[Page], broker: ServerProcess
) -> None:
    page, worker = open_client(browser, pages, broker, {})
    assert worker in {str(i) for i in range(WORKERS)}
    topic = new_topic()
    result = page.evaluate(
        """
        async (topic) => {
          const ready = await t.subscribe(topic);
          const acked = await t.within(t.client.publish(topic, { hello: "wörld", n: [1, 2] }),
                                       "publish");
          const rejected = await t.within(t.client.publish("no spaces allowed", 1).then(
            () => "resolved",
            (e) => ({ code: e.code, reason: e.reason, isError: e instanceof Error })),
            "bad publish");
          const badSub = await t.subscribe("bad/topic");
          return { ready, acked: acked === undefined, rejected, badSub,
                   state: t.client.state, clientId: t.client.clientId };
        }
        """,
        topic,
    )
    assert result["ready"] == "ready"
    assert result["acked"] is True
    assert result["rejected"]["code"] == "bad_topic"
    assert result["rejected"]["reason"]
    assert result["rejected"]["isError"] is True
    assert result["badSub"]["code"] == "bad_topic"
    assert result["state"] == "open"
    assert result["clientId"].startswith(f"{worker}-")
    # Subscribed, then published on one connection: its own message comes back.
    page.wait_for_function("() => t.got.length === 1", timeout=WAIT_MS)
    assert page.evaluate("t.got") == [
        {"data": {"hello": "wörld", "n": [1, 2]}, "meta": {"topic": topic}}
    ]


def test_messages_cross_workers(browser: Browser, pages: list[Page], broker: ServerProcess) -> None:
    a, worker_a, b, worker_b = clients_on_two_workers(browser, pages, broker, {})
    assert worker_a != worker_b
    topic = new_topic()
    assert b.evaluate("(topic) => t.subscribe(topic)", topic) == "ready"
    acks = a.evaluate(
        """
        async (topic) => {
          const acks = [];
          for (let i = 0; i < 20; i++) acks.push(await t.publish(topic, i));
          return acks;
        }
        """,
        topic,
    )
    assert acks == ["acked"] * 20
    b.wait_for_function("() => t.got.length === 20", timeout=WAIT_MS)
    assert [m["data"] for m in b.evaluate("t.got")] == list(range(20))


def test_reconnects_after_its_worker_is_killed_and_sends_what_was_queued(
    browser: Browser, pages: list[Page], broker: ServerProcess
) -> None:
    victim, victim_worker, witness, _ = clients_on_two_workers(
        browser, pages, broker, FAST_RECONNECT
    )
    topic = new_topic()
    assert victim.evaluate("(topic) => t.subscribe(topic)", topic) == "ready"
    assert witness.evaluate("(topic) => t.subscribe(topic)", topic) == "ready"
    # Publish from inside the "disconnected" event: certainly while disconnected.
    victim.evaluate(
        """
        (topic) => {
          const off = t.client.on("disconnected", () => {
            off();
            t.queued = [1, 2, 3].map((i) =>
              t.publish(topic, { queued: i }));
            t.queuedWhileDown = t.client.queuedPublishes;
          });
        }
        """,
        topic,
    )
    os.kill(worker_pids(broker.proc.pid)[victim_worker], signal.SIGKILL)

    victim.wait_for_function(
        "() => t.events.some((e) => e.type === 'connected' && e.reconnected)", timeout=WAIT_MS
    )
    assert victim.evaluate("Promise.all(t.queued)") == ["acked", "acked", "acked"]
    assert victim.evaluate("t.queuedWhileDown") == 3
    events = victim.evaluate("t.events")
    lost = [e for e in events if e["type"] == "disconnected"]
    assert lost[0]["code"] == 1006 and lost[0]["willReconnect"] is True
    assert victim.evaluate("t.client.state") == "open"

    # The queued publishes reached the other worker's subscriber, and the victim itself
    # (resubscribed before the queue was sent).
    witness.wait_for_function("() => t.got.length === 3", timeout=WAIT_MS)
    assert [m["data"] for m in witness.evaluate("t.got")] == [{"queued": i} for i in (1, 2, 3)]
    victim.wait_for_function("() => t.got.length === 3", timeout=WAIT_MS)

    # Messages published after the reconnect arrive.
    assert witness.evaluate("(topic) => t.publish(topic, 'after')", topic) == "acked"
    victim.wait_for_function("() => t.got.length === 4", timeout=WAIT_MS)
    assert victim.evaluate("t.got.at(-1)") == {"data": "after", "meta": {"topic": topic}}


def test_a_silent_worker_is_detected_by_the_heartbeat(
    browser: Browser, pages: list[Page], broker: ServerProcess
) -> None:
    page, worker = open_client(browser, pages, broker, FAST_RECONNECT)
    topic = new_topic()
    assert page.evaluate("(topic) => t.subscribe(topic)", topic) == "ready"
    pid = worker_pids(broker.proc.pid)[worker]
    os.kill(pid, signal.SIGSTOP)  # the TCP connection stays up; nothing answers
    try:
        page.wait_for_function(
            "() => t.events.some((e) => e.type === 'disconnected')", timeout=WAIT_MS
        )
        lost = page.evaluate("t.events.find((e) => e.type === 'disconnected')")
        assert lost["code"] == 1006 and "heartbeat" in lost["reason"]
        assert lost["willReconnect"] is True
        # New connections to the stopped worker get no welcome (connect timeout): the
        # client keeps trying until one lands on the other worker.
        page.wait_for_function(
            "() => t.events.some((e) => e.type === 'connected' && e.reconnected)", timeout=60_000
        )
        assert page.evaluate("t.client.worker") != worker
    finally:
        os.kill(pid, signal.SIGCONT)
    # Resubscribed on the new worker: its own publish comes back.
    assert page.evaluate("(topic) => t.publish(topic, 'alive')", topic) == "acked"
    page.wait_for_function("() => t.got.length === 1", timeout=WAIT_MS)


def test_too_many_errors_close_1008_and_the_client_stays_closed(
    browser: Browser, pages: list[Page], broker: ServerProcess
) -> None:
    page, _ = open_client(browser, pages, broker, FAST_RECONNECT)
    codes = page.evaluate(
        """
        async () => {
          const all = [];
          for (let i = 0; i < 30; i++) all.push(t.publish("bad topic", i));
          return (await Promise.all(all)).map((r) => r.code);
        }
        """
    )
    assert codes[0] == "bad_topic"
    # After the 1008 close: sent but unanswered ones are outcome_unknown, queued ones closed.
    assert set(codes) <= {"bad_topic", "outcome_unknown", "closed"}
    page.wait_for_function("() => t.client.state === 'closed'", timeout=WAIT_MS)
    events = page.evaluate("t.events")
    assert events[-1]["type"] == "disconnected"
    assert events[-1]["code"] == 1008 and events[-1]["willReconnect"] is False
    assert page.evaluate("t.errors.at(-1)")["closeCode"] == 1008
    assert page.evaluate("t.publish('fine', 1)")["code"] == "closed"


def test_pagehide_closes_the_socket_and_pageshow_from_the_cache_reopens_it(
    browser: Browser, pages: list[Page], broker: ServerProcess
) -> None:
    page, _ = open_client(browser, pages, broker, FAST_RECONNECT)
    topic = new_topic()
    assert page.evaluate("(topic) => t.subscribe(topic)", topic) == "ready"
    page.evaluate(
        "() => window.dispatchEvent(new PageTransitionEvent('pagehide', { persisted: true }))"
    )
    assert page.evaluate("t.client.state") == "closed"
    assert page.evaluate("t.events.at(-1)") == {
        "type": "disconnected",
        "code": 1000,
        "reason": "page hidden",
        "willReconnect": False,
        "delayMs": None,
    }
    page.evaluate(
        "() => window.dispatchEvent(new PageTransitionEvent('pageshow', { persisted: true }))"
    )
    page.wait_for_function("() => t.client.state === 'open'", timeout=WAIT_MS)
    assert page.evaluate("t.events.at(-1)")["reconnected"] is True
    # Its subscription came back with it.
    assert page.evaluate("(topic) => t.publish(topic, 'back')", topic) == "acked"
    page.wait_for_function("() => t.got.length === 1", timeout=WAIT_MS)
