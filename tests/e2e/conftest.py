"""A real browser: Playwright driving Debian's headless /usr/bin/chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = os.environ.get("REDWIRE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module (Playwright gives it a fresh profile).

    Not per session: Playwright's sync API keeps an event loop running in this thread while
    it is started, and asyncio tests of later modules need the thread to themselves."""
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def pages(browser: Browser) -> Iterator[list[Page]]:
    """Pages a test opens; each is closed with its context afterwards (a page from
    `browser.new_page()` has a context of its own, so this closes exactly that page)."""
    opened: list[Page] = []
    yield opened
    for page in opened:
        page.context.close()
