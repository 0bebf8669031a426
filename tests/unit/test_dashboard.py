"""worker/dashboard.py: the snapshot builder, the API key checks, reserved topics, the page."""

from __future__ import annotations

import asyncio
import json

import pytest

from broker.bus.memory import MemoryBus
from broker.envelope import BusMessage
from broker.errors import ClientError
from broker.handshake import Request
from broker.settings import Settings
from worker import dashboard, wire
from worker.broker_app import BrokerApp
from worker.stats import WorkerStats

KEY = "s3cret-key"
WAIT_S = 10.0


def snapshot_args(**stats: int) -> dict:
    counters = WorkerStats().as_dict()
    counters.update(stats)
    return {
        "stats": counters,
        "bus": {"healthy": True, "reconnects": 0, "gaps": 0, "last_probe_rtt_s": 0.0004},
        "topics": {},
        "rtt_s": None,
    }


# --- the snapshot builder ----------------------------------------------------------------------


def test_the_first_snapshot_has_totals_and_no_rates_yet() -> None:
    builder = dashboard.SnapshotBuilder("abcd1234", "0", 42)
    args = snapshot_args(connections=3, subscriptions=5, publishes=10, deliveries=30)
    snap = builder.build(now_s=100.0, wall_s=1_764_650_000.123456, **args)
    assert snap["v"] == 1
    assert (snap["instance"], snap["worker"], snap["pid"]) == ("abcd1234", "0", 42)
    assert snap["t"] == 1_764_650_000.123
    assert snap["interval_s"] is None
    assert (snap["connections"], snap["subscriptions"]) == (3, 5)
    assert snap["totals"]["publishes"] == 10 and snap["totals"]["deliveries"] == 30
    assert set(snap["rates"].values()) == {0.0}
    assert snap["redis"] == {
        "healthy": True,
        "rtt_ms": None,
        "probe_rtt_ms": 0.4,
        "reconnects": 0,
        "gaps": 0,
    }


def test_rates_are_the_totals_difference_over_the_time_between_snapshots() -> None:
    builder = dashboard.SnapshotBuilder("i", "1", 1)
    builder.build(now_s=10.0, wall_s=0.0, **snapshot_args(publishes=100, deliveries=1000))
    args = snapshot_args(publishes=150, deliveries=1400, slow_consumer_closes=1)
    args["bus"] = {"healthy": False, "reconnects": 2, "gaps": 4}
    snap = builder.build(now_s=12.0, wall_s=2.0, **args)
    assert snap["interval_s"] == 2.0
    assert snap["rates"]["publishes"] == 25.0
    assert snap["rates"]["deliveries"] == 200.0
    assert snap["rates"]["slow_consumer_closes"] == 0.5
    assert snap["rates"]["bus_gaps"] == 2.0
    assert snap["totals"]["bus_reconnects"] == 2 and snap["redis"]["gaps"] == 4
    assert snap["redis"]["healthy"] is False and snap["redis"]["probe_rtt_ms"] is None


def test_a_counter_that_went_down_is_no_negative_rate() -> None:
    builder = dashboard.SnapshotBuilder("i", "1", 1)
    builder.build(now_s=1.0, wall_s=0.0, **snapshot_args(publishes=100))
    snap = builder.build(now_s=2.0, wall_s=1.0, **snapshot_args(publishes=5))
    assert snap["rates"]["publishes"] == 0.0
    snap = builder.build(now_s=3.0, wall_s=2.0, **snapshot_args(publishes=8))
    assert snap["rates"]["publishes"] == 3.0


def test_top_topics_most_subscribers_first_then_by_name_at_most_top() -> None:
    builder = dashboard.SnapshotBuilder("i", "0", 1, top=3)
    args = snapshot_args()
    args["topics"] = {"b": 2, "a": 2, "c": 9, "d": 1, "e": 0}
    args["rtt_s"] = 0.0012345
    snap = builder.build(now_s=0.0, wall_s=0.0, **args)
    assert snap["top_topics"] == [["c", 9], ["a", 2], ["b", 2]]
    assert snap["topics"] == 5
    assert snap["redis"]["rtt_ms"] == 1.234


def test_a_full_snapshot_fits_one_message() -> None:
    settings = Settings()
    builder = dashboard.SnapshotBuilder("f" * 8, "63", 2**22)
    args = snapshot_args(**{name: 2**62 for name in WorkerStats().as_dict()})
    args["topics"] = {f"{i:03d}" + "t" * (settings.max_topic_bytes - 3): i for i in range(500)}
    args["rtt_s"] = 1.5
    snap = builder.build(now_s=0.0, wall_s=1e10, **args)
    payload = json.dumps(snap, separators=(",", ":")).encode()
    assert len(snap["top_topics"]) == dashboard.TOP_TOPICS
    assert len(payload) < settings.max_data_bytes


# --- the API key, reserved topics ------------------------------------------------------------


def request(target: str, *headers: tuple[str, str]) -> Request:
    path, _, query = target.partition("?")
    return Request("GET", target, path, query, "1.1", tuple(headers))


def test_the_one_key_comparison() -> None:
    assert dashboard.api_key_matches(KEY, KEY)
    assert not dashboard.api_key_matches(KEY, KEY + "x")
    assert not dashboard.api_key_matches(KEY, "")
    assert not dashboard.api_key_matches(KEY, None)
    assert not dashboard.api_key_matches(None, "")  # no key configured: nothing matches
    assert not dashboard.api_key_matches(None, None)
    assert dashboard.api_key_matches("clé", "clé") and not dashboard.api_key_matches("clé", "cle")


def test_a_request_presents_the_key_by_query_or_by_the_cookie() -> None:
    cookie = f"{dashboard.COOKIE}={dashboard.cookie_value(KEY)}"
    assert dashboard.presents_api_key(KEY, request(f"/ws?key={KEY}"))
    assert dashboard.presents_api_key(KEY, request("/ws?key=s3cret%2Dkey&x=1"))
    assert dashboard.presents_api_key(KEY, request("/ws", ("Cookie", f"a=b; {cookie}")))
    assert not dashboard.presents_api_key(KEY, request("/ws"))
    assert not dashboard.presents_api_key(KEY, request("/ws?key=nope"))
    assert not dashboard.presents_api_key(None, request(f"/ws?key={KEY}"))
    assert not dashboard.presents_api_key(KEY, None)
    # The cookie holds an HMAC of the key, not the key; a broken header holds nothing.
    assert not dashboard.presents_api_key(KEY, request("/ws", ("Cookie", f"redwire_admin={KEY}")))
    assert not dashboard.presents_api_key(KEY, request("/ws", ("Cookie", '"; \x00=')))
    assert dashboard.cookie_value(KEY) != dashboard.cookie_value(KEY + "2")


@pytest.mark.parametrize(
    ("op", "admin", "allowed"),
    [
        ("publish", False, False),
        ("publish", True, False),  # nobody publishes to $sys. topics, not even with the key
        ("subscribe", False, False),
        ("subscribe", True, True),
        ("presence", False, False),
        ("presence", True, True),
        ("unsubscribe", False, True),
    ],
)
def test_reserved_topics(op: str, admin: bool, allowed: bool) -> None:
    if allowed:
        dashboard.check_reserved_topic(op, dashboard.STATS_TOPIC, admin)
    else:
        with pytest.raises(ClientError) as caught:
            dashboard.check_reserved_topic(op, dashboard.STATS_TOPIC, admin)
        assert caught.value.code == wire.FORBIDDEN == "forbidden"
    dashboard.check_reserved_topic(op, "sys.stats", admin)  # not reserved: no objection


def test_the_wire_accepts_reserved_names_and_the_grammar_after_the_prefix() -> None:
    assert wire.check_client_topic("$sys.stats", 200) == "$sys.stats"
    assert wire.check_client_topic("chat.lobby", 200) == "chat.lobby"
    for bad in ("$sys.", "$sys.a b", "$other", "$", "$sys.x" + "y" * 200):
        with pytest.raises(ClientError) as caught:
            wire.check_client_topic(bad, 200)
        assert caught.value.code == wire.BAD_TOPIC


# --- the page ----------------------------------------------------------------------------------


def split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


HTML = b"<!doctype html><title>the page</title>"


def test_no_api_key_no_dashboard() -> None:
    status, _, body = split(dashboard.page(Settings(), request(f"/dashboard?key={KEY}"), HTML))
    assert status == 404
    assert b"disabled" in body and b"api_key" in body


def test_without_the_key_a_401_asks_for_it() -> None:
    settings = Settings(api_key=KEY)
    for target in ("/dashboard", "/dashboard?key=wrong", "/dashboard?key="):
        status, fields, body = split(dashboard.page(settings, request(target), HTML))
        assert status == 401, target
        assert b'name="key"' in body and HTML not in body
        assert fields["cache-control"] == "no-store"
        assert "set-cookie" not in fields


def test_the_right_key_sets_the_cookie_and_leaves_the_address_bar() -> None:
    settings = Settings(api_key=KEY)
    status, fields, _ = split(dashboard.page(settings, request(f"/dashboard?key={KEY}"), HTML))
    assert status == 303 and fields["location"] == "/dashboard"
    cookie = fields["set-cookie"]
    assert cookie.startswith(f"{dashboard.COOKIE}={dashboard.cookie_value(KEY)};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert KEY not in cookie and "Secure" not in cookie  # plain http here
    assert fields["referrer-policy"] == "no-referrer"
    value = cookie.split(";")[0]
    status, fields, body = split(
        dashboard.page(settings, request("/dashboard", ("Cookie", value)), HTML)
    )
    assert (status, body) == (200, HTML)
    assert fields["cache-control"] == "no-store"
    assert "default-src 'self'" in fields["content-security-policy"]


# --- the publisher, on a MemoryBus -----------------------------------------------------------


async def test_a_worker_with_a_key_publishes_snapshots_and_one_without_does_not() -> None:
    bus = MemoryBus("w3")
    app = BrokerApp(Settings(redis_url="memory://", api_key=KEY), worker_id="3", bus=bus)
    assert app.dashboard is not None
    got: list[BusMessage] = []
    await app.start()
    try:
        timed = asyncio.get_running_loop().create_future()

        def on_messages(batch: list[BusMessage]) -> None:  # what the hub would get
            got.extend(batch)
            if any(json.loads(m.payload)["redis"]["rtt_ms"] for m in got) and not timed.done():
                timed.set_result(None)

        bus.on_messages = on_messages
        await bus.subscribe([dashboard.STATS_TOPIC])
        await app.dashboard.publish_once()
        await app.dashboard.publish_once()
        assert app.dashboard.published >= 2 and app.dashboard.rtt_s is not None
        await asyncio.wait_for(timed, WAIT_S)
        snaps = [json.loads(m.payload) for m in got if m.topic == dashboard.STATS_TOPIC]
        assert snaps and snaps[-1]["worker"] == "3" and snaps[-1]["redis"]["rtt_ms"] is not None
    finally:
        await app.stop()
    plain = BrokerApp(Settings(redis_url="memory://"), worker_id="4", bus=MemoryBus("w4"))
    assert plain.dashboard is None


async def test_a_snapshot_the_bus_refuses_goes_to_the_workers_own_subscribers() -> None:
    app = BrokerApp(
        Settings(redis_url="memory://", api_key=KEY), worker_id="5", bus=MemoryBus("w5")
    )
    assert app.dashboard is not None
    await app.start()
    await app.stop()  # the bus is closed now: every publish is BusUnavailable
    local: list[BusMessage] = []
    app.hub.deliver = local.extend  # type: ignore[method-assign]  # where it lands
    await app.dashboard.publish_once()
    assert [m.topic for m in local] == [dashboard.STATS_TOPIC]
    assert json.loads(local[0].payload)["worker"] == "5"
    assert app.dashboard.rtt_s is None


async def test_with_tokens_required_the_api_key_still_opens_the_dashboards_websocket() -> None:
    from broker import auth

    settings = Settings(redis_url="memory://", api_key=KEY, jwt_secrets=("x" * 32,))
    app = BrokerApp(settings, worker_id="6", bus=MemoryBus("w6"))
    cookie = ("Cookie", f"{dashboard.COOKIE}={dashboard.cookie_value(KEY)}")
    for presented in (request("/ws", cookie), request(f"/ws?key={KEY}")):
        _, verified = await app.authenticate(presented)
        assert verified.anonymous
    for refused in (request("/ws"), request("/ws?key=wrong")):
        with pytest.raises(auth.InvalidToken):
            await app.authenticate(refused)
