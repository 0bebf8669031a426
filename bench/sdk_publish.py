"""SDK publish throughput: the Python Publisher straight into Redis, batched and not.

    python bench/sdk_publish.py [--count 20000] [--json]

Runs against a private redis-server. Rows: the asyncio `AsyncPublisher` awaiting each
publish (unbatched) and `publish_many` (pipelined batches); the blocking `Publisher` with
`publish` (one round trip each) and `publish_nowait` + `flush` (batched); each on a plain
topic and on a topic with history (offsets assigned by the server-side script).
Prints msgs/s per row; `--json` prints the rows as JSON (also bench/results/sdk_publish.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import RedisServer

from broker.settings import Settings, TopicRule
from client.publisher import AsyncPublisher, Publisher


def settings_for(history: bool) -> Settings:
    rules = (TopicRule(pattern="hist.*", history_size=100_000),) if history else ()
    return Settings(topics=rules, channel_prefix="sdkbench:")


async def async_rows(url: str, count: int, topic: str, history: bool) -> list[dict]:
    rows = []
    async with AsyncPublisher(url, settings=settings_for(history)) as pub:
        n = max(1, count // 10)
        start = time.perf_counter()
        for i in range(n):
            await pub.publish(topic, {"i": i})
        rows.append(_row("AsyncPublisher.publish (unbatched)", topic, n, start))
        start = time.perf_counter()
        for first in range(0, count, 1000):
            await pub.publish_many((topic, {"i": i}) for i in range(first, first + 1000))
        rows.append(_row("AsyncPublisher.publish_many (batched)", topic, count, start))
    return rows


def sync_rows(url: str, count: int, topic: str, history: bool) -> list[dict]:
    rows = []
    with Publisher(url, settings=settings_for(history)) as pub:
        n = max(1, count // 10)
        start = time.perf_counter()
        for i in range(n):
            pub.publish(topic, {"i": i})
        rows.append(_row("Publisher.publish (unbatched)", topic, n, start))
        start = time.perf_counter()
        for i in range(count):
            pub.publish_nowait(topic, {"i": i})
        pub.flush()
        rows.append(_row("Publisher.publish_nowait + flush (batched)", topic, count, start))
    return rows


def _row(name: str, topic: str, count: int, start: float) -> dict:
    elapsed = time.perf_counter() - start
    return {
        "api": name,
        "history": topic.startswith("hist."),
        "messages": count,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(count / elapsed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    redis = RedisServer()
    try:
        rows: list[dict] = []
        for topic, history in (("plain.t", False), ("hist.t", True)):
            rows += asyncio.run(async_rows(redis.url, args.count, topic, history))
            rows += sync_rows(redis.url, args.count, topic, history)
    finally:
        redis.stop()
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "sdk_publish.json").write_text(json.dumps(rows, indent=2))
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'api':<44} {'history':>7} {'messages':>9} {'msgs/s':>9}")
    for r in rows:
        print(f"{r['api']:<44} {r['history']!s:>7} {r['messages']:>9} {r['msgs_per_s']:>9,}")


if __name__ == "__main__":
    main()
