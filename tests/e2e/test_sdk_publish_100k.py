"""A Python service publishing 100k messages with the SDK: every subscriber (browser and
Python) receives all of them in order (issue check).

`redwire serve --workers 2`; the publisher is `client.publisher.Publisher` (the blocking one,
`publish_nowait` then `flush`) with the broker's topic rules, so its messages on the history
topic get offsets. Subscribers: two Chromium pages on different workers (client/js/redwire.js),
one `client.pubsub` WebSocket client and one `client.subscriber.Subscriber` reading the bus.
Each must end with seq 0..N-1 exactly, in order; on the history topic with offsets 1..N.

Threads: Playwright's sync API owns this thread's event loop, so the Python subscribers run on
an event loop of their own in a second thread; the Publisher has its own loop thread already.

Slow consumers: a page more than `max_send_buffer_bytes` behind is closed with 1013. On the
history topic it then recovers from its last offset (the test allows that and reports it);
a plain topic has nothing to recover from, so its case raises the limit to 64 MiB
(REDWIRE_MAX_SEND_BUFFER_BYTES): with the 4 MiB default a page that briefly falls behind the
burst is closed and the rest of the burst is lost to it, by design.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.sync_api import Browser, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from support.processes import ServerProcess, redwire

from broker.settings import Settings
from client.publisher import Publisher
from client.pubsub import PubSubClient, connect
from client.subscriber import Gap, Subscriber

TOTAL = 100_000
WORKERS = 2
MAX_PAGES = 24  # pages opened at most while looking for one on the other worker
WAIT_MS = 20_000  # connecting, subscribing
DELIVERY_S = 45.0  # every subscriber has everything within this after the flush
TOPICS = [{"pattern": "bulk.*", "history_size": 200_000}]
TOPICS_JSON = json.dumps(TOPICS)
PLAIN_SEND_BUFFER_BYTES = 64 * 1024 * 1024

# window.t = {client, seqs, offsets, gaps, events}: only numbers are kept per message.
SETUP = """
async ([waitMs]) => {
  const rw = await import("/redwire.js");
  const client = rw.connect();
  const t = (window.t = { client, seqs: [], offsets: [], gaps: [], events: [] });
  client.on("disconnected", (i) => t.events.push({ code: i.code, reason: i.reason }));
  client.on("gap", (g) => t.gaps.push(g));
  t.within = (promise, what) => {
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer to ${what} in ${waitMs} ms`)), waitMs);
    });
    return Promise.race([promise, late]).finally(() => clearTimeout(timer));
  };
  await t.within(new Promise((resolve) => client.on("connected", resolve)), "connect");
  return client.worker;
}
"""
SUBSCRIBE = """
(topic) => {
  const sub = t.client.subscribe(topic, (data, meta) => {
    t.seqs.push(data.seq);
    if (meta.offset !== undefined) t.offsets.push(meta.offset);
  }, { onGap: (g) => t.gaps.push(g) });
  return t.within(sub.ready.then(() => "ready", (e) => `${e.code}: ${e.reason}`), "subscribe");
}
"""


@dataclass
class Case:
    name: str
    topic_prefix: str
    history: bool
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    Case("history", "bulk.", history=True),
    Case(
        "plain",
        "plain.",
        history=False,
        env={"REDWIRE_MAX_SEND_BUFFER_BYTES": str(PLAIN_SEND_BUFFER_BYTES)},
    ),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture
def broker(redis_url: str, case: Case) -> Iterator[ServerProcess]:
    server = ServerProcess(
        redwire(
            "serve", "--host", "127.0.0.1", "--port", "0",
            "--workers", str(WORKERS), "--redis", redis_url,
        ),
        env={"REDWIRE_TOPICS": TOPICS_JSON, **case.env},
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture
def pages(browser: Browser) -> Iterator[list[Page]]:
    """Pages a test opens (each in its own context); all closed afterwards."""
    opened: list[Page] = []
    yield opened
    for page in opened:
        page.context.close()


def open_page(browser: Browser, pages: list[Page], broker: ServerProcess) -> tuple[Page, str]:
    page = browser.new_context().new_page()
    pages.append(page)
    page.goto(f"http://{broker.host}:{broker.port}/healthz")
    return page, page.evaluate(SETUP, [WAIT_MS])


def pages_on_two_workers(
    browser: Browser, pages: list[Page], broker: ServerProcess
) -> list[tuple[Page, str]]:
    """Two connected pages on different workers (the kernel picks; open until it does)."""
    first, first_worker = open_page(browser, pages, broker)
    for _ in range(MAX_PAGES):
        page, worker = open_page(browser, pages, broker)
        if worker != first_worker:
            return [(first, first_worker), (page, worker)]
        pages.remove(page)
        page.context.close()
    raise AssertionError(f"{MAX_PAGES} pages all landed on worker {first_worker}")


@dataclass
class Received:
    """What one subscriber got: seq and offset of every message, gaps, disconnects."""

    name: str
    seqs: list[int] = field(default_factory=list)
    offsets: list[int | None] = field(default_factory=list)
    gaps: list[Any] = field(default_factory=list)
    disconnects: int = 0
    seconds: float = 0.0  # from the first publish to its last message


class PythonSubscribers:
    """A `client.pubsub` client and a `client.subscriber.Subscriber`, on their own loop thread."""

    def __init__(self, ws_url: str, redis_url: str, topic: str, settings: Settings) -> None:
        self.ws_url, self.redis_url, self.topic, self.settings = ws_url, redis_url, topic, settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="python-subscribers")  # fmt: skip
        self.thread.start()
        self.ws = Received("python pubsub")
        self.bus = Received("python subscriber")
        self.worker: str | None = None
        self.started_at = 0.0  # set by the test right before the first publish
        self._client: PubSubClient | None = None
        self._subscriber: Subscriber | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _call(self, coro: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self) -> None:
        """Both subscribed (acknowledged) and consuming when this returns."""
        self._call(self._start(), timeout_s=WAIT_MS / 1000)

    async def _start(self) -> None:
        client = self._client = await connect(self.ws_url)
        self.worker = client.worker
        sub = await client.subscribe(self.topic)
        subscriber = self._subscriber = Subscriber(
            self.redis_url, [self.topic], settings=self.settings
        )
        await subscriber.start()

        async def from_ws() -> None:
            async for item in sub:
                if isinstance(item, Gap):
                    self.ws.gaps.append(item)
                    continue
                self.ws.seqs.append(item.data["seq"])
                self.ws.offsets.append(item.offset)
                if len(self.ws.seqs) == TOTAL:
                    self.ws.seconds = time.monotonic() - self.started_at
                    return

        async def from_bus() -> None:
            async for item in subscriber:
                if isinstance(item, Gap):
                    self.bus.gaps.append(item)
                    continue
                self.bus.seqs.append(item.data["seq"])
                self.bus.offsets.append(item.offset)
                if len(self.bus.seqs) == TOTAL:
                    self.bus.seconds = time.monotonic() - self.started_at
                    return

        self._tasks = [asyncio.create_task(from_ws()), asyncio.create_task(from_bus())]

    def wait(self, timeout_s: float) -> None:
        """Until both have TOTAL messages; fails saying how far each got."""

        async def both() -> None:
            await asyncio.wait_for(asyncio.gather(*self._tasks), timeout_s)

        try:
            self._call(both(), timeout_s + 5)
        except TimeoutError:
            raise AssertionError(
                f"after {timeout_s}s: pubsub {len(self.ws.seqs)}, subscriber "
                f"{len(self.bus.seqs)} of {TOTAL} messages"
            ) from None
        assert self._client is not None
        self.ws.disconnects = self._client.disconnects

    def close(self) -> None:
        async def stop() -> None:
            for task in self._tasks:
                task.cancel()
            if self._client is not None:
                await self._client.close()
            if self._subscriber is not None:
                await self._subscriber.close()

        try:
            self._call(stop(), timeout_s=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def page_received(page: Page, name: str, deadline: float) -> Received:
    """What a page got once it has TOTAL messages (or the deadline passed: it fails)."""
    remaining_ms = max(1.0, (deadline - time.monotonic()) * 1000)
    try:
        page.wait_for_function(
            "(n) => t.seqs.length >= n", arg=TOTAL, timeout=remaining_ms, polling=100
        )
    except PlaywrightTimeoutError:
        state = page.evaluate("[t.seqs.length, t.events, t.gaps, t.client.state]")
        raise AssertionError(f"{name}: {state[0]} of {TOTAL} messages; {state[1:]}") from None
    got = page.evaluate("[t.seqs, t.offsets, t.gaps, t.events.length]")
    return Received(name, got[0], got[1], got[2], got[3])


def check(received: Received, history: bool) -> None:
    assert received.gaps == [], f"{received.name}: {received.gaps}"
    assert len(received.seqs) == TOTAL, f"{received.name}: {len(received.seqs)} messages"
    # In order, once each: compare cheaply first, then say where it broke.
    if received.seqs != list(range(TOTAL)):
        bad = next(i for i, s in enumerate(received.seqs) if s != i)
        raise AssertionError(f"{received.name}: seq {received.seqs[bad]} at position {bad}")
    if history:
        assert received.offsets == list(range(1, TOTAL + 1)), f"{received.name}: offsets"
    else:
        assert not any(received.offsets), f"{received.name}: offsets on a plain topic"


def test_every_subscriber_gets_100k_sdk_messages_in_order(
    browser: Browser,
    pages: list[Page],
    broker: ServerProcess,
    redis_url: str,
    case: Case,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = f"{case.topic_prefix}{uuid.uuid4().hex[:12]}"
    # The broker's topic rules: without them the publisher's messages would carry no offsets.
    settings = Settings.load(environ={"REDWIRE_TOPICS": TOPICS_JSON})
    assert (settings.rule_for(topic) is not None) == case.history

    browsers = pages_on_two_workers(browser, pages, broker)
    for page, _ in browsers:
        assert page.evaluate(SUBSCRIBE, topic) == "ready"
    python = PythonSubscribers(broker.url, redis_url, topic, settings)
    try:
        python.start()
        with Publisher(redis_url, settings=settings) as publisher:
            started = python.started_at = time.monotonic()
            futures = [publisher.publish_nowait(topic, {"seq": i}) for i in range(TOTAL)]
            publisher.flush(timeout_s=DELIVERY_S)
            published_s = time.monotonic() - started
        acks = [f.result() for f in futures]
        if case.history:
            assert [a.offset for a in acks] == list(range(1, TOTAL + 1))
        else:
            assert {a.offset for a in acks} == {None}

        deadline = time.monotonic() + DELIVERY_S
        python.wait(DELIVERY_S)
        results = [python.ws, python.bus]
        for page, worker in browsers:
            results.append(page_received(page, f"page on worker {worker}", deadline))
        total_s = time.monotonic() - started
    finally:
        python.close()

    for received in results:
        check(received, case.history)
    if not case.history:
        # Nothing to recover from: a close would have lost messages (checked above too).
        assert [r.disconnects for r in results] == [0] * len(results)
    with capsys.disabled():
        print(
            f"\n[{case.name}] {TOTAL} messages published in {published_s:.2f}s "
            f"({TOTAL / published_s:,.0f} msg/s); all 4 subscribers complete after "
            f"{total_s:.2f}s ({TOTAL / total_s:,.0f} msg/s end to end); "
            f"python pubsub on worker {python.worker} {python.ws.seconds:.2f}s, "
            f"subscriber {python.bus.seconds:.2f}s; "
            f"disconnects (pubsub, subscriber, pages): {[r.disconnects for r in results]}"
        )
