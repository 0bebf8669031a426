"""Abuse limits as pure pieces: the publish token bucket (on an injected clock), the
connection caps, their settings, and the metrics every worker exports from the start."""

from __future__ import annotations

import pytest

from broker.bus.memory import MemoryBus
from broker.errors import ConfigError, HandshakeError
from broker.settings import Settings
from broker.token_bucket import TokenBucket
from worker.broker_app import BrokerApp
from worker.main import cap_connections
from worker.metrics import series_names
from worker.server import ConnectionLimits
from worker.stats import WorkerStats


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the token bucket ------------------------------------------------------------------------


def test_bucket_allows_the_burst_then_refuses_with_the_wait() -> None:
    clock = Clock()
    bucket = TokenBucket(10.0, 3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.1)  # one token needs 1/10 s
    assert bucket.take() == pytest.approx(0.1)  # a refusal spends nothing


def test_bucket_refills_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(10.0, 3, clock=clock)
    for _ in range(3):
        bucket.take()
    clock.now += 0.05
    assert bucket.take() == pytest.approx(0.05)  # half a token there: half the wait left
    clock.now += 0.05
    assert bucket.take() == 0.0
    assert bucket.take() > 0


def test_bucket_never_holds_more_than_the_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(1000.0, 5, clock=clock)
    clock.now += 3600
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() > 0


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    clock = Clock()
    bucket = TokenBucket(1.0, 1, clock=clock)
    assert bucket.take() == 0.0
    clock.now -= 10
    assert bucket.take() == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.take() == 0.0


def test_bucket_sustains_the_rate_over_time() -> None:
    clock = Clock()
    bucket = TokenBucket(100.0, 10, clock=clock)
    taken = 0
    for _ in range(10_000):  # 10 s in 1 ms steps, trying 1 publish per step
        clock.now += 0.001
        taken += bucket.take() == 0.0
    assert 1000 <= taken <= 1010  # 100/s for 10 s, plus the burst at most


def test_bucket_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1.0, 0)


# --- connection caps -------------------------------------------------------------------------


def test_connection_caps_per_worker_and_per_ip() -> None:
    stats = WorkerStats()
    limits = ConnectionLimits(
        Settings(max_connections_per_worker=3, max_connections_per_ip=2), stats
    )
    a1 = limits.admit("10.0.0.1")
    a2 = limits.admit("10.0.0.1")
    with pytest.raises(HandshakeError) as exc:
        limits.admit("10.0.0.1")
    assert exc.value.status == 429
    b1 = limits.admit("10.0.0.2")
    with pytest.raises(HandshakeError) as exc:
        limits.admit("10.0.0.3")
    assert exc.value.status == 503
    assert (stats.refused_per_ip, stats.refused_worker_full) == (1, 1)
    assert limits.open == 3
    a1()
    a1()  # releasing twice frees one slot only
    assert limits.open == 2
    limits.admit("10.0.0.1")  # a freed slot is usable again
    a2()
    b1()
    assert limits.by_ip == {"10.0.0.1": 1}


def test_connection_rate_refuses_past_the_burst_with_retry_after() -> None:
    stats = WorkerStats()
    limits = ConnectionLimits(Settings(connection_rate_per_s=0.5, connection_burst=2), stats)
    now = [100.0]
    assert limits.rate is not None
    limits.rate = TokenBucket(0.5, 2, clock=lambda: now[0])
    limits.admit("10.0.0.1")
    limits.admit("10.0.0.2")
    with pytest.raises(HandshakeError) as exc:
        limits.admit("10.0.0.3")
    assert exc.value.status == 503
    assert ("Retry-After", "2") in exc.value.headers
    assert stats.refused_rate == 1
    assert limits.open == 2  # a refused upgrade holds no slot
    now[0] += 2.0
    limits.admit("10.0.0.3")  # refilled


def test_connection_caps_off() -> None:
    limits = ConnectionLimits(
        Settings(
            max_connections_per_worker=None, max_connections_per_ip=None, connection_rate_per_s=None
        ),
        WorkerStats(),
    )
    assert limits.rate is None
    for _ in range(100):
        limits.admit("10.0.0.1")
    assert limits.open == 100


# --- settings --------------------------------------------------------------------------------


def test_limit_defaults_are_on() -> None:
    s = Settings()
    assert s.publish_rate_per_s == 10000.0 and s.publish_burst == 20000
    assert s.max_connections_per_worker == 10000 and s.max_connections_per_ip == 1000
    assert s.idle_timeout_s == 300.0
    assert s.connection_rate_per_s == 2000.0 and s.connection_burst == 4000


@pytest.mark.parametrize(
    "field, value",
    [
        ("publish_rate_per_s", 0.0),
        ("publish_rate_per_s", -1.0),
        ("publish_burst", 0),
        ("max_connections_per_worker", 0),
        ("max_connections_per_ip", 0),
        ("idle_timeout_s", 0.0),
        ("connection_rate_per_s", 0.0),
        ("connection_burst", 0),
    ],
)
def test_limit_settings_are_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        Settings(**{field: value})


def test_limit_settings_can_be_turned_off_from_the_environment() -> None:
    s = Settings.load(
        environ={
            "REDWIRE_PUBLISH_RATE_PER_S": "none",
            "REDWIRE_MAX_CONNECTIONS_PER_WORKER": "none",
            "REDWIRE_MAX_CONNECTIONS_PER_IP": "50",
            "REDWIRE_IDLE_TIMEOUT_S": "none",
        }
    )
    assert s.publish_rate_per_s is None and s.max_connections_per_worker is None
    assert s.max_connections_per_ip == 50 and s.idle_timeout_s is None


# --- metrics from the first scrape -----------------------------------------------------------


async def test_a_fresh_app_exports_every_series_at_zero() -> None:
    app = BrokerApp(Settings(redis_url="memory://"), worker_id="w3", bus=MemoryBus("w3"))
    text = app.metrics.render()[0].decode()
    names = series_names()
    assert "redwire_rate_limited_total" in names
    assert "redwire_connections_refused_total" in names
    assert "redwire_idle_closes_total" in names
    lines = text.splitlines()
    for name in names:
        series = [line for line in lines if line.startswith(name + "{")]
        assert any('worker="w3"' in line for line in series), name
        if name != "redwire_bus_healthy":  # the one series that is 1 when all is well
            assert all(line.endswith(" 0.0") for line in series), series
    for reason in ("worker_full", "per_ip", "rate"):
        line = f'redwire_connections_refused_total{{reason="{reason}",worker="w3"}} 0.0'
        assert line in text, reason
    assert 'redwire_rate_limited_total{worker="w3"} 0.0' in text


async def test_refused_connections_are_counted_by_reason() -> None:
    app = BrokerApp(Settings(redis_url="memory://"), worker_id="w4", bus=MemoryBus("w4"))
    app.stats.refused_per_ip += 2
    app.stats.rate_limited += 5
    text = app.metrics.render()[0].decode()
    assert 'redwire_connections_refused_total{reason="per_ip",worker="w4"} 2.0' in text
    assert 'redwire_connections_refused_total{reason="worker_full",worker="w4"} 0.0' in text
    assert 'redwire_rate_limited_total{worker="w4"} 5.0' in text


# --- the per-worker cap and the file descriptors ------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "room", "capped"),
    [
        (10000, 500, 500),  # the default above the room: lowered to it
        (100, 500, 100),  # under the room: kept
        (None, 500, 500),  # no cap asked for: the room is the cap
        (10000, 0, 1),  # no room at all: one, not zero (zero would refuse everyone)
        (10000, None, 10000),  # the limit could not be read: unchanged
    ],
)
def test_connection_cap_fits_the_descriptors(
    wanted: int | None, room: int | None, capped: int, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(max_connections_per_worker=wanted)
    result = cap_connections(settings, room)
    assert result.max_connections_per_worker == capped
    lowered = room is not None and (wanted is None or wanted > max(1, room))
    assert ("capped at" in caplog.text) is lowered
