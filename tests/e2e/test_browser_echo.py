"""A real Chromium page talks to `redwire echo` (compression on, as browsers offer it)."""

from __future__ import annotations

from playwright.sync_api import Browser

ECHO_SCRIPT = """
async (url) => {
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
  const next = () => new Promise((resolve) => { ws.onmessage = (e) => resolve(e.data); });
  const out = { extensions: ws.extensions, protocol: ws.protocol };
  let p = next(); ws.send("hello from chromium"); out.text = await p;
  p = next(); ws.send("ünïcødé ✓ " + "x".repeat(70000)); out.bigText = (await p).length;
  p = next(); ws.send(new Uint8Array([0, 1, 2, 255]).buffer);
  out.binary = Array.from(new Uint8Array(await p));
  p = next(); ws.send(""); out.empty = await p;
  const closed = new Promise((resolve) => { ws.onclose = (e) => resolve([e.code, e.wasClean]); });
  ws.close(1000, "done");
  out.close = await closed;
  return out;
}
"""


def test_chromium_echo(browser: Browser, echo_server) -> None:
    page = browser.new_page()
    try:
        page.goto(f"http://{echo_server.host}:{echo_server.port}/")
        result = page.evaluate(ECHO_SCRIPT, echo_server.url)
    finally:
        page.close()
    assert "permessage-deflate" in result["extensions"]
    assert result["text"] == "hello from chromium"
    assert result["bigText"] == len("ünïcødé ✓ ") + 70000
    assert result["binary"] == [0, 1, 2, 255]
    assert result["empty"] == ""
    assert result["close"] == [1000, True]
