"""Fire-and-forget tasks that are neither garbage-collected mid-flight nor silent on failure.

`asyncio` keeps only a weak reference to a task: one nobody holds can vanish before it ran,
and the exception of one nobody awaits is reported late (at garbage collection) or never.
`spawn` keeps a strong reference until the task is done and logs its exception once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("redwire.tasks")

T = TypeVar("T")

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
    """Run `coro` as a task of the running loop; it is kept alive and its failure logged."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task %s failed", task.get_name(), exc_info=exc)


def running() -> int:
    """How many spawned tasks are not done yet (for tests and stats)."""
    return len(_running)
