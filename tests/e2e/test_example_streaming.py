"""The streaming example runs as its README says: service + browser, both directions."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect
from support.processes import REPO, ServerProcess, serve


@pytest.fixture(scope="module")
def broker(redis_server) -> Iterator[ServerProcess]:
    server = serve(redis_server.url, args=["--static-dir", "examples/streaming/web"])
    yield server
    assert server.stop() == 0


def test_service_streams_to_the_page_and_obeys_its_commands(browser: Browser, broker) -> None:
    service = ServerProcess(
        [sys.executable, str(REPO / "examples/streaming/service.py"), "--url", broker.url],
        ready=r"streaming via worker",
    )
    # wait_for_function polls with eval, which the page's CSP forbids: bypass it for the test.
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    try:
        page.goto(f"http://{broker.host}:{broker.port}/")
        expect(page.locator("#state")).to_have_text("open", timeout=15_000)
        page.wait_for_function(
            "Number(document.getElementById('count').textContent) >= 3", timeout=15_000
        )
        page.click("#pause")
        expect(page.locator("#service")).to_contain_text('"paused":true', timeout=15_000)
        page.fill("#hz", "20")
        page.click("#resume")
        expect(page.locator("#service")).to_contain_text('"cmd":"resume"', timeout=15_000)
        page.click("#set-rate")
        expect(page.locator("#service")).to_contain_text('"hz":20', timeout=15_000)
        before = int(page.locator("#count").text_content() or "0")
        page.wait_for_function(
            f"Number(document.getElementById('count').textContent) >= {before + 20}",
            timeout=15_000,
        )
        service.wait_for_output(r"command \{'cmd': 'rate', 'hz': 20\}")
    finally:
        context.close()
        service.stop()
