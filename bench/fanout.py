"""Fan-out benchmark: S subscribers over W workers on one topic, a publisher at R msg/s.

    python bench/fanout.py --subscribers 100 --workers 2 --rate 2000 --duration 10
    python bench/fanout.py --subscribers 1000 --rate 1000 --json
    python bench/fanout.py --idle 2000          # memory per idle connection
    python bench/fanout.py --idle 2000 --compress   # ... offering permessage-deflate
    python bench/fanout.py --subscribers 1000 --topics 100 --rate 5000   # many topics

With `--topics T`, subscriber i subscribes to `bench.<i mod T>` and message n goes to
`bench.<n mod T>` (the harness's T1000 shape: little fan-out per message, so per-message
cost shows rather than fan-out).

It starts a private redis-server and `redwire serve`, opens the subscribers from separate
load processes (uvloop, raw sockets; a few connections per process decode every frame for
latency, the rest count messages), and publishes straight into Redis with the same
envelope the workers use (pipelined). It prints delivered msg/s, loss, p50/p99/max
latency (publish → subscriber read, one monotonic clock), and the server's CPU-seconds
(supervisor + workers; Redis shown apart) per million deliveries. `--json` prints the
same as JSON; results also go to bench/results/fanout.json.

`--idle N` opens N subscribed connections and reports the workers' RSS growth per
connection. With `--compress` each one offers permessage-deflate as a browser does and, once
subscribed, sends one small compressed `ping` (browsers compress every message), so the
server's inflater has been used on every connection when RSS is read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import re
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Broker, RedisServer, cpu_seconds, percentile, rss_bytes, upgrade_request

TOPIC = "bench"
MARK = b'"op":"message"'
T_RE = re.compile(rb'"t":(\d+)')


# --- subscriber load process ----------------------------------------------------------------


PONG = b'"op":"pong"'


def _masked_text(text: str) -> bytes:
    from broker.frames import Opcode, serialize_frame

    return serialize_frame(Opcode.TEXT, text.encode(), mask=True)


def _masked_compressed_text(text: str) -> bytes:
    """One text message deflated as a browser sends it (RFC 7692 7.2.1: RSV1, tail stripped)."""
    from broker.frames import Opcode, serialize_frame

    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    payload = compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return serialize_frame(Opcode.TEXT, payload[:-4], rsv1=True, mask=True)


class Subscriber(asyncio.Protocol):
    def __init__(
        self,
        sampled: bool,
        ready: asyncio.Event,
        counter: list[int],
        compress: bool = False,
        topic: str = TOPIC,
    ) -> None:
        from broker.frames import FrameParser

        self.topic = topic
        self.sampled = sampled
        self.compress = compress
        self.ponged = False
        self.ready = ready
        self.counter = counter
        self.head = b""
        self.upgraded = False
        self.tail = b""
        self.acked = False
        self.latencies: list[float] = []
        self.parser = FrameParser(mask_required=False, max_payload_bytes=1 << 24)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.upgraded = True
            status = self.head.split(b"\r\n", 1)[0]
            if b" 101" not in status:
                raise RuntimeError(f"the server refused the upgrade: {status.decode()}")
            if self.compress and b"permessage-deflate" not in self.head[:end].lower():
                raise RuntimeError("the server declined permessage-deflate")
            data = self.head[end + 4 :]
            self.transport.write(  # type: ignore[union-attr]
                _masked_text(json.dumps({"op": "subscribe", "topic": self.topic, "id": 1}))
            )
        if not self.acked:
            if b'"op":"ack"' in data or b'"op":"ack"' in (self.tail + data):
                self.acked = True
                if not self.compress:
                    self.ready.set()
                else:  # exercise the server's inflater once; ready when it answered
                    self.transport.write(  # type: ignore[union-attr]
                        _masked_compressed_text(json.dumps({"op": "ping", "id": 2}))
                    )
        if self.compress and self.acked and not self.ponged:
            if PONG in data or PONG in (self.tail + data):
                self.ponged = True
                self.ready.set()
        if self.sampled:
            now = time.monotonic_ns()
            for frame in self.parser.feed(data):
                match = T_RE.search(frame.payload)
                if match and frame.payload.startswith(b'{"op":"message"'):
                    self.counter[0] += 1
                    self.latencies.append((now - int(match.group(1))) / 1e6)
            return
        joined = self.tail + data
        self.counter[0] += joined.count(MARK)
        # Keep a partial marker for the next read, never a whole one (it was counted).
        keep = len(MARK) - 1
        self.tail = joined[-keep:] if not joined.endswith(MARK) else b""


def topic_of(index: int, topics: int) -> str:
    """The topic of subscriber (or message) number `index`."""
    return TOPIC if topics <= 1 else f"{TOPIC}.{index % topics}"


def subscriber_process(
    host: str,
    port: int,
    count: int,
    sampled: int,
    conn,
    compress: bool = False,
    first: int = 0,
    topics: int = 1,
) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        counter = [0]
        subs: list[Subscriber] = []
        for i in range(count):
            ready = asyncio.Event()
            topic = topic_of(first + i, topics)
            transport, proto = await loop.create_connection(
                lambda r=ready, s=i < sampled, t=topic: Subscriber(s, r, counter, compress, t),
                host,
                port,
            )
            transport.write(upgrade_request(host, port, compress))
            subs.append(proto)
            await asyncio.wait_for(ready.wait(), 30)
        conn.send(("ready", count))
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "mark":
                conn.send(("count", counter[0]))
            elif cmd == "stop":
                latencies = [x for s in subs for x in s.latencies]
                conn.send(("done", counter[0], latencies))
                return

    uvloop.run(main())


# --- publisher process ----------------------------------------------------------------------


def publisher_process(
    redis_url: str,
    prefix: str,
    history: int,
    rate: int,
    duration: float,
    size: int,
    conn,
    topics: int = 1,
) -> None:
    """Publish through the bus (as the SDK does): plain PUBLISH, or the history script."""
    import uvloop

    from broker.bus import make_bus
    from broker.envelope import ENCODING_JSON, BusMessage
    from broker.settings import Settings

    async def main() -> None:
        settings = Settings(
            redis_url=redis_url,
            channel_prefix=prefix,
            topics=_rules(history),
            bus_publish_batch=1024,
        )
        bus = make_bus(settings, origin="bench-publisher")
        await bus.start()
        pad = "x" * max(0, size - 40)
        conn.send(("ready",))
        conn.recv()  # go
        start = time.monotonic()
        sent = 0
        total = int(rate * duration)
        while sent < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            if due > sent:
                batch = []
                for seq in range(sent, due):
                    data = f'{{"t":{time.monotonic_ns()},"s":{seq},"p":"{pad}"}}'.encode()
                    message = BusMessage(topic_of(seq, topics), data, ENCODING_JSON, "bench")
                    batch.append(bus.publish(message))
                await asyncio.gather(*batch)
                sent = due
            next_due = start + (sent + 1) / rate
            await asyncio.sleep(max(0.0, next_due - time.monotonic()))
        elapsed = time.monotonic() - start
        await bus.close()
        conn.send(("done", sent, elapsed))

    uvloop.run(main())


def _rules(history: int) -> tuple:
    from broker.settings import TopicRule

    return (TopicRule(pattern=TOPIC + "*", history_size=history),) if history else ()


def _rules_env(history: int) -> dict[str, str]:
    if not history:
        return {}
    return {"REDWIRE_TOPICS": json.dumps([{"pattern": TOPIC + "*", "history_size": history}])}


# --- driver ---------------------------------------------------------------------------------


def run_fanout(args: argparse.Namespace) -> dict[str, object]:
    redis = RedisServer() if args.redis is None else None
    redis_url = args.redis or redis.url  # type: ignore[union-attr]
    broker = Broker(
        args.workers,
        redis_url,
        env={"REDWIRE_CHANNEL_PREFIX": args.prefix, **_rules_env(args.history)},
    )
    ctx = mp.get_context("spawn")
    loaders = []
    try:
        per = [args.subscribers // args.load_procs] * args.load_procs
        for i in range(args.subscribers % args.load_procs):
            per[i] += 1
        first = 0
        for count in per:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=subscriber_process,
                args=(broker.host, broker.port, count, min(args.sampled, count), child, False,
                      first, args.topics),
            )  # fmt: skip
            proc.start()
            loaders.append((proc, parent))
            first += count
        for _, pipe in loaders:
            msg = pipe.recv()
            assert msg[0] == "ready", msg
        pub_parent, pub_child = ctx.Pipe()
        publisher = ctx.Process(
            target=publisher_process,
            args=(redis_url, args.prefix, args.history, args.rate, args.duration, args.size,
                  pub_child, args.topics),
        )  # fmt: skip
        publisher.start()
        pub_parent.recv()
        server_pids = broker.pids()
        redis_pid = [redis.proc.pid] if redis else []
        cpu0, rcpu0, t0 = cpu_seconds(server_pids), cpu_seconds(redis_pid), time.monotonic()
        pub_parent.send("go")
        _, sent, pub_elapsed = pub_parent.recv()
        # Let the tail drain: wait until counts stop growing (bounded).
        per_topic = [0] * max(1, args.topics)
        for i in range(args.subscribers):
            per_topic[i % len(per_topic)] += 1
        expected = sum(per_topic[n % len(per_topic)] for n in range(sent))
        deadline = time.monotonic() + 10
        delivered = 0
        while time.monotonic() < deadline:
            for _, pipe in loaders:
                pipe.send("mark")
            delivered = sum(pipe.recv()[1] for _, pipe in loaders)
            if delivered >= expected:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(server_pids) - cpu0
        rcpu = cpu_seconds(redis_pid) - rcpu0
        latencies: list[float] = []
        delivered = 0
        for _, pipe in loaders:
            pipe.send("stop")
            _, count, lat = pipe.recv()
            delivered += count
            latencies.extend(lat)
        latencies.sort()
        publisher.join(5)
        for proc, _ in loaders:
            proc.join(5)
        return {
            "bench": "fanout",
            "workers": args.workers,
            "subscribers": args.subscribers,
            "topics": args.topics,
            "rate_msg_s": args.rate,
            "duration_s": args.duration,
            "size_bytes": args.size,
            "history_size": args.history,
            "published": sent,
            "publish_elapsed_s": round(pub_elapsed, 3),
            "expected_deliveries": expected,
            "delivered": delivered,
            "loss": round(1 - delivered / expected, 6) if expected else 0.0,
            "delivered_per_s": round(delivered / pub_elapsed),
            "latency_p50_ms": round(percentile(latencies, 0.50), 3),
            "latency_p99_ms": round(percentile(latencies, 0.99), 3),
            "latency_max_ms": round(latencies[-1], 3) if latencies else None,
            "latency_samples": len(latencies),
            "server_cpu_s": round(cpu, 3),
            "redis_cpu_s": round(rcpu, 3),
            "window_s": round(elapsed, 3),
            "server_cpu_s_per_million": round(cpu / delivered * 1e6, 3) if delivered else None,
            "deliveries_per_server_cpu_s": round(delivered / cpu) if cpu else None,
        }
    finally:
        for proc, _ in loaders:
            if proc.is_alive():
                proc.kill()
        broker.stop()
        if redis:
            redis.stop()


def run_idle(args: argparse.Namespace) -> dict[str, object]:
    """RSS growth of the workers per idle (subscribed) connection."""
    redis = RedisServer() if args.redis is None else None
    redis_url = args.redis or redis.url  # type: ignore[union-attr]
    # Every connection comes from 127.0.0.1: lift the per-IP cap (429 past it).
    env = {"REDWIRE_CHANNEL_PREFIX": args.prefix, "REDWIRE_MAX_CONNECTIONS_PER_IP": "none"}
    broker = Broker(args.workers, redis_url, env=env)
    ctx = mp.get_context("spawn")
    try:
        time.sleep(1.0)  # let workers finish importing and settle before the baseline
        workers = broker.pids()[1:]
        before = rss_bytes(workers)
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=subscriber_process,
            args=(broker.host, broker.port, args.idle, 0, child, args.compress),
        )
        proc.start()
        child.close()  # so that recv() raises EOFError if the load process dies
        assert parent.recv()[0] == "ready"
        time.sleep(1.0)
        after = rss_bytes(workers)
        parent.send("stop")
        parent.recv()
        proc.join(5)
        return {
            "bench": "idle",
            "workers": args.workers,
            "connections": args.idle,
            "compression_offered": args.compress,
            "rss_before_bytes": before,
            "rss_after_bytes": after,
            "bytes_per_connection": round((after - before) / args.idle),
        }
    finally:
        broker.stop()
        if redis:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--topics", type=int, default=1, help="topics the load is spread over")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=100, help="approximate data bytes")
    parser.add_argument("--load-procs", type=int, default=2)
    parser.add_argument("--sampled", type=int, default=5, help="latency-decoding conns/proc")
    parser.add_argument("--redis", help="use this Redis instead of a private one")
    parser.add_argument("--prefix", default="bench:")
    parser.add_argument("--idle", type=int, help="measure memory with N idle connections")
    parser.add_argument(
        "--compress", action="store_true",
        help="with --idle: offer permessage-deflate like a browser, send one compressed message",
    )  # fmt: skip
    parser.add_argument("--history", type=int, default=0, help="history_size for the topic")
    parser.add_argument(
        "--compare-history", type=int, metavar="SIZE",
        help="run twice in one go, history off then history_size=SIZE, and compare",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    if args.compare_history:
        rows = []
        for history in (0, args.compare_history):
            args.history = history
            rows.append(run_fanout(args))
        off, on = rows
        keys = [k for k in off if k != "bench"]
        (out / "fanout_history.json").write_text(json.dumps(rows, indent=2))
        if args.json:
            print(json.dumps(rows))
            return
        width = max(len(k) for k in keys)
        print(f"{'':<{width}}  {'history off':>14}  {'history on':>14}")
        for key in keys:
            print(f"{key:<{width}}  {off[key]!s:>14}  {on[key]!s:>14}")
        ratio = on["deliveries_per_server_cpu_s"] / off["deliveries_per_server_cpu_s"]
        print(f"history on / off, deliveries per server CPU-second: {ratio:.2f}")
        return
    result = run_idle(args) if args.idle else run_fanout(args)
    name = f"{result['bench']}_compress" if args.idle and args.compress else result["bench"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
