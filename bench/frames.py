"""Frame codec throughput: Redwire's `broker.frames` against the `websockets` library's codec.

Run: `python bench/frames.py [--json] [--quick]`.

For each payload size (64 B, 4 KiB, 64 KiB, 1 MiB) two operations are timed, for both codecs in
the same process and run:

- parse+unmask: the server side of a connection. A batch of client frames (BINARY, masked with a
  fresh random key each, as RFC 6455 section 5.3 requires) is serialized once, up front, and cut
  into recv-sized chunks (`--chunk-bytes`, default 256 KiB, asyncio's read size). Timed: feeding
  every chunk to a fresh server-role parser and collecting every frame, payload unmasked.
  Ours: `FrameParser(mask_required=True).feed(chunk)`. Theirs: `websockets.frames.Frame.parse`
  driven by a `websockets.streams.StreamReader`, exactly as `websockets.protocol.Protocol` drives
  it (`reader.feed_data(chunk)` then `next(parser)`), minus the protocol's message-level work.
- serialize: the server sending. Timed: building unmasked BINARY frames from a payload.
  Ours: `serialize_frame(BINARY, payload)`. Theirs: `Frame(BINARY, payload).serialize(mask=False)`.

Both codecs unmask in C: ours with `broker._speedups`, theirs with `websockets.speedups`; the
script refuses to run if either is missing. Each batch holds about `--batch-bytes` of payload
(4 MiB, at least 8 frames); a measurement is a number of passes over the batch lasting at least
`--min-time`; the best of `--repeats` measurements is kept, with the two codecs alternating so
that drift in the machine's speed hits both. The garbage collector is off while timing, as in
`timeit`. MB/s counts payload bytes (1 MB = 10**6 bytes); `ratio` is ours / theirs (above 1:
ours is faster). Rows go to stdout as a table (or JSON with `--json`) and to
bench/results/frames.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import websockets
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode
from websockets.streams import StreamReader

from broker import masking
from broker.frames import FrameParser, Opcode, serialize_frame

KIB = 1024
MIB = 1024 * KIB
SIZES = [64, 4 * KIB, 64 * KIB, 1 * MIB]
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "frames.json"
OURS = "redwire"
THEIRS = "websockets"


def check_speedups() -> list[str]:
    """Both codecs must unmask in C, or the comparison says nothing; say which are used."""
    import websockets.frames as ws_frames

    try:
        import websockets.speedups as ws_speedups
    except ImportError:
        sys.exit("websockets.speedups does not import: the comparison would be unfair")
    if ws_frames.apply_mask is not ws_speedups.apply_mask:
        sys.exit("websockets.frames does not use websockets.speedups.apply_mask")
    if masking.apply_mask_c is None or masking.apply_mask is not masking.apply_mask_c:
        sys.exit("broker._speedups is not built: run `pip install -e .` with a C compiler")
    return [
        f"python {platform.python_version()} ({platform.python_implementation()})",
        f"redwire masking: broker._speedups.apply_mask (C) from {masking.apply_mask_c.__module__}",
        f"websockets {websockets.__version__} masking: websockets.speedups.apply_mask (C) "
        f"from {ws_speedups.__file__}",
    ]


# --- the operations -----------------------------------------------------------------------


def client_batch(size: int, count: int, chunk_bytes: int) -> tuple[bytes, list[bytes]]:
    """`count` masked client frames of `size` bytes: the payload and the stream's chunks."""
    payload = bytes(i * 31 % 256 for i in range(size))
    stream = b"".join(serialize_frame(Opcode.BINARY, payload, mask=True) for _ in range(count))
    view = memoryview(stream)
    chunks = [bytes(view[i : i + chunk_bytes]) for i in range(0, len(stream), chunk_bytes)]
    return payload, chunks


def parse_ours(chunks: list[bytes], max_size: int) -> int:
    parser = FrameParser(mask_required=True, max_payload_bytes=max_size)
    feed = parser.feed
    count = 0
    for chunk in chunks:
        count += len(feed(chunk))
    return count


def _ws_frames(reader: StreamReader, max_size: int, out: list[WsFrame]) -> Generator[None]:
    # websockets.protocol.Protocol.parse, reduced to the frame loop.
    read_exact = reader.read_exact
    while True:
        frame = yield from WsFrame.parse(read_exact, mask=True, max_size=max_size, extensions=[])
        out.append(frame)


def parse_theirs(chunks: list[bytes], max_size: int) -> int:
    reader = StreamReader()
    frames: list[WsFrame] = []
    parser = _ws_frames(reader, max_size, frames)
    next(parser)
    count = 0
    for chunk in chunks:
        reader.feed_data(chunk)  # Protocol.receive_data()
        next(parser)
        count += len(frames)
        frames.clear()
    return count


def serialize_ours(payload: bytes, count: int) -> int:
    binary = Opcode.BINARY
    for _ in range(count):
        serialize_frame(binary, payload)
    return count


def serialize_theirs(payload: bytes, count: int) -> int:
    binary = WsOpcode.BINARY
    for _ in range(count):
        WsFrame(binary, payload).serialize(mask=False)
    return count


def check_correct(payload: bytes, chunks: list[bytes], count: int) -> None:
    """Both codecs must produce the same, right answer before their speed means anything."""
    ours: list[Any] = []
    parser = FrameParser(mask_required=True, max_payload_bytes=len(payload))
    for chunk in chunks:
        ours += parser.feed(chunk)
    theirs: list[WsFrame] = []
    reader = StreamReader()
    gen = _ws_frames(reader, len(payload), theirs)
    next(gen)
    for chunk in chunks:
        reader.feed_data(chunk)
        next(gen)
    assert len(ours) == len(theirs) == count
    assert all(f.payload == payload for f in ours)
    assert all(f.data == payload for f in theirs)
    ours_out = serialize_frame(Opcode.BINARY, payload)
    assert ours_out == WsFrame(WsOpcode.BINARY, payload).serialize(mask=False)


# --- timing -------------------------------------------------------------------------------


def time_once(fn: Callable[[], int], passes: int) -> float:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(passes):
            fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def passes_for(fn: Callable[[], int], min_time_s: float) -> int:
    """Like `timeit.Timer.autorange`: the number of passes that lasts at least `min_time_s`."""
    passes = 1
    while True:
        if time_once(fn, passes) >= min_time_s:
            return passes
        passes *= 2


def best_times(
    impls: dict[str, Callable[[], int]], repeats: int, min_time_s: float
) -> dict[str, float]:
    """Best seconds per pass for each implementation, alternating which one runs first."""
    passes = {name: passes_for(fn, min_time_s) for name, fn in impls.items()}
    best = dict.fromkeys(impls, float("inf"))
    names = list(impls)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            best[name] = min(best[name], time_once(impls[name], passes[name]) / passes[name])
    return best


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        count = max(args.min_frames, args.batch_bytes // size)
        payload, chunks = client_batch(size, count, args.chunk_bytes)
        check_correct(payload, chunks, count)
        ops: dict[str, dict[str, Callable[[], int]]] = {
            "parse+unmask": {
                OURS: lambda c=chunks, s=size: parse_ours(c, s),
                THEIRS: lambda c=chunks, s=size: parse_theirs(c, s),
            },
            "serialize": {
                OURS: lambda p=payload, n=count: serialize_ours(p, n),
                THEIRS: lambda p=payload, n=count: serialize_theirs(p, n),
            },
        }
        for op, impls in ops.items():
            best = best_times(impls, args.repeats, args.min_time)
            for impl in (OURS, THEIRS):
                seconds = best[impl]
                rows.append(
                    {
                        "op": op,
                        "size_bytes": size,
                        "impl": impl,
                        "mb_per_s": round(size * count / seconds / 1e6, 1),
                        "frames_per_s": round(count / seconds),
                        "ratio": round(best[THEIRS] / best[OURS], 2) if impl == OURS else None,
                    }
                )
    return rows


# --- output -------------------------------------------------------------------------------


def human_size(n: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("op", "size", "impl", "MB/s", "frames/s", "ours/theirs")
    lines = [
        (
            r["op"],
            human_size(r["size_bytes"]),
            r["impl"],
            f"{r['mb_per_s']:,.1f}",
            f"{r['frames_per_s']:,}",
            "" if r["ratio"] is None else f"{r['ratio']:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    left = {0, 2}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [fmt(head), "  ".join("-" * w for w in widths)]
    for i, line in enumerate(lines):
        if i and i % 2 == 0:
            out.append("")
        out.append(fmt(line))
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    p.add_argument("--repeats", type=int, help="measurements per row; the best is kept")
    p.add_argument("--min-time", type=float, help="seconds one measurement lasts at least")
    p.add_argument("--batch-bytes", type=int, help="payload bytes per batch of frames")
    p.add_argument("--min-frames", type=int, default=8, help="frames per batch at least")
    p.add_argument("--chunk-bytes", type=int, default=256 * KIB, help="bytes per parser feed")
    args = p.parse_args(argv)
    quick = args.quick
    if args.repeats is None:
        args.repeats = 3 if quick else 7
    if args.min_time is None:
        args.min_time = 0.02 if quick else 0.1
    if args.batch_bytes is None:
        args.batch_bytes = 1 * MIB if quick else 4 * MIB
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = check_speedups()
    info.append(
        f"batch {human_size(args.batch_bytes)} (>= {args.min_frames} frames), "
        f"feeds of {human_size(args.chunk_bytes)}, best of {args.repeats} runs "
        f">= {args.min_time} s each"
    )
    for line in info:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)
    rows = run(args)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(rows, indent=2) + "\n")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print()
        print(table(rows))
        print(f"\nwritten to {RESULTS_PATH}")


if __name__ == "__main__":
    main()
