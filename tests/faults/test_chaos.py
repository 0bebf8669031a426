"""The chaos suite, pass/fail: the delivery guarantee of docs/guarantees.md, one test per
scenario, counted by independent `websockets` clients (tests/support/chaos.py; the same
harness prints the table in bench/chaos.py).

Each test runs its own Redis and `redwire serve --workers 2`, publishes on a history topic and
a plain topic for a few seconds (longer when the fault needs it) and asserts, from counts only:
0 duplicates and 0 reorders on the history topic, no history loss where history keeps the
messages, 0 unannounced losses on either topic, 0 deliveries of publishes refused as
`unavailable`; plus what the scenario itself promises (nothing lost across an AOF restart,
close 1013 for the stalled reader and no loss for the others, every ack before a drain
delivered). A failure prints the scenario's metrics table.
"""

from __future__ import annotations

from support.chaos import guarantee_violations, report, run_scenario

# Seconds of publishing per scenario (a fault's duration stretches it: redis_pause to 8 s,
# redis_stall to 11 s). Short, because the verdicts are counts, not rates.
SECONDS = 4.0
SETTLE_S = 4.0  # the longest wait for subscribers to catch up after publishing (a bound)


async def _check(name: str, seconds: float = SECONDS) -> None:
    result = await run_scenario(name, seconds, settle_s=SETTLE_S)
    violations = guarantee_violations(result)
    assert not violations, f"{name}: " + "; ".join(violations) + "\n" + report(result)


async def test_baseline() -> None:
    """No fault: nothing lost, duplicated or reordered on either topic."""
    await _check("baseline", 3.0)


async def test_subscribe_while_live() -> None:
    """150 subscribes with `since` at 1000 msg/s while others are live: each gets exactly the
    messages after its `since`, once, in order."""
    await _check("subscribe_live")


async def test_churn() -> None:
    """200 clients reconnecting and resubscribing 50 times a second: no duplicate on history,
    plain-topic losses only inside a client's own reconnect."""
    await _check("churn", 6.0)


async def test_worker_killed() -> None:
    """kill -9 of a worker: its clients reconnect; history subscribers recover everything."""
    await _check("kill_worker")


async def test_redis_killed_without_persistence() -> None:
    """Redis killed and restarted empty: the epoch ends, the loss is announced, the new
    epoch's messages arrive."""
    await _check("redis_kill")


async def test_redis_killed_with_aof() -> None:
    """Redis killed and restarted with AOF: history and epoch intact, nothing lost."""
    await _check("redis_kill_aof")


async def test_redis_paused() -> None:
    """Redis SIGSTOPped 5 s: publishes fail honestly (`unavailable` only if not published),
    every loss announced."""
    await _check("redis_pause")


async def test_redis_traffic_stalled() -> None:
    """Worker-Redis traffic stalled 8 s with sockets open: the same as a pause, seen from the
    network."""
    await _check("redis_stall")


async def test_slow_consumer() -> None:
    """A subscriber that stops reading gets close 1013; the others lose nothing."""
    await _check("slow_consumer")


async def test_sigterm_drain() -> None:
    """A worker drained by SIGTERM: every publish acked before it is delivered; clients move
    to the other worker."""
    await _check("drain")
