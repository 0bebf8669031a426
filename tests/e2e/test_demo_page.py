"""The demo page at `/`, driven through its UI in headless Chromium, two workers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect
from support.processes import ServerProcess, serve

WORKERS = 2
WAIT_MS = 15_000
MAX_PAGES = 24  # pages opened at most while looking for one on another worker
XSS = '<img src=x onerror="window.__xss=1">'


@pytest.fixture(scope="module")
def broker(redis_server) -> Iterator[ServerProcess]:
    server = serve(redis_server.url, workers=WORKERS)
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


def new_topic() -> str:
    return f"e2e.demo.{uuid.uuid4().hex[:12]}"


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


def test_server_errors_show_in_the_status_line(demo: DemoPages) -> None:
    page = demo.open()
    page.fill("#publish-topic", "not a topic!")
    page.fill("#message", "x")
    page.click("#publish")
    expect(page.locator("#publish-status")).to_contain_text("bad_topic", timeout=WAIT_MS)

    page.fill("#topic", "bad topic")
    page.click("#subscribe")
    expect(page.locator("#subscriptions li")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#publish-status")).to_contain_text("bad_topic", timeout=WAIT_MS)

    page.set_checked("#as-json", True)
    page.fill("#publish-topic", "fine")
    page.fill("#message", "{not json")
    page.click("#publish")
    expect(page.locator("#publish-status")).to_contain_text("not JSON", timeout=WAIT_MS)


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
