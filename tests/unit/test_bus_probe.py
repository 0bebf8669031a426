"""RedisBus' liveness probe, by itself: wedged only when nothing at all is read.

The probe is published on the bus' own publisher (here a stand-in that says one subscriber
got it) and comes back on the subscription, behind whatever the subscription still has to
deliver. A reader that keeps reading replies is behind, not wedged, however late the probe
comes back; a reader that reads nothing for a whole probe timeout is wedged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from broker.bus.redis import RedisBus, _SubscriptionWedged
from broker.settings import Settings

TIMEOUT_S = 0.5


def bus() -> RedisBus:
    b = RedisBus("redis://127.0.0.1:1/0", Settings(bus_probe_timeout_s=TIMEOUT_S), "w-probe")

    async def one_receiver(*args: Any) -> int:
        return 1  # Redis says the probe channel has a subscriber

    b._publisher.send = one_receiver  # type: ignore[method-assign]
    return b


async def test_a_reader_behind_but_reading_is_not_wedged() -> None:
    b = bus()
    probing = asyncio.ensure_future(b._probe())
    # Replies keep being read for three probe timeouts (the backlog), then the probe is back.
    end = time.monotonic() + 3 * TIMEOUT_S
    while time.monotonic() < end:
        b._last_rx = time.monotonic()
        await asyncio.sleep(TIMEOUT_S / 5)  # the behaviour under test: replies read over time
    assert not probing.done()
    b._probe_arrived(b._probe_nonce)
    await asyncio.wait_for(probing, 5)  # no _SubscriptionWedged
    assert b.last_probe_rtt_s >= 3 * TIMEOUT_S


async def test_nothing_read_for_a_timeout_is_wedged() -> None:
    b = bus()
    with pytest.raises(_SubscriptionWedged):
        await asyncio.wait_for(b._probe(), 5)


async def test_reading_that_stops_is_wedged_a_timeout_later() -> None:
    b = bus()
    probing = asyncio.ensure_future(b._probe())
    for _ in range(4):
        b._last_rx = time.monotonic()
        await asyncio.sleep(TIMEOUT_S / 5)  # the behaviour under test: replies read over time
    last_read = b._last_rx
    with pytest.raises(_SubscriptionWedged):
        await asyncio.wait_for(probing, 5)
    # Not before a whole timeout after the last read (load can only make it later).
    assert time.monotonic() - last_read >= TIMEOUT_S * 0.9
