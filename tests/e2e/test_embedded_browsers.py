"""`redwire serve` with no Redis configured: browsers on different workers still talk.

The issue's check for the embedded default, with real browsers (the fresh-virtualenv
`pip install .` variant is tests/integration/test_embedded_redis.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect
from support.processes import ServerProcess, serve

WAIT_MS = 15_000


@pytest.fixture(scope="module")
def embedded_broker() -> Iterator[ServerProcess]:
    server = serve(None)
    server.wait_for_output(r"embedded redis-server \(pid \d+\)")
    yield server
    assert server.stop() == 0


def _open(browser: Browser, url: str) -> Page:
    page = browser.new_page()
    page.goto(url)
    expect(page.locator("#state")).to_have_text("open", timeout=WAIT_MS)
    return page


def test_browsers_on_different_workers_exchange_messages(
    browser: Browser, embedded_broker: ServerProcess
) -> None:
    url = f"http://{embedded_broker.host}:{embedded_broker.port}/"
    pages = [_open(browser, url)]
    try:
        first_worker = pages[0].locator("#worker").text_content()
        for _ in range(24):  # SO_REUSEPORT spreads connections; bounded search
            page = _open(browser, url)
            pages.append(page)
            if page.locator("#worker").text_content() != first_worker:
                break
        alice, bob = pages[0], pages[-1]
        assert alice.locator("#worker").text_content() != bob.locator("#worker").text_content()
        for page in (alice, bob):
            page.fill("#topic", "embedded.chat")
            page.click("#subscribe")
            chip = page.locator('#subscriptions li[data-topic="embedded.chat"]')
            expect(chip).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
        alice.fill("#publish-topic", "embedded.chat")
        alice.fill("#message", "hello across workers")
        alice.click("#publish")
        received = bob.locator('#messages li[data-topic="embedded.chat"] .data')
        expect(received).to_have_text(["hello across workers"], timeout=WAIT_MS)
    finally:
        for page in pages:
            page.close()
