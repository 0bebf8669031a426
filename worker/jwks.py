"""Keep the worker's JWKS (setting `jwt_jwks`: a file, or an http(s):// URL) loaded.

The verifier (broker/auth.py) holds keys and never does I/O; this task reads the document
off the event loop (a thread), bounded by `jwt_jwks_timeout_s` and `jwt_jwks_max_bytes`,
and hands it over. It loads once at start, then again every `jwt_jwks_refresh_s`; a failed
load keeps the keys already there and is retried sooner (`min(jwt_jwks_refresh_s, 10 s)`).
Until a first load succeeds, tokens needing the JWKS are refused with 503 (try again).

A token naming a `kid` we do not hold (a key rotated in since the last load) asks for a
load now (`load_for_unknown_kid`): at most one load starts per `jwt_jwks_min_refresh_s`,
whatever starts it, and the callers waiting meanwhile share it, so tokens with made-up kids
cost the identity provider one fetch per interval per worker, never one per upgrade.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.request
from collections.abc import Callable

from broker.auth import TokenVerifier
from broker.settings import Settings, mask_url
from broker.tasks import spawn

log = logging.getLogger("redwire.jwks")
RETRY_AFTER_FAILURE_S = 10.0


def read_document(source: str, *, timeout_s: float, max_bytes: int) -> bytes:
    """The JWKS bytes at `source` (blocking: run it in a thread). ValueError past max_bytes,
    OSError when it cannot be read."""
    if source.startswith(("https://", "http://")):
        request = urllib.request.Request(
            source, headers={"Accept": "application/json", "User-Agent": "redwire"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
    else:
        with open(source, "rb") as fh:
            data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"the JWKS is larger than jwt_jwks_max_bytes ({max_bytes})")
    return data


class JwksRefresher:
    """Loads `settings.jwt_jwks` into `verifier` now and then (see the module docstring)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert settings.jwt_jwks
        self._clock = clock
        self.verifier = verifier
        self.source = settings.jwt_jwks
        self.settings = settings
        self.loads = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._load_started = -math.inf  # `clock()` when the last load started
        self._on_demand: asyncio.Task[bool] | None = None  # a load for an unknown kid

    async def start(self) -> None:
        await self.load_once()
        self._task = spawn(self._run(), name="jwks")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._on_demand is not None:
            self._on_demand.cancel()
            self._on_demand = None

    async def load_for_unknown_kid(self) -> bool:
        """Load now for a token whose `kid` we lack, unless a load started less than
        `jwt_jwks_min_refresh_s` ago (then False at once); callers meanwhile wait for the
        same load. True when a load ran and worked: check the token again."""
        task = self._on_demand
        if task is None or task.done():
            if self._clock() - self._load_started < self.settings.jwt_jwks_min_refresh_s:
                return False
            task = self._on_demand = spawn(self.load_once(), name="jwks-kid")
        # shielded: a caller that gives up (its upgrade timed out) leaves the load running
        return await asyncio.shield(task)

    async def load_once(self) -> bool:
        s = self.settings
        self._load_started = self._clock()
        try:
            async with asyncio.timeout(s.jwt_jwks_timeout_s + 1.0):
                data = await asyncio.to_thread(
                    read_document,
                    self.source,
                    timeout_s=s.jwt_jwks_timeout_s,
                    max_bytes=s.jwt_jwks_max_bytes,
                )
            count = self.verifier.set_jwks(data)
        except (OSError, ValueError, TimeoutError) as exc:
            self.failures += 1
            log.warning("JWKS %s not loaded (keeping the keys we have): %s", self._shown, exc)
            return False
        self.loads += 1
        log.info("JWKS %s loaded: %d key(s)", self._shown, count)
        return True

    @property
    def _shown(self) -> str:
        return mask_url(self.source) if "://" in self.source else self.source

    async def _run(self) -> None:
        ok = True
        while True:
            refresh_s = self.settings.jwt_jwks_refresh_s
            # The reload interval (or a sooner retry after a failure) is the point here.
            await asyncio.sleep(refresh_s if ok else min(refresh_s, RETRY_AFTER_FAILURE_S))
            ok = await self.load_once()
