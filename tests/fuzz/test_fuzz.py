"""The fuzz harness in CI: every seed through every target in-process (fast, no atheris
needed), each target fuzzed in a subprocess for its share of REDWIRE_FUZZ_SECONDS (60 s in
all by default), and checks that the harness itself catches what it is meant to.

A fuzz run passes when it ends without a finding, however many inputs a loaded machine let
it try: nothing here depends on speed. A finding fails the test with the input's path,
its base64 and the traceback; replay it with `python -m tests.fuzz.run --target T PATH`.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest

from broker.deflate import DeflateParams, PerMessageDeflate
from broker.errors import PayloadTooBig
from fuzz import run, seeds, targets

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).parent / "corpus"
SEED_FILES = sorted(p for p in CORPUS.rglob("*") if p.is_file())
TOTAL_S = float(os.environ.get("REDWIRE_FUZZ_SECONDS", "60"))
SHARE_S = TOTAL_S / len(targets.TARGETS)


def test_corpus_is_small_and_covers_every_target() -> None:
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(targets.TARGETS)
    for name in targets.TARGETS:
        assert any((CORPUS / name).iterdir()), f"no seeds for {name}"
    assert sum(p.stat().st_size for p in SEED_FILES) < 200_000


def test_seed_generator_matches_the_committed_corpus() -> None:
    for name, make in seeds.GENERATORS.items():
        for seed, data in make().items():
            path = CORPUS / name / seed
            assert path.is_file() and path.read_bytes() == data, (
                f"{path} differs from tests/fuzz/seeds.py: run `python -m tests.fuzz.seeds`"
            )


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
@pytest.mark.parametrize("seed", SEED_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_seed_replays_cleanly(name: str, seed: Path) -> None:
    """Every corpus file through every target (another target's seeds are odd inputs)."""
    targets.TARGETS[name](seed.read_bytes())


def _report(name: str, proc: subprocess.CompletedProcess[str], artifacts: Path) -> str:
    lines = [f"fuzz target {name!r} found something (exit status {proc.returncode})"]
    for path in sorted(p for p in artifacts.glob("*") if p.is_file()):
        data = path.read_bytes()
        lines.append(f"input: {path} ({len(data)} bytes)")
        lines.append(f"  base64: {base64.b64encode(data[:4096]).decode()}")
        lines.append(f"  replay: python -m tests.fuzz.run --target {name} {path}")
    output = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if not line.startswith(("INFO: Instrumenting", "#"))
    ]
    lines.append("output (tail):")
    lines.extend(output[-80:])
    return "\n".join(lines)


@pytest.mark.timeout(int(SHARE_S * 4) + 240)
@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_fuzz_target_finds_nothing(name: str, tmp_path: Path) -> None:
    artifacts = tmp_path / "findings"
    command = [sys.executable, "-m", "tests.fuzz.run", "--target", name]
    command += ["--seconds", f"{SHARE_S:g}", "--artifacts", str(artifacts)]
    command += ["--scratch", str(tmp_path / "new-inputs")]
    proc = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SHARE_S * 4 + 180,  # a hang guard; libFuzzer stops itself on time
    )
    assert proc.returncode == 0, _report(name, proc, artifacts)
    assert not any(artifacts.glob("*")), _report(name, proc, artifacts)
    out = proc.stdout + proc.stderr
    assert "Done " in out or "no finding" in out, _report(name, proc, artifacts)


# --- the harness catches what it should --------------------------------------------------


def test_deflate_bomb_stops_at_the_limit_without_allocating_it() -> None:
    """A 64 MiB bomb (~64 KiB on the wire) against a 1 MiB limit: PayloadTooBig, and the
    peak allocation stays near the limit, not the bomb's size."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(b"\x00" * (64 << 20)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    inflater = PerMessageDeflate(
        DeflateParams(client_no_context_takeover=True),
        is_server=True,
        level=6,
        min_bytes=0,
        max_message_bytes=1 << 20,
    )
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooBig):
            inflater.decompress(bomb[:-4])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"inflating the bomb allocated {peak} bytes at its peak"


def test_a_limit_ignored_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were inflation unbounded, the deflate target's bomb seed would say so."""

    def unbounded(self: PerMessageDeflate, data: bytes) -> bytes:
        return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")

    bomb = (CORPUS / "deflate" / "bomb").read_bytes()
    targets.fuzz_deflate(bomb)
    monkeypatch.setattr(PerMessageDeflate, "decompress", unbounded)
    with pytest.raises(targets.Finding, match="bomb inflated"):
        targets.fuzz_deflate(bomb)


def test_an_unexpected_exception_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything but the typed errors escapes the target (what libFuzzer reports)."""
    seed = (CORPUS / "wire" / "json-publish").read_bytes()

    def broken(data: object) -> object:
        raise KeyError("boom")

    monkeypatch.setattr(targets.wire, "_loads", broken)
    with pytest.raises(KeyError):
        targets.fuzz_wire(seed)


def test_hypothesis_fallback_reports_a_finding(tmp_path: Path) -> None:
    """The engine used where atheris is not installed writes the input and exits 1."""

    def fails_on_anything(data: bytes) -> None:
        raise ValueError("found")

    status = run.run_hypothesis(fails_on_anything, CORPUS / "wire", 60, tmp_path, 64)
    assert status == 1
    assert [p.name.startswith("finding-") for p in tmp_path.iterdir()] == [True]


def test_hypothesis_fallback_runs_a_real_target(tmp_path: Path) -> None:
    assert run.run_hypothesis(targets.fuzz_wire, CORPUS / "wire", 0.5, tmp_path, 512) == 0
    assert not any(tmp_path.iterdir())
