"""Run every conformance case against `redwire echo` and a `websockets` echo server; print
OK / NON-STRICT / FAILED per case and server, then the totals.

    python tests/conformance/compare_websockets.py [--all] [--section 6] [--json FILE]

By default only cases where the two servers differ or either is not OK are listed. The bar
for Redwire is: no FAILED case and no NON-STRICT case where websockets is OK. Test-only: the
websockets library is a peer here, never part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from conformance.conftest import LARGE_MESSAGE_BYTES  # noqa: E402
from conformance.rawws import Verdict, run_case  # noqa: E402
from conformance.test_autobahn_cases import SECTIONS  # noqa: E402
from support.processes import ServerProcess, redwire  # noqa: E402


class WebsocketsEcho:
    """websockets' asyncio server echoing every message, in a thread with its own loop."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("websockets server did not start")

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve
        from websockets.exceptions import ConnectionClosed

        async def echo(ws) -> None:  # type: ignore[no-untyped-def]
            try:
                async for message in ws:
                    await ws.send(message)
            except ConnectionClosed:
                pass

        self._stop = asyncio.Event()
        async with serve(echo, self.host, 0, max_size=LARGE_MESSAGE_BYTES) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="list every case, not only differences")
    parser.add_argument("--section", action="append", help="only these sections (e.g. 6)")
    parser.add_argument("--json", help="also write all verdicts to this file")
    args = parser.parse_args()

    sections = args.section or list(SECTIONS)
    cases = [case for name in sections for case in SECTIONS[name]()]
    ours = ServerProcess(
        redwire("echo", "--host", "127.0.0.1", "--port", "0"),
        env={"REDWIRE_MAX_MESSAGE_BYTES": str(LARGE_MESSAGE_BYTES)},
    )
    theirs = WebsocketsEcho()
    rows: list[tuple[Verdict, Verdict]] = []
    try:
        for case in cases:
            rows.append(
                (run_case(case, ours.host, ours.port), run_case(case, theirs.host, theirs.port))
            )
    finally:
        ours.stop()
        theirs.stop()

    width = max(len(case.id) for case in cases)
    print(f"{'case':<{width}}  {'redwire':<14} {'websockets':<14} description")
    for case, (a, b) in zip(cases, rows, strict=True):
        if args.all or a.result != b.result or a.result not in ("OK", "UNIMPLEMENTED"):
            print(f"{case.id:<{width}}  {a.result:<14} {b.result:<14} {case.description[:70]}")
    for name, index in (("redwire", 0), ("websockets", 1)):
        counts = Counter(row[index].result for row in rows)
        print(f"{name:>10}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    worse = [
        case.id
        for case, (a, b) in zip(cases, rows, strict=True)
        if a.result == "FAILED" or (a.result == "NON-STRICT" and b.result == "OK")
    ]
    print("redwire below the bar:", ", ".join(worse) if worse else "none")
    if args.json:
        data = [
            {
                "case": case.id,
                "description": case.description,
                "redwire": a.summary(),
                "websockets": b.summary(),
            }
            for case, (a, b) in zip(cases, rows, strict=True)
        ]
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 1 if worse else 0


if __name__ == "__main__":
    raise SystemExit(main())
