"""Run one fuzz target for N seconds: `python -m tests.fuzz.run --target frames --seconds 30`.

With atheris installed (the `test` extra on Linux x86-64) this is coverage-guided libFuzzer:
the product modules (`broker`, `worker`) are instrumented as they are imported, the run
starts from the committed seed corpus (tests/fuzz/corpus/<target>/, never written to:
new inputs go to `--scratch`) and stops after `-max_total_time`. Without atheris,
hypothesis draws inputs instead: the seeds, mutations of them, and plain random bytes.

Exit status 0: no finding. Anything else: a finding; its input is written to the
artifacts directory as `crash-<sha1>` (atheris) or `finding-<sha1>` (hypothesis) and its
traceback goes to stderr. Replay inputs in-process, traceback and all, with
`python -m tests.fuzz.run --target frames FILE...`. Arguments after `--` go to libFuzzer.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"
NAMES = ("frames", "handshake", "deflate", "wire", "session")
MAX_LEN = 4096  # longest input tried: every bound in targets.py is reached well below it
RSS_LIMIT_MB = 1536  # libFuzzer fails the run past this (unbounded allocation)
TARGETS = "tests.fuzz.targets"
DEFAULT_OUT = Path(tempfile.gettempdir()) / "redwire-fuzz"


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__)
    parser.add_argument("--target", required=True, choices=NAMES)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to fuzz")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_OUT, help="where findings go")
    parser.add_argument(
        "--scratch", type=Path, help="where new inputs go (default: ARTIFACTS/corpus-TARGET)"
    )
    parser.add_argument("--corpus", type=Path, help="seed directory (default: the committed)")
    parser.add_argument("--max-len", type=int, default=MAX_LEN)
    parser.add_argument("replay", nargs="*", type=Path, help="inputs to replay instead")
    return parser.parse_args(argv), extra


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _load_target(name: str, *, instrument: bool) -> Callable[[bytes], None]:
    if instrument:
        import atheris

        # String comparisons guide the mutator (header names, tokens). atheris's "RegEx"
        # hook is not enabled: its pattern proxy lacks `match(string, pos)`, which
        # broker/deflate.py uses, and it fails on some libraries' bytes patterns.
        atheris.enabled_hooks.add("str")
        with atheris.instrument_imports(include=["broker", "worker", "tests.fuzz", "jwt"]):
            targets = importlib.import_module(TARGETS)
    else:
        targets = importlib.import_module(TARGETS)
    return targets.TARGETS[name]


def replay(target: Callable[[bytes], None], paths: list[Path]) -> int:
    failed = 0
    for path in paths:
        try:
            target(path.read_bytes())
        except Exception:
            failed += 1
            print(f"FINDING {path}", file=sys.stderr)
            traceback.print_exc()
        else:
            print(f"ok {path}")
    return 1 if failed else 0


def run_atheris(
    target: Callable[[bytes], None],
    seeds: Path,
    seconds: float,
    artifacts: Path,
    scratch: Path,
    max_len: int,
    extra: list[str],
) -> None:
    import atheris

    scratch.mkdir(parents=True, exist_ok=True)  # new units go here, never to the seeds
    args = [
        sys.argv[0],
        f"-max_total_time={max(1, int(seconds))}",
        f"-artifact_prefix={artifacts.resolve()}/",
        f"-max_len={max_len}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        "-timeout=300",  # per input: a hang guard only, never hit on a loaded machine
        "-print_final_stats=1",
        *extra,
        str(scratch),
        str(seeds),
    ]
    atheris.Setup(args, target)
    atheris.Fuzz()  # exits the process: 0 when the time is up, non-zero on a finding


def _mutate(seed: bytes, rnd: random.Random, max_len: int) -> bytes:
    """A few libFuzzer-like edits: flip, overwrite, insert, delete, duplicate a slice."""
    data = bytearray(seed)
    for _ in range(rnd.randint(1, 8)):
        pos = rnd.randint(0, len(data))
        op = rnd.randrange(5)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rnd.randrange(8)
        elif op == 1 and data:
            data[min(pos, len(data) - 1)] = rnd.choice((0, 0x7F, 0x80, 0xFF, rnd.randrange(256)))
        elif op == 2:
            data[pos:pos] = rnd.randbytes(rnd.randint(1, 8))
        elif op == 3:
            del data[pos : pos + rnd.randint(1, 8)]
        else:
            data[pos:pos] = data[pos : pos + rnd.randint(1, 64)]
    return bytes(data[:max_len])


def run_hypothesis(
    target: Callable[[bytes], None], seeds: Path, seconds: float, artifacts: Path, max_len: int
) -> int:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    corpus = sorted(p.read_bytes() for p in seeds.iterdir() if p.is_file()) or [b""]
    last: list[bytes] = [b""]
    inputs = st.one_of(
        st.sampled_from(corpus),
        st.builds(
            _mutate, st.sampled_from(corpus), st.randoms(use_true_random=False), st.just(max_len)
        ),
        st.binary(max_size=max_len),
    )

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def once(data: bytes) -> None:
        last[0] = data
        target(data)

    runs = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            once()
        except Exception:
            data = last[0]  # hypothesis replays the shrunk input last, then raises
            path = artifacts / f"finding-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            traceback.print_exc()
            print(f"FINDING: input written to {path}", file=sys.stderr)
            return 1
        runs += 1
    print(f"hypothesis: {runs} batches of 300 inputs, no finding")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    seeds = args.corpus or CORPUS / args.target
    if args.replay:
        return replay(_load_target(args.target, instrument=False), args.replay)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _atheris_available() else "hypothesis"
    args.artifacts.mkdir(parents=True, exist_ok=True)
    scratch = args.scratch or args.artifacts / f"corpus-{args.target}"
    print(
        f"fuzzing {args.target} for {args.seconds:g} s with {engine}; findings go to "
        f"{args.artifacts}, new inputs to {scratch}",
        flush=True,
    )
    target = _load_target(args.target, instrument=engine == "atheris")
    if engine == "atheris":
        run_atheris(target, seeds, args.seconds, args.artifacts, scratch, args.max_len, extra)
        return 0  # not reached: libFuzzer exits the process
    return run_hypothesis(target, seeds, args.seconds, args.artifacts, args.max_len)


if __name__ == "__main__":
    sys.exit(main())
