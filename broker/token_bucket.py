"""A token bucket: the rate limits' arithmetic (publishes per connection, upgrades per
worker), with an injected clock and no I/O."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Up to `burst` operations at once, refilled at `rate_per_s`; no I/O, no asyncio.

    `take()` spends one token and returns 0.0, or, when none is left, spends nothing and
    returns the seconds until one will be there. `clock` (seconds, monotonic) is injected
    so tests step time instead of sleeping."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate_per_s")

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> float:
        now = self._clock()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:  # a clock that steps back refills nothing
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate_per_s)
        if self._tokens >= 1.0 - 1e-9:  # float sums of refills may fall a hair short
            self._tokens = max(self._tokens - 1.0, 0.0)
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s

    @property
    def tokens(self) -> float:
        """Tokens left as of the last `take` (for tests and debugging)."""
        return self._tokens
