"""A Python back end streaming to browsers through Redwire, and taking their commands.

It publishes a reading on `telemetry` at a rate the browsers control, and listens on
`commands` for {"cmd": "rate", "hz": N}, {"cmd": "pause"} and {"cmd": "resume"}; each
command is confirmed on `telemetry` as {"kind": "ack", ...}. It talks to any worker over
WebSocket with the SDK's pub/sub client, which reconnects and resubscribes by itself.

    python examples/streaming/service.py --url ws://127.0.0.1:8765/ [--seconds N]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from client.pubsub import Message, PubSubClient, connect

MAX_HZ = 50.0


class Stream:
    def __init__(self) -> None:
        self.hz = 5.0
        self.paused = False
        self.value = 0.0
        self.seq = 0

    def apply(self, command: object) -> dict[str, object]:
        """Change the stream as a browser asked; returns what to confirm (or an error)."""
        if not isinstance(command, dict):
            return {"kind": "error", "reason": "a command is an object"}
        name = command.get("cmd")
        if name == "rate":
            hz = command.get("hz")
            if not isinstance(hz, int | float) or not 0.1 <= hz <= MAX_HZ:
                return {"kind": "error", "reason": f"hz must be 0.1..{MAX_HZ}"}
            self.hz = float(hz)
        elif name == "pause":
            self.paused = True
        elif name == "resume":
            self.paused = False
        else:
            return {"kind": "error", "reason": f"unknown command {name!r}"}
        return {"kind": "ack", "cmd": name, "hz": self.hz, "paused": self.paused}

    def reading(self) -> dict[str, object]:
        self.seq += 1
        self.value += random.gauss(0, 0.3) + 0.2 * math.sin(self.seq / 20)
        return {"kind": "reading", "seq": self.seq, "value": round(self.value, 3), "t": time.time()}


async def stream_readings(rw: PubSubClient, stream: Stream, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        if not stream.paused and rw.state == "open":
            try:
                await rw.publish("telemetry", stream.reading())
            except Exception as exc:  # a lost connection: the client reconnects; keep going
                print(f"publish failed: {exc}", file=sys.stderr)
        await asyncio.sleep(1.0 / stream.hz)


async def take_commands(rw: PubSubClient, stream: Stream) -> None:
    commands = await rw.subscribe("commands")
    message: Message
    async for message in commands:
        reply = stream.apply(message.data)
        print(f"command {message.data!r} -> {reply}", flush=True)
        await rw.publish("telemetry", reply)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/")
    parser.add_argument("--seconds", type=float, default=float("inf"), help="stop after")
    args = parser.parse_args()
    stream = Stream()
    async with await connect(args.url) as rw:
        print(f"streaming via worker {rw.worker}", flush=True)
        commands = asyncio.create_task(take_commands(rw, stream))
        await stream_readings(rw, stream, time.monotonic() + args.seconds)
        commands.cancel()


if __name__ == "__main__":
    asyncio.run(main())
