"""wss:// from headless Chromium: `redwire serve --certfile --keyfile` with a self-signed
certificate, trusted by its public key (`--ignore-certificate-errors-spki-list`: Chromium
trusts exactly that key; every other certificate error still fails).

The page is loaded over https:// from the broker itself, so `connect()` with no URL picks
wss:// (a secure page may not open ws://); two pages publish to each other through Redis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from e2e.conftest import CHROMIUM, CHROMIUM_ARGS
from playwright.sync_api import Browser, sync_playwright
from support.processes import ServerProcess
from support.tls import SelfSigned

WAIT_MS = 20_000

OPEN = """
async (waitMs) => {
  const rw = await import("/redwire.js");
  const client = rw.connect();
  const t = (window.t = { client, got: [] });
  await new Promise((resolve, reject) => {
    client.on("connected", resolve);
    setTimeout(() => reject(new Error("no connection")), waitMs);
  });
  const sub = client.subscribe("tls.browser", (data) => t.got.push(data));
  await sub.ready;
  return { url: client.url ?? null, protocol: location.protocol };
}
"""


@pytest.fixture(scope="module")
def browsers(tls_cert: SelfSigned) -> Iterator[dict[str, Browser]]:
    """Two Chromiums from one Playwright: one trusting the certificate, one plain."""
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium"
    trust = f"--ignore-certificate-errors-spki-list={tls_cert.spki_sha256}"
    with sync_playwright() as pw:
        launched = {
            "trusting": pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=[*CHROMIUM_ARGS, trust]
            ),
            "plain": pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS)
            ),
        }
        yield launched
        for chromium in launched.values():
            chromium.close()


def test_two_pages_talk_over_wss(browsers: dict[str, Browser], tls_broker: ServerProcess) -> None:
    origin = f"https://127.0.0.1:{tls_broker.port}"
    pages = [browsers["trusting"].new_page() for _ in range(2)]
    try:
        for page in pages:
            response = page.goto(f"{origin}/healthz")
            assert response is not None and response.status == 200
            opened = page.evaluate(OPEN, WAIT_MS)
            assert opened["protocol"] == "https:"
        pages[0].evaluate("() => window.t.client.publish('tls.browser', {from: 0})")
        for page in pages:
            page.wait_for_function("() => window.t.got.length >= 1", timeout=WAIT_MS)
            assert page.evaluate("() => window.t.got") == [{"from": 0}]
        scheme = pages[1].evaluate(
            "() => performance.getEntriesByType('resource')"
            ".map((e) => e.name).find((n) => n.endsWith('/redwire.js'))"
        )
        assert scheme.startswith("https://")
    finally:
        for page in pages:
            page.context.close()


def test_an_untrusted_certificate_is_refused_by_a_plain_browser(
    browsers: dict[str, Browser], tls_broker: ServerProcess
) -> None:
    """The same page in a Chromium without the trust flag does not load: the test above
    passes because the certificate is trusted, not because errors are ignored."""
    page = browsers["plain"].new_page()
    try:
        with pytest.raises(Exception, match="ERR_CERT"):
            page.goto(f"https://127.0.0.1:{tls_broker.port}/healthz")
    finally:
        page.context.close()
