"""`/dashboard` in headless Chromium over `redwire serve --workers 2`, a real Redis, a load.

The page is opened with the API key, a few `websockets` publishers and subscribers run in a
thread of their own (Playwright's sync API holds this thread's event loop), and the test
waits for what the page shows: both workers, the connections it made, non-zero rates that
fall back when the load stops, the load's topic, and charts with pixels of their colours.
A second replica on the same Redis shows up beside the first. Then the guard: no key → 401,
no API key configured → 404, `$sys.` topics refused (`forbidden`) to a WebSocket without
the key, and the key still enough where tokens and topic rules are strict. Set
DASHBOARD_SCREENSHOT=/path.png to keep a screenshot of the page under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from playwright.sync_api import Browser, ConsoleMessage, Page, expect
from support.processes import ServerProcess, serve
from websockets.sync.client import connect as ws_connect

WORKERS = 2
KEY = "dash-" + uuid.uuid4().hex
WAIT_MS = 20_000
WAIT_S = WAIT_MS / 1000
SUBSCRIBERS = 4
PUBLISHERS = 2
RATE_PER_PUBLISHER = 40  # messages a second
CHARTS = ("chart-rates", "chart-connections", "chart-redis")
PREFIX = f"dash{uuid.uuid4().hex[:8]}:"  # this module's brokers only: others share the Redis


@pytest.fixture(scope="module")
def broker(redis_server) -> Iterator[ServerProcess]:
    env = {"REDWIRE_API_KEY": KEY, "REDWIRE_CHANNEL_PREFIX": PREFIX}
    server = serve(redis_server.url, workers=WORKERS, env=env)
    yield server
    assert server.stop() == 0
    assert KEY not in "".join(server.output), "the API key reached the log"


class Load:
    """Publishers and subscribers of one topic over `websockets`, in a thread with its own
    event loop, from `start()` until `stop()`."""

    def __init__(self, url: str, topic: str) -> None:
        self.url = url
        self.topic = topic
        self.received = 0
        self.sent = 0
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(WAIT_S), "the load did not connect"
        assert self.error is None, self.error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive()
        assert self.error is None, self.error

    async def _main(self) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                subs = [await self._open(stack) for _ in range(SUBSCRIBERS)]
                for ws in subs:
                    await ws.send(json.dumps({"op": "subscribe", "topic": self.topic, "id": 1}))
                    reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
                    assert reply == {"op": "ack", "id": 1}, reply
                pubs = [await self._open(stack) for _ in range(PUBLISHERS)]
                tasks = [asyncio.create_task(self._read(ws)) for ws in subs]
                tasks += [asyncio.create_task(self._publish(ws)) for ws in pubs]
                self._ready.set()
                await asyncio.to_thread(self._stop.wait)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        ws = await stack.enter_async_context(websockets.connect(self.url + "/ws"))
        welcome = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert welcome["op"] == "welcome", welcome
        return ws

    async def _read(self, ws: Any) -> None:
        async for _ in ws:
            self.received += 1

    async def _publish(self, ws: Any) -> None:
        n = 0
        while True:  # paced, not timed: the rate only needs to be well above zero
            await ws.send(json.dumps({"op": "publish", "topic": self.topic, "data": {"n": n}}))
            n += 1
            self.sent += 1
            await asyncio.sleep(1 / RATE_PER_PUBLISHER)  # the load's pace, not a wait


def number(page: Page, test_id: str) -> float:
    text = page.get_by_test_id(test_id).text_content() or ""
    return float(text.replace(",", "").rstrip("+") or "nan")


def wait_until(page: Page, script: str, arg: Any = None) -> Any:
    return page.wait_for_function(script, arg=arg, timeout=WAIT_MS).json_value()


# How many pixels of a canvas are (nearly) its first series' colour, and of each.
COLOUR_PIXELS = """(id) => {
  const canvas = document.getElementById(id);
  const colours = (canvas.dataset.colors || "").split(",").filter(Boolean).map((hex) =>
    [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)));
  if (!colours.length || !canvas.width) return null;
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const counts = colours.map(() => 0);
  for (let p = 0; p < data.length; p += 4) {
    colours.forEach(([r, g, b], k) => {
      if (Math.abs(data[p] - r) + Math.abs(data[p + 1] - g) + Math.abs(data[p + 2] - b) < 24)
        counts[k]++;
    });
  }
  return counts;
}"""


def open_dashboard(browser: Browser, broker: ServerProcess, problems: list[str]) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def console(message: ConsoleMessage) -> None:
        if message.type == "error" or "Content Security Policy" in message.text:
            problems.append(f"console: {message.text}")

    page.on("console", console)
    page.goto(f"http://{broker.host}:{broker.port}/dashboard?key={KEY}")
    assert page.url == f"http://{broker.host}:{broker.port}/dashboard"  # the key left the bar
    expect(page.get_by_test_id("state")).to_have_text("open", timeout=WAIT_MS)
    return page


def test_the_dashboard_shows_the_load_live(browser: Browser, broker: ServerProcess) -> None:
    problems: list[str] = []
    page = open_dashboard(browser, broker, problems)
    try:
        # Both workers report; the page's own connection is the only one.
        expect(page.get_by_test_id("worker-count")).to_have_text(str(WORKERS), timeout=WAIT_MS)
        expect(page.locator("#workers tr")).to_have_count(WORKERS, timeout=WAIT_MS)
        expect(page.get_by_test_id("connections")).to_have_text("1", timeout=WAIT_MS)
        expect(page.get_by_test_id("redis-status")).to_have_attribute(
            "data-healthy", "true", timeout=WAIT_MS
        )
        topic = f"e2e.dash.{uuid.uuid4().hex[:8]}"
        load = Load(broker.url, topic)
        load.start()
        try:
            connections = 1 + SUBSCRIBERS + PUBLISHERS
            expect(page.get_by_test_id("connections")).to_have_text(
                str(connections), timeout=WAIT_MS
            )
            per_worker = wait_until(
                page,
                """(n) => {
                  const rows = [...document.querySelectorAll("#workers tr")];
                  const total = rows.reduce((t, r) => t + Number(r.dataset.connections), 0);
                  return total === n && rows.map((r) => Number(r.dataset.connections));
                }""",
                connections,
            )
            assert sum(per_worker) == connections and len(per_worker) == WORKERS
            row = page.locator(f'#topics tr[data-topic="{topic}"]')
            expect(row).to_have_attribute("data-subscribers", str(SUBSCRIBERS), timeout=WAIT_MS)

            # The rates move off zero and the totals grow while the load runs.
            wait_until(
                page,
                "() => Number(document.getElementById('publish-rate')"
                ".textContent.replace(/,/g, '')) > 0",
            )
            wait_until(
                page,
                "() => Number(document.getElementById('delivery-rate')"
                ".textContent.replace(/,/g, '')) > 0",
            )
            before = number(page, "publishes")
            wait_until(
                page,
                "(n) => Number(document.getElementById('publishes')"
                ".textContent.replace(/,/g, '')) > n",
                before,
            )
            assert number(page, "deliveries") > 0
            assert load.received > 0

            # The charts draw: pixels of each series' colour on the canvas.
            for chart in CHARTS:
                counts = wait_until(
                    page,
                    f"() => {{ const c = ({COLOUR_PIXELS})({chart!r});"
                    " return c && c.every((n) => n > 20) && c; }",
                )
                assert all(n > 20 for n in counts), (chart, counts)
            png = os.environ.get("DASHBOARD_SCREENSHOT")
            if png:
                page.screenshot(path=png, full_page=True)
        finally:
            load.stop()

        # Load gone: back to the page's one connection and no publishes.
        expect(page.get_by_test_id("connections")).to_have_text("1", timeout=WAIT_MS)
        expect(page.get_by_test_id("publish-rate")).to_have_text("0", timeout=WAIT_MS)
        expect(page.locator(f'#topics tr[data-topic="{topic}"]')).to_have_count(0, timeout=WAIT_MS)
        assert problems == []
    finally:
        page.context.close()


def test_every_replica_on_the_redis_is_on_the_dashboard(
    browser: Browser, broker: ServerProcess, redis_server
) -> None:
    problems: list[str] = []
    page = open_dashboard(browser, broker, problems)
    try:
        expect(page.get_by_test_id("worker-count")).to_have_text(str(WORKERS), timeout=WAIT_MS)
        env = {"REDWIRE_API_KEY": KEY, "REDWIRE_CHANNEL_PREFIX": PREFIX}
        other = serve(redis_server.url, workers=1, env=env)
        try:
            expect(page.get_by_test_id("worker-count")).to_have_text(
                str(WORKERS + 1), timeout=WAIT_MS
            )
            expect(page.locator("#replica-count")).to_have_text("2 replicas", timeout=WAIT_MS)
            instances = page.locator("#workers tr").evaluate_all(
                "(rows) => rows.map((r) => r.dataset.instance)"
            )
            assert len(instances) == WORKERS + 1 and len(set(instances)) == 2, instances
        finally:
            assert other.stop() == 0
        # Gone: greyed out after 3 s of silence, and out of the sums.
        expect(page.get_by_test_id("worker-count")).to_have_text(str(WORKERS), timeout=WAIT_MS)
        expect(page.locator('#workers tr[data-stale="true"]')).to_have_count(1, timeout=WAIT_MS)
        assert problems == []
    finally:
        page.context.close()


def test_the_key_typed_into_the_form_opens_the_page(browser: Browser, broker) -> None:
    page = browser.new_page()
    try:
        page.goto(f"http://{broker.host}:{broker.port}/dashboard")
        page.fill("#key", "wrong")
        page.click("button[type=submit]")
        expect(page.locator("body")).to_contain_text("Wrong key", timeout=WAIT_MS)
        page.fill("#key", KEY)
        page.click("button[type=submit]")
        expect(page.get_by_test_id("state")).to_have_text("open", timeout=WAIT_MS)
        assert page.url == f"http://{broker.host}:{broker.port}/dashboard"
        expect(page.get_by_test_id("worker-count")).to_have_text(str(WORKERS), timeout=WAIT_MS)
    finally:
        page.context.close()


# --- the guard -------------------------------------------------------------------------------


def get(server: ServerProcess, target: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=WAIT_S)
    try:
        conn.request("GET", target, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_the_page_needs_the_key(broker: ServerProcess) -> None:
    for target in ("/dashboard", "/dashboard?key=wrong"):
        status, _, body = get(broker, target)
        assert status == 401 and b'name="key"' in body, target
    status, fields, _ = get(broker, f"/dashboard?key={KEY}")
    assert status == 303 and fields["location"] == "/dashboard"
    cookie = fields["set-cookie"].split(";")[0]
    assert KEY not in cookie
    status, _, body = get(broker, "/dashboard", Cookie=cookie)
    assert status == 200 and b"/dashboard.js" in body
    for asset in ("/dashboard.js", "/dashboard.css"):
        assert get(broker, asset)[0] == 200


def request(ws: Any, **fields: Any) -> dict[str, Any]:
    ws.send(json.dumps(fields))
    while True:
        frame = json.loads(ws.recv(timeout=WAIT_S))
        if frame.get("id") == fields["id"]:
            return frame


def test_sys_topics_are_the_brokers(broker: ServerProcess) -> None:
    with ws_connect(broker.url + "/ws") as ws:
        assert json.loads(ws.recv(timeout=WAIT_S))["op"] == "welcome"
        reply = request(ws, op="subscribe", topic="$sys.stats", id=1)
        assert (reply["op"], reply["code"]) == ("error", "forbidden"), reply
        reply = request(ws, op="publish", topic="$sys.x", data=1, id=2)
        assert (reply["op"], reply["code"]) == ("error", "forbidden"), reply
        assert request(ws, op="ping", id=3)["op"] == "pong"  # the connection stays
    with ws_connect(f"{broker.url}/ws?key=wrong") as ws:
        assert json.loads(ws.recv(timeout=WAIT_S))["op"] == "welcome"
        assert request(ws, op="subscribe", topic="$sys.stats", id=1)["code"] == "forbidden"
    with ws_connect(f"{broker.url}/ws?key={KEY}") as ws:
        assert json.loads(ws.recv(timeout=WAIT_S))["op"] == "welcome"
        assert request(ws, op="subscribe", topic="$sys.stats", id=1) == {"op": "ack", "id": 1}
        # Publishing there is refused even with the key: the snapshots are the workers' own.
        assert request(ws, op="publish", topic="$sys.stats", data={}, id=2)["code"] == "forbidden"
        seen: set[str] = set()
        while len(seen) < WORKERS:
            frame = json.loads(ws.recv(timeout=WAIT_S))
            if frame.get("op") == "message":
                assert frame["topic"] == "$sys.stats" and frame["data"]["v"] == 1
                seen.add(frame["data"]["worker"])
    body = json.dumps({"topic": "$sys.stats", "data": {}})
    conn = http.client.HTTPConnection(broker.host, broker.port, timeout=WAIT_S)
    try:
        conn.request("POST", "/publish", body, {"Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        assert response.status == 403
        assert json.loads(response.read())["error"] == "forbidden"
    finally:
        conn.close()


def test_no_api_key_no_dashboard(redis_server) -> None:
    server = serve(redis_server.url, workers=1)
    try:
        status, _, body = get(server, f"/dashboard?key={KEY}")
        assert status == 404 and b"api_key" in body
        with ws_connect(f"{server.url}/ws?key={KEY}") as ws:
            assert json.loads(ws.recv(timeout=WAIT_S))["op"] == "welcome"
            assert request(ws, op="subscribe", topic="$sys.stats", id=1)["code"] == "forbidden"
    finally:
        assert server.stop() == 0


def test_the_dashboard_works_where_tokens_and_topic_rules_are_strict(
    browser: Browser, redis_server, tmp_path
) -> None:
    """JWT keys set (no anonymous connections) and a rule asking a claim for every topic: the
    key alone still opens the page, its WebSocket and `$sys.stats`; nobody else gets in."""
    secret_file = tmp_path / "jwt_secrets"
    secret_file.write_text("y" * 32 + "\n")
    env = {
        "REDWIRE_API_KEY": KEY,
        "REDWIRE_JWT_SECRET_FILE": str(secret_file),
        "REDWIRE_TOPICS": json.dumps([{"pattern": "*", "allow_subscribe": "claim"}]),
        "REDWIRE_CHANNEL_PREFIX": f"dash{uuid.uuid4().hex[:8]}:",
    }
    server = serve(redis_server.url, workers=1, env=env)
    problems: list[str] = []
    try:
        page = open_dashboard(browser, server, problems)
        try:
            expect(page.get_by_test_id("worker-count")).to_have_text("1", timeout=WAIT_MS)
            expect(page.get_by_test_id("connections")).to_have_text("1", timeout=WAIT_MS)
            assert problems == []
        finally:
            page.context.close()
        with pytest.raises(websockets.InvalidStatus) as refused:
            with ws_connect(f"{server.url}/ws"):
                pass
        assert refused.value.response.status_code == 401
    finally:
        assert server.stop() == 0
