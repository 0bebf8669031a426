"""Chaos benchmark: delivery guarantees under faults, counted by independent clients.

    python bench/chaos.py                         # every scenario, default durations
    python bench/chaos.py --duration 8            # every scenario, 8 s of publishing each
    python bench/chaos.py --scenarios baseline,redis_kill --json /tmp/chaos.json

Each scenario starts its own redis-server (on a free port; with AOF for `redis_kill_aof`,
behind tests/support/tcp_proxy.py for `redis_stall`) and `redwire serve --workers 2`, runs
plain `websockets` publishers and subscribers (no dedupe) on a history topic and a plain
topic, injects its fault on a timeline and counts, per topic kind: published (acked),
delivered, duplicates, reorders, lost, announced and unannounced losses, deliveries of
publishes refused as `unavailable`, `outcome_unknown` replies. The harness is
tests/support/chaos.py (shared with tests/faults/test_chaos.py); docs/guarantees.md says
what each scenario does and which counts the guarantee allows. Prints one table and writes
JSON (default bench/results/chaos.json). Exit status 1 when a guarantee is violated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.chaos import SCENARIOS, ScenarioResult, guarantee_violations, run_scenario, table

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_SECONDS = 15.0
CHURN_SECONDS = 30.0  # churn runs 30 s unless --duration says otherwise


async def _main(names: list[str], duration: float | None) -> list[ScenarioResult]:
    results = []
    for name in names:
        seconds = duration if duration is not None else (
            CHURN_SECONDS if name == "churn" else DEFAULT_SECONDS)  # fmt: skip
        print(f"running {name} ({SCENARIOS[name].run_seconds(seconds):.0f} s of publishing)",
              file=sys.stderr, flush=True)  # fmt: skip
        results.append(await run_scenario(name, seconds))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from: {', '.join(SCENARIOS)}")  # fmt: skip
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of publishing per scenario (stretched to hold the fault)",
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = parser.parse_args()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    started = time.time()
    results = asyncio.run(_main(names, args.duration))
    rows = [m for r in results for m in r.metrics.values()]
    print(table(rows))
    violations = {r.name: guarantee_violations(r) for r in results}
    for name, bad in violations.items():
        for line in bad:
            print(f"VIOLATION {name}: {line}")
    for r in results:
        for note in r.notes:
            print(f"note {r.name}: {note}")
    out = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "duration_arg": args.duration,
        "scenarios": [r.to_json() | {"violations": violations[r.name]} for r in results],
        "table": table(rows),
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 1 if any(violations.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
