"""Waiting for state outside our process (Redis, another process' HTTP endpoint).

Inside a test, wait on events and futures. State that only another process holds can only
be polled: `eventually` is the one place that polls, with a deadline and a short interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], *, timeout_s: float = 10.0, interval_s: float = 0.05
) -> T:
    """Await `probe()` until it returns something truthy; TimeoutError past the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s (last: {result!r})")
        await asyncio.sleep(interval_s)  # the polling helper itself: between looks, to a deadline


def eventually_sync(
    probe: Callable[[], T], *, timeout_s: float = 10.0, interval_s: float = 0.05
) -> T:
    """The same for blocking probes."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s (last: {result!r})")
        time.sleep(interval_s)  # the polling helper itself: between looks, to a deadline
