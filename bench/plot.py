"""Plots of the side-by-side harness (../shared/bench-peers): Redwire against the best peer.

    pip install -e '.[bench]'                    # matplotlib
    python bench/plot.py                         # every results/*.json of the harness
    python bench/plot.py A.json B.json --out docs/img/harness.png
    python bench/plot.py --all                   # every target, not only the best peer

Reads the harness's results JSON (`{"meta": ..., "runs": [...]}`, one record per run, as
`harness/bench.py` writes them; several files are merged, repeats `S100-R2000#2` fold into
their scenario), takes the median of each (target, scenario) over its runs, and draws, for
every scenario shape (subscribers x topics), two panels against the offered load
(deliveries per second offered: rate x subscribers per message):

  - deliveries per server CPU-second (the harness's `deliv/srvCPU-s`), higher is better;
  - p99 end-to-end latency (ms, log scale), lower is better.

Lines: our broker (`--ours`, the harness `--target` name, `redwire` by default), and for
each shape the best peer there (the highest geometric mean of deliveries per CPU-second over
the shape's scenarios; `raw` is the harness's ceiling, not a peer: drawn dotted with
`--ceiling`). A run flagged NOISY by the harness's own rule (something else was busy) is left
out with `--skip-noisy`. Prints the medians it plotted. Writes one PNG (default
bench/results/harness.png).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HARNESS_RESULTS = Path(__file__).resolve().parents[2] / "shared" / "bench-peers" / "results"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "harness.png"
CEILING = "raw"


def load_runs(paths: list[Path]) -> list[dict]:
    runs: list[dict] = []
    for path in paths:
        data = json.loads(path.read_text())
        for run in data.get("runs", []):
            runs.append(dict(run, source=path.name))
    return runs


def noisy(run: dict) -> bool:
    """The harness's NOISY flag: busy before the run, or much CPU nobody measured used."""
    background = (run.get("background_before") or {}).get("busyPctOfCore", 0) or 0
    other = ((run.get("result") or {}).get("cpu") or {}).get("otherPctOfCore")
    return background > 15 or (other is not None and other > 40)


def point(run: dict) -> dict | None:
    """One run's numbers, or None when it has no delivery result (an error)."""
    result = run.get("result") or {}
    delivery = result.get("delivery")
    cpu = result.get("cpu") or {}
    if not delivery or cpu.get("deliveriesPerServerCpuSecond") is None:
        return None
    topics = run.get("topics") or 1
    offered = delivery.get("offeredRate") or run["rate"] * run["subscribers"] / topics
    return {
        "offered": offered,
        "per_cpu_s": cpu["deliveriesPerServerCpuSecond"],
        "p99_ms": (result.get("latencyMs") or {}).get("p99"),
        "loss_pct": delivery.get("lossPct"),
    }


def medians(runs: list[dict], skip_noisy: bool) -> dict[tuple[str, str], dict]:
    """(target, scenario) -> medians of its runs, with the scenario's shape."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    shapes: dict[str, tuple[int, int]] = {}
    for run in runs:
        if skip_noisy and noisy(run):
            continue
        p = point(run)
        if p is None:
            continue
        scenario = run["scenario"].split("#")[0].split("@")[0]
        shapes[scenario] = (run["subscribers"], run.get("topics") or 1)
        groups[(run["target"], scenario)].append(p)
    out: dict[tuple[str, str], dict] = {}
    for (target, scenario), points in groups.items():
        row: dict = {"runs": len(points), "shape": shapes[scenario]}
        for key in ("offered", "per_cpu_s", "p99_ms", "loss_pct"):
            values = [p[key] for p in points if p[key] is not None]
            row[key] = statistics.median(values) if values else None
        out[(target, scenario)] = row
    return out


def shape_label(shape: tuple[int, int]) -> str:
    subscribers, topics = shape
    return f"{subscribers} subscribers" + (f" over {topics} topics" if topics > 1 else ", 1 topic")


def best_peer(table: dict[tuple[str, str], dict], scenarios: list[str], ours: str) -> str | None:
    """The peer with the highest geometric mean of deliveries per CPU-second over these
    scenarios (only peers that ran all of them, if any did)."""
    peers = {t for (t, s) in table if s in scenarios and t not in (ours, CEILING)}
    full = [p for p in peers if all((p, s) in table for s in scenarios)]
    candidates = full or sorted(peers)

    def score(peer: str) -> float:
        values = [table[(peer, s)]["per_cpu_s"] for s in scenarios if (peer, s) in table]
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 0.0

    return max(sorted(candidates), key=score) if candidates else None


def plot(table: dict, ours: str, out: Path, show_all: bool, ceiling: bool) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, LogFormatter, LogLocator

    by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
    for (_, scenario), row in table.items():
        if scenario not in by_shape[row["shape"]]:
            by_shape[row["shape"]].append(scenario)
    shapes = sorted(by_shape)
    fig, axes = plt.subplots(
        2, len(shapes), figsize=(4.6 * len(shapes), 7.2), squeeze=False, constrained_layout=True
    )
    notes: list[str] = []
    for col, shape in enumerate(shapes):
        scenarios = by_shape[shape]
        targets: list[tuple[str, str, dict]] = []  # (target, label, style)
        if any((ours, s) in table for s in scenarios):
            targets.append((ours, ours, {"color": "C3", "lw": 2.4, "marker": "o"}))
        else:
            notes.append(f"{shape_label(shape)}: no {ours!r} runs")
        if show_all:
            others = sorted({t for (t, s) in table if s in scenarios} - {ours, CEILING})
            for k, target in enumerate(others):
                targets.append((target, target, {"color": f"C{k % 3}", "marker": "s", "ls": "--"}))
        else:
            peer = best_peer(table, scenarios, ours)
            if peer is not None:
                style = {"color": "C0", "marker": "s", "ls": "--"}
                targets.append((peer, f"best peer: {peer}", style))
        if ceiling and any((CEILING, s) in table for s in scenarios):
            targets.append((CEILING, "raw (ceiling)", {"color": "0.5", "marker": "^", "ls": ":"}))
        top, bottom = axes[0][col], axes[1][col]
        for target, label, style in targets:
            rows = sorted(
                (table[(target, s)] | {"scenario": s} for s in scenarios if (target, s) in table),
                key=lambda r: r["offered"],
            )
            xs = [r["offered"] for r in rows]
            top.plot(xs, [r["per_cpu_s"] for r in rows], label=label, **style)
            lat = [(r["offered"], r["p99_ms"]) for r in rows if r["p99_ms"]]
            if lat:
                bottom.plot(*zip(*lat, strict=True), label=label, **style)
            for r in rows:
                if r["loss_pct"]:  # name the loss: "fast" at a loss is not fast
                    top.annotate(
                        f"{r['loss_pct']:.0f}% loss", (r["offered"], r["per_cpu_s"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=style["color"],
                    )  # fmt: skip
        names = ", ".join(sorted(scenarios, key=lambda s: table_offered(table, s)))
        top.set_title(f"{shape_label(shape)}\n({names})", fontsize=9)
        top.set_ylabel("deliveries per server CPU-second")
        bottom.set_ylabel("p99 latency (ms)")
        bottom.set_yscale("log")
        top.yaxis.set_major_formatter(EngFormatter(sep=""))
        bottom.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        bottom.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.xaxis.set_minor_formatter(EngFormatter(sep=""))
            ax.set_xlabel("offered load (deliveries/s)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        highest = max((line.get_ydata().max() for line in top.get_lines()), default=0)
        top.set_ylim(0, highest * 1.2 or None)  # from 0, with room above the highest point
    fig.suptitle("bench-peers harness: medians per scenario", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return notes


def table_offered(table: dict, scenario: str) -> float:
    return min(r["offered"] for (_, s), r in table.items() if s == scenario)


def print_table(table: dict) -> None:
    print(f"{'target':<14} {'scenario':<14} {'runs':>4} {'offered/s':>11} {'deliv/CPU-s':>12} "
          f"{'p99 ms':>8} {'loss%':>6}")  # fmt: skip
    for (target, scenario), r in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
        loss = f"{r['loss_pct']:.2f}" if r["loss_pct"] is not None else "-"
        print(f"{target:<14} {scenario:<14} {r['runs']:>4} {r['offered']:>11,.0f} "
              f"{r['per_cpu_s']:>12,.0f} {p99:>8} {loss:>6}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help=f"default: {HARNESS_RESULTS}/*.json")
    parser.add_argument("--ours", default="redwire", help="our target's name in the harness")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--all", action="store_true", help="every peer, not only the best")
    parser.add_argument("--ceiling", action="store_true", help="draw the raw ceiling too")
    parser.add_argument("--skip-noisy", action="store_true", help="leave NOISY runs out")
    args = parser.parse_args()
    files = args.files or sorted(HARNESS_RESULTS.glob("*.json"))
    if not files:
        sys.exit(f"no harness results: none given and none in {HARNESS_RESULTS}")
    table = medians(load_runs(files), args.skip_noisy)
    if not table:
        sys.exit("no run with a delivery result in " + ", ".join(map(str, files)))
    print_table(table)
    for note in plot(table, args.ours, args.out, args.all, args.ceiling):
        print(f"note: {note}", file=sys.stderr)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
