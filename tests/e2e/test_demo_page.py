"""The demo page at `/`, driven through its UI in headless Chromium, two workers.

Topics `e2e.hist.*` keep a history of 3 messages (offsets, gaps when a page missed more).
The heartbeat is 0.5 s / 1 s, so that a page taken offline (`context.set_offline`, which
holds an open socket's frames without closing it) notices within about a second.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect
from support.processes import ServerProcess, serve

WORKERS = 2
WAIT_MS = 15_000
MAX_PAGES = 24  # pages opened at most while looking for one on another worker
XSS = '<img src=x onerror="window.__xss=1">'
HISTORY = 3
TOPICS = [{"pattern": "e2e.hist.*", "history_size": HISTORY}]
STATIC = Path(__file__).resolve().parents[2] / "worker" / "static"


@pytest.fixture(scope="module")
def broker(redis_server) -> Iterator[ServerProcess]:
    env = {
        "REDWIRE_TOPICS": json.dumps(TOPICS),
        "REDWIRE_HEARTBEAT_INTERVAL_S": "0.5",
        "REDWIRE_HEARTBEAT_TIMEOUT_S": "1",
    }
    server = serve(redis_server.url, workers=WORKERS, env=env)
    yield server
    server.stop()


class DemoPages:
    """Opens demo pages, closes them afterwards, and collects what went wrong in them."""

    def __init__(self, browser: Browser, broker: ServerProcess) -> None:
        self.browser = browser
        self.url = f"http://{broker.host}:{broker.port}/"
        self.pages: list[Page] = []
        self.problems: list[str] = []

    def open(self) -> Page:
        page = self.browser.new_page()
        self.pages.append(page)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("console", self._console)
        page.goto(self.url)
        expect(page.locator("#state")).to_have_text("open", timeout=WAIT_MS)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.problems.append(f"CSP: {message.text}")
        if "Failed to load resource" in message.text:  # a 404, e.g. /favicon.ico
            self.problems.append(f"{message.text}: {message.location.get('url')}")

    def on_two_workers(self) -> tuple[Page, Page]:
        first = self.open()
        first_worker = worker_of(first)
        for _ in range(MAX_PAGES):
            page = self.open()
            if worker_of(page) != first_worker:
                return first, page
            self.pages.remove(page)
            page.close()
        raise AssertionError(f"{MAX_PAGES} pages all landed on worker {first_worker}")

    def close(self) -> None:
        for page in self.pages:
            page.close()


@pytest.fixture
def demo(browser: Browser, broker: ServerProcess) -> Iterator[DemoPages]:
    pages = DemoPages(browser, broker)
    yield pages
    pages.close()
    assert pages.problems == []


def worker_of(page: Page) -> str:
    worker = page.locator("#worker").text_content() or ""
    assert worker in {str(i) for i in range(WORKERS)}, worker
    return worker


def subscribe(page: Page, topic: str) -> None:
    page.fill("#topic", topic)
    page.click("#subscribe")
    chip = page.locator(f'#subscriptions li[data-topic="{topic}"]')
    expect(chip).to_have_attribute("data-ready", "true", timeout=WAIT_MS)


def publish(page: Page, topic: str, text: str, *, as_json: bool = False) -> None:
    page.fill("#publish-topic", topic)
    page.fill("#message", text)
    page.set_checked("#as-json", as_json)
    page.click("#publish")
    expect(page.locator("#publish-status")).to_have_text(f"published to {topic}", timeout=WAIT_MS)


def messages(page: Page, topic: str):
    return page.locator(f'#messages li[data-topic="{topic}"] .data')


def new_topic(prefix: str = "e2e.demo") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def rows(page: Page, topic: str):
    return page.locator(f'#messages li[data-testid="message"][data-topic="{topic}"]')


def markers(page: Page, kind: str):
    return page.locator(f'#messages li.marker[data-kind="{kind}"]')


def test_two_pages_on_different_workers_talk_through_the_ui(demo: DemoPages) -> None:
    alice, bob = demo.on_two_workers()
    assert worker_of(alice) != worker_of(bob)
    assert (alice.locator("#client-id").text_content() or "").startswith(worker_of(alice) + "-")
    topic = new_topic()
    subscribe(alice, topic)
    subscribe(bob, topic)

    publish(alice, topic, "hello from alice")
    expect(messages(bob, topic)).to_have_text(["hello from alice"], timeout=WAIT_MS)
    publish(bob, topic, "hi alice")
    # Newest first; alice also sees her own message.
    expect(messages(alice, topic)).to_have_text(["hi alice", "hello from alice"], timeout=WAIT_MS)
    expect(messages(bob, topic)).to_have_text(["hi alice", "hello from alice"], timeout=WAIT_MS)

    publish(alice, topic, '{"n": 1, "tags": ["a"]}', as_json=True)
    expect(messages(bob, topic).first).to_have_text('{"n":1,"tags":["a"]}', timeout=WAIT_MS)

    # The traffic counters count them; the chart has been drawn.
    expect(bob.locator("#rate-in")).not_to_have_text("0", timeout=WAIT_MS)
    bob.wait_for_function(
        """
        () => {
          const c = document.getElementById("rate-chart");
          const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
          return px.some((v, i) => i % 4 === 3 && v > 0);
        }
        """,
        timeout=WAIT_MS,
    )


def test_message_data_is_shown_as_text_never_as_markup(demo: DemoPages) -> None:
    alice, bob = demo.on_two_workers()
    topic = new_topic()
    subscribe(bob, topic)
    publish(alice, topic, XSS)
    publish(alice, topic, '{"html": "<b id=\\"bold\\">bold</b>"}', as_json=True)
    expect(messages(bob, topic)).to_have_text(
        ['{"html":"<b id=\\"bold\\">bold</b>"}', XSS], timeout=WAIT_MS
    )
    assert messages(bob, topic).last.text_content() == XSS
    assert bob.locator("#messages img, #messages b").count() == 0
    assert bob.evaluate("window.__xss") is None
    assert alice.evaluate("window.__xss") is None


def test_server_errors_show_in_the_panel_that_asked(demo: DemoPages) -> None:
    page = demo.open()
    page.fill("#publish-topic", "not a topic!")
    page.fill("#message", "x")
    page.click("#publish")
    expect(page.locator("#publish-status")).to_contain_text("bad_topic", timeout=WAIT_MS)
    expect(page.locator("#subscribe-status")).to_have_text("")

    page.fill("#publish-topic", "fine")
    page.fill("#topic", "bad topic")
    page.click("#subscribe")
    # The refusal shows in the Subscribe panel, and only there; the chip goes; the refused
    # topic is not offered for publishing.
    expect(page.locator("#subscribe-status")).to_contain_text(
        "bad topic: bad_topic", timeout=WAIT_MS
    )
    expect(page.locator("#subscribe-status")).to_have_class("note error")
    expect(page.locator("#subscriptions li")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#publish-status")).not_to_contain_text("bad topic")
    expect(page.locator("#publish-topic")).to_have_value("fine")
    expect(page.locator("#connection-note")).to_have_text("")

    # An accepted subscription is offered for publishing.
    topic = new_topic()
    subscribe(page, topic)
    expect(page.locator("#subscribe-status")).to_have_text(f"subscribed to {topic}")
    expect(page.locator("#publish-topic")).to_have_value(topic)

    page.set_checked("#as-json", True)
    page.fill("#publish-topic", "fine")
    page.fill("#message", "{not json")
    page.click("#publish")
    expect(page.locator("#publish-status")).to_contain_text("not JSON", timeout=WAIT_MS)


def test_an_empty_message_is_refused_with_a_note(demo: DemoPages) -> None:
    page = demo.open()
    topic = new_topic()
    subscribe(page, topic)
    for as_json in (False, True):
        for empty in ("", "   "):
            page.fill("#message", empty)
            page.set_checked("#as-json", as_json)
            page.click("#publish")
            expect(page.locator("#publish-status")).to_have_text(
                "nothing to publish: the message is empty"
            )
            expect(page.locator("#publish-status")).to_have_class("note error")
    publish(page, topic, "after the empty ones")
    # Requests are handled in order: an empty publish would have arrived first.
    expect(messages(page, topic)).to_have_text(["after the empty ones"], timeout=WAIT_MS)
    # A JSON empty string typed as such is a real message.
    publish(page, topic, '""', as_json=True)
    expect(messages(page, topic)).to_have_text(['""', "after the empty ones"], timeout=WAIT_MS)


def test_the_rate_legend_averages_over_the_last_10_s(demo: DemoPages) -> None:
    page = demo.open()
    topic = new_topic()
    subscribe(page, topic)
    publish(page, topic, "one")
    publish(page, topic, "two")
    legend = page.locator("#rate-legend")
    expect(legend).to_contain_text("average over the last 10 s")
    # Both messages within the last 10 s: 2 / 10 s, in and out.
    expect(page.locator("#rate-in")).to_have_text("0.2", timeout=WAIT_MS)
    expect(page.locator("#rate-out")).to_have_text("0.2", timeout=WAIT_MS)
    # A quiet second later the last second reads 0; the 10 s rate does not.
    expect(legend).to_have_attribute("data-last-second-in", "0", timeout=WAIT_MS)
    expect(page.locator("#rate-in")).to_have_text("0.2")


def test_the_favicon_is_there_and_the_page_loads_nothing_that_fails(demo: DemoPages) -> None:
    """No 404 on a page load (DemoPages records any failed resource, e.g. /favicon.ico)."""
    icon = (STATIC / "favicon.ico").read_bytes()
    assert icon[:4] == b"\x00\x00\x01\x00" and 0 < len(icon) < 4096  # an ICO, tiny
    page = demo.open()
    href = page.locator('link[rel="icon"]').get_attribute("href")
    assert href and href.startswith("/")  # same origin: allowed by the page's CSP
    assert page.request.get(demo.url.rstrip("/") + href).status == 200
    page.wait_for_load_state("networkidle")


def test_offsets_own_messages_reconnects_and_gaps_are_marked(
    demo: DemoPages, tmp_path: Path
) -> None:
    page, other = demo.open(), demo.open()
    hist, plain = new_topic("e2e.hist"), new_topic()
    subscribe(page, hist)
    subscribe(page, plain)

    publish(page, hist, "mine")
    expect(rows(page, hist)).to_have_count(1, timeout=WAIT_MS)
    mine = rows(page, hist).first
    expect(mine).to_have_attribute("data-own", "true")
    expect(mine.locator(".own-mark")).to_have_text("you")
    expect(mine.locator(".offset")).to_have_text("#1")
    publish(other, hist, "theirs")
    expect(rows(page, hist)).to_have_count(2, timeout=WAIT_MS)
    theirs = rows(page, hist).first
    expect(theirs.locator(".data")).to_have_text("theirs")
    expect(theirs.locator(".offset")).to_have_text("#2")
    expect(theirs).not_to_have_attribute("data-own", "true")
    expect(theirs.locator(".own-mark")).to_have_count(0)
    publish(other, plain, "no history")
    expect(rows(page, plain)).to_have_count(1, timeout=WAIT_MS)
    expect(rows(page, plain).locator(".offset")).to_have_count(0)

    # Offline: the heartbeat gives the socket up; meanwhile more is published than the
    # history keeps (offsets 3..7 with 3 kept: 3 and 4 are gone).
    page.context.set_offline(True)
    expect(page.locator("#state")).to_have_text("connecting", timeout=WAIT_MS)
    expect(markers(page, "disconnect")).to_have_count(1, timeout=WAIT_MS)
    expect(markers(page, "disconnect")).to_contain_text("connection lost (1006)")
    missed = [f"missed {i}" for i in range(3, 8)]
    for text in missed:
        publish(other, hist, text)
    page.context.set_offline(False)

    expect(page.locator("#state")).to_have_text("open", timeout=WAIT_MS)
    expect(markers(page, "reconnect")).to_have_count(1, timeout=WAIT_MS)
    expect(markers(page, "reconnect")).to_contain_text("reconnected: worker")
    hist_gaps = page.locator(f'#messages li.marker[data-kind="gap"][data-topic="{hist}"]')
    expect(hist_gaps.filter(has_text="offsets 3 to 4")).to_have_count(1, timeout=WAIT_MS)
    plain_gaps = page.locator(f'#messages li.marker[data-kind="gap"][data-topic="{plain}"]')
    expect(plain_gaps).to_have_count(1, timeout=WAIT_MS)
    expect(plain_gaps).to_contain_text("not recovered")
    # What history still had is replayed, with its offsets, once.
    expect(messages(page, hist)).to_have_text(
        [*reversed(missed[-HISTORY:]), "theirs", "mine"], timeout=WAIT_MS
    )
    expect(rows(page, hist).locator(".offset")).to_have_text(["#7", "#6", "#5", "#2", "#1"])
    expect(rows(page, hist).locator(".own-mark")).to_have_count(1)

    shot = page.screenshot(path=tmp_path / "demo.png", full_page=True)
    assert (tmp_path / "demo.png").read_bytes() == shot
    assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 1000


def test_unsubscribing_stops_the_messages(demo: DemoPages) -> None:
    alice, bob = demo.on_two_workers()
    gone, kept = new_topic(), new_topic()
    subscribe(bob, gone)
    subscribe(bob, kept)
    bob.locator(f'#subscriptions li[data-topic="{gone}"] button').click()
    # The chip goes when the server acknowledged the unsubscribe.
    expect(bob.locator(f'#subscriptions li[data-topic="{gone}"]')).to_have_count(0)
    publish(alice, gone, "missed")
    publish(alice, kept, "seen")
    # One publisher, one bus connection per worker: "seen" arriving means "missed" would
    # have arrived before it.
    expect(messages(bob, kept)).to_have_text(["seen"], timeout=WAIT_MS)
    expect(messages(bob, gone)).to_have_count(0)
