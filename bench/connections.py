"""100k-connection benchmark: N subscribed WebSockets on `redwire serve`, then idle, then a trickle.

    python bench/connections.py                  # N=100,000 (or what this box can hold)
    python bench/connections.py -n 10000         # quick check
    python bench/connections.py --compress       # each client offers permessage-deflate

It starts a private redis-server and `redwire serve --workers W` (2 by default) with the
per-IP cap and the upgrade rate limit off and `max_connections_per_worker` = N, then opens
N connections from several load processes (uvloop, raw sockets, no WebSocket library),
spread over the loopback source addresses 127.0.0.2, 127.0.0.3, ... (each client socket is
bound to its address before connect, at most `--per-address` connections per address: one
address has only the ephemeral port range's worth of ports towards one server port).
Connection i subscribes to topic `c.<i mod 1000>`. With `--compress` it offers
permessage-deflate as Chrome and Firefox do (`permessage-deflate; client_max_window_bits`)
and, once subscribed, sends one small compressed `ping`, so that the server has inflated one
message on every connection (as bench/fanout.py --idle --compress does).

Then, in order:
  accept   time from the first connect to the last subscription acknowledged (conn/s);
  memory   the workers' RSS growth / N (bytes per connection);
  idle     the workers' CPU over `--idle-seconds` (10 s) with nothing but keepalive pings
           (the server pings every connection every `ping_interval_s`; the clients answer);
  trickle  one message per topic per second for `--trickle-seconds` (10 s), published
           straight into Redis through the bus (as bench/fanout.py's publisher does), and
           deliveries counted (each connection counts the message frames it receives).

It prints a table and writes it as JSON into bench/results/connections.json (one entry per
N, workers, compression and trickle rate, the newest run replacing the older one); the
broker's own counters over the trickle (GET /metrics: messages from the bus, frames sent,
bus gaps) tell late deliveries from lost ones.

Before starting it checks what the box can hold: the file-descriptor hard limit (each worker
and each load process holds one descriptor per connection, and RLIMIT_NOFILE's hard limit
cannot be raised without CAP_SYS_RESOURCE), the ephemeral port range (connections per
source address), memory and the conntrack table. When N does not fit it says why and runs
the largest N that does (`--no-clamp` to try anyway). Every process it starts is stopped
by PID at the end, on error and on the hard timeout (`--timeout`) too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Broker, RedisServer, children, cpu_seconds, rss_bytes, upgrade_request

PREFIX = "bench:"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MESSAGE = b'"op":"message"'
FD_SPARE = 200  # descriptors a process needs besides its connections (Redis, pipes, files)
RESULTS = Path(__file__).resolve().parent / "results" / "connections.json"


def topic_of(index: int, topics: int) -> str:
    return f"c.{index % topics}"


def source_address(index: int, per_address: int) -> str:
    """127.0.0.2 for the first `per_address` connections, then 127.0.0.3, ..."""
    n = 2 + index // per_address
    return f"127.0.{n // 256}.{n % 256}" if n >= 256 else f"127.0.0.{n}"


# --- load process -----------------------------------------------------------------------------


@functools.cache
def _handshake(host: str, port: int, compress: bool) -> bytes:
    """The upgrade request, one key per load process (the server's work is the same)."""
    return upgrade_request(host, port, compress)


_FRAMES: dict[tuple[int, bytes, bool], bytes] = {}


def _masked(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """A masked client frame; built once per (opcode, payload) and reused: the server's cost
    does not depend on the mask key, and the load processes stay light."""
    frame = _FRAMES.get((opcode, payload, rsv1))
    if frame is None:
        from broker.frames import serialize_frame

        frame = _FRAMES[(opcode, payload, rsv1)] = serialize_frame(
            opcode, payload, rsv1=rsv1, mask=True
        )
    return frame


def _deflated(text: bytes) -> bytes:
    """A message deflated as a browser sends it (RFC 7692 7.2.1: the 4-byte tail stripped)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


PING_DEFLATED = _deflated(b'{"op":"ping","id":2}')


class Refused(Exception):
    """The server answered the upgrade with something other than 101."""


class Client(asyncio.Protocol):
    """One subscriber: handshake, subscribe, (a compressed ping), then count message frames
    and answer pings. Frames are walked header by header; only control frames, the replies
    before `ready` and compressed frames are looked into."""

    __slots__ = ("buf", "compress", "ready", "state", "stats", "topic", "transport", "upgraded")

    def __init__(self, stats: dict[str, int], compress: bool, topic: str) -> None:
        self.stats = stats
        self.compress = compress
        self.topic = topic
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.state = 0  # 0 subscribing, 1 pinging (compress), 2 ready
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == 2:
            self.stats["lost"] += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.transport.abort()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end]
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self.buf = b""
                return self._fail(Refused(status.decode(errors="replace")))
            if self.compress and b"permessage-deflate" not in head.lower():
                self.buf = b""
                return self._fail(Refused("the server declined permessage-deflate"))
            self.upgraded = True
            buf = buf[end + 4 :]
            self.transport.write(  # type: ignore[union-attr]
                _masked(0x1, b'{"op":"subscribe","topic":"%s","id":1}' % self.topic.encode())
            )
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            end = pos + head + length
            if end > size:
                break
            opcode = b0 & 0x0F
            if opcode == 0x1 or opcode == 0x2:
                if self.state == 2 and not b0 & 0x40:
                    if MESSAGE in buf[pos + head : pos + head + 24]:
                        self.stats["messages"] += 1
                else:
                    payload = buf[pos + head : end]
                    if b0 & 0x40:  # compressed (the server keeps no context: a fresh inflater)
                        payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
                    self._reply(payload)
            elif opcode == 0x9:
                self.stats["pings"] += 1
                self.transport.write(_masked(0xA, buf[pos + head : end]))  # type: ignore[union-attr]
            elif opcode == 0x8:
                self.stats["closed_by_server"] += 1
            pos = end
        self.buf = buf[pos:] if pos < size else b""

    def _reply(self, payload: bytes) -> None:
        if self.state == 2:
            if MESSAGE in payload[:24]:
                self.stats["messages"] += 1
        elif self.state == 0 and b'"op":"ack"' in payload:
            if self.compress:
                self.state = 1
                self.transport.write(_masked(0x1, PING_DEFLATED, rsv1=True))  # type: ignore[union-attr]
            else:
                self.state = 2
                self.ready.set_result(None)
        elif self.state == 1 and b'"op":"pong"' in payload:
            self.state = 2
            self.ready.set_result(None)
        elif b'"op":"error"' in payload:
            self._fail(Refused(payload[:200].decode(errors="replace")))


def load_process(
    host: str,
    port: int,
    first: int,
    count: int,
    topics: int,
    per_address: int,
    in_flight: int,
    compress: bool,
    connect_timeout: float,
    conn,
) -> None:
    """Open connections first..first+count-1, report, then answer "stats"/"stop"."""
    import uvloop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stats = {"messages": 0, "pings": 0, "lost": 0, "closed_by_server": 0}
        failures: dict[str, int] = {}
        clients: list[Client] = []
        next_index = [first]
        done = [0]
        retries = [0]

        async def open_one(index: int) -> None:
            topic = topic_of(index, topics)
            address = source_address(index, per_address)
            for attempt in range(4):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((address, 0))
                    sock.setblocking(False)
                    await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 30)
                    _, client = await loop.create_connection(
                        lambda: Client(stats, compress, topic), sock=sock
                    )
                except BaseException:
                    sock.close()
                    raise
                client.transport.write(_handshake(host, port, compress))  # type: ignore[union-attr]
                try:
                    await asyncio.wait_for(client.ready, 60)
                except Refused as exc:  # 503 (worker full, rate): retry a few times
                    if " 503 " in f"{exc} " and attempt < 3:
                        retries[0] += 1
                        await asyncio.sleep(0.5 * (attempt + 1))
                        continue
                    raise
                except BaseException:
                    client.transport.abort()  # type: ignore[union-attr]
                    raise
                clients.append(client)
                return

        async def opener() -> None:
            while next_index[0] < first + count:
                index = next_index[0]
                next_index[0] += 1
                try:
                    await open_one(index)
                except Exception as exc:  # counted and reported
                    key = f"{type(exc).__name__}: {exc}"[:120]
                    failures[key] = failures.get(key, 0) + 1
                done[0] += 1

        async def progress() -> None:
            while True:
                await asyncio.sleep(2.0)
                conn.send(("progress", len(clients), done[0]))

        conn.recv()  # go
        t0 = time.monotonic()
        reporter = asyncio.ensure_future(progress())
        openers = [asyncio.ensure_future(opener()) for _ in range(in_flight)]
        _, pending = await asyncio.wait(openers, timeout=connect_timeout)
        for task in pending:
            task.cancel()
        if pending:
            failures["connect phase timed out"] = first + count - len(clients)
        elapsed = time.monotonic() - t0
        reporter.cancel()
        conn.send(("ready", len(clients), elapsed, failures, retries[0]))
        while True:
            try:
                cmd = await loop.run_in_executor(None, conn.recv)
            except EOFError:  # the driver is gone
                return
            if cmd == "stats":
                conn.send(("stats", dict(stats)))
            elif cmd == "stop":
                conn.send(("stats", dict(stats)))
                return

    try:
        conn.send(("loaded",))
        uvloop.run(main())
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(0)  # skip closing 100k transports one by one: the kernel does it


# --- trickle publisher ------------------------------------------------------------------------


def publisher_process(redis_url: str, topics: int, rate: float, seconds: float, conn) -> None:
    """Publish `rate` messages per topic per second for `seconds`, through the bus."""
    import uvloop

    from broker.bus import make_bus
    from broker.envelope import ENCODING_JSON, BusMessage
    from broker.settings import Settings

    async def main() -> None:
        bus = make_bus(
            Settings(redis_url=redis_url, channel_prefix=PREFIX, bus_publish_batch=1024),
            origin="bench-trickle",
        )
        await bus.start()
        conn.send(("ready",))
        conn.recv()  # go
        start = time.monotonic()
        rounds = max(1, round(rate * seconds))
        sent = 0
        for r in range(rounds):
            await asyncio.sleep(max(0.0, start + r / rate - time.monotonic()))
            batch = [
                bus.publish(
                    BusMessage(topic_of(t, topics), b'{"r":%d}' % r, ENCODING_JSON, "bench")
                )
                for t in range(topics)
            ]
            await asyncio.gather(*batch)
            sent += len(batch)
        elapsed = time.monotonic() - start
        await bus.close()
        conn.send(("done", sent, rounds, elapsed))

    uvloop.run(main())


# --- what the box can hold ----------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def box_limits(workers: int) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ports = _read("/proc/sys/net/ipv4/ip_local_port_range")
    low, high = (int(x) for x in ports.split()) if ports else (32768, 60999)
    meminfo = {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in (_read("/proc/meminfo") or "").splitlines()
        if line.split()
    }
    conntrack = _read("/proc/sys/net/netfilter/nf_conntrack_max")
    return {
        "nofile_soft": soft,
        "nofile_hard": hard,
        "nr_open": int(_read("/proc/sys/fs/nr_open") or 0),
        "ephemeral_ports": [low, high],
        "mem_available_bytes": meminfo.get("MemAvailable"),
        "conntrack_max": int(conntrack) if conntrack else None,
        "somaxconn": int(_read("/proc/sys/net/core/somaxconn") or 0),
        "tcp_tw_reuse": int(_read("/proc/sys/net/ipv4/tcp_tw_reuse") or 0),
        "workers": workers,
        "cpus": os.cpu_count(),
    }


def capacity(limits: dict[str, object], workers: int) -> tuple[int, list[str]]:
    """The largest N the box holds, and why (one line per limit that binds below 1M)."""
    why: list[str] = []
    hard = int(limits["nofile_hard"])  # type: ignore[arg-type]
    per_worker = hard - FD_SPARE if hard != resource.RLIM_INFINITY else 1 << 30
    # SO_REUSEPORT spreads connections by a hash: allow 5 standard deviations of imbalance.
    n = 1
    while n < 1_000_000:
        step = max(100, n // 100)
        m = n + step
        share = m / workers + 5 * math.sqrt(m * (1 / workers) * (1 - 1 / workers))
        if share > per_worker:
            break
        n = m
    n = n // 100 * 100
    best = n
    if n < 1_000_000:
        why.append(
            f"RLIMIT_NOFILE hard limit {hard} per process (cannot be raised here): each of the "
            f"{workers} workers holds about {per_worker} connections; with SO_REUSEPORT's "
            f"uneven spread that is about {n:,} in all"
        )
    mem = limits["mem_available_bytes"]
    if isinstance(mem, int):
        by_mem = mem // (48 * 1024)  # server + client + kernel, generously
        if by_mem < best:
            best = by_mem
            why.append(f"memory: {mem >> 20} MiB available, ~48 KiB per connection in all")
    ct = limits["conntrack_max"]
    if isinstance(ct, int) and ct * 9 // 10 < best:
        best = ct * 9 // 10
        why.append(f"nf_conntrack_max {ct}")
    return best, why


# --- driver -----------------------------------------------------------------------------------


class HardTimeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise HardTimeout("hard timeout")


def _term(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _worker_rss(pids: list[int]) -> list[int]:
    return [rss_bytes([pid]) for pid in pids]


def run(args: argparse.Namespace) -> dict[str, object]:
    limits = box_limits(args.workers)
    fits, why = capacity(limits, args.workers)
    requested = args.connections
    n = requested
    clamped: list[str] = []
    if n > fits and not args.no_clamp:
        n = fits
        clamped = why
        print(f"this box cannot hold {requested:,} connections; running {n:,}:", file=sys.stderr)
        for line in why:
            print(f"  - {line}", file=sys.stderr)
    low, high = limits["ephemeral_ports"]  # type: ignore[misc]
    per_address = min(args.per_address, high - low + 1 - 1000)
    addresses = math.ceil(n / per_address)
    hard = int(limits["nofile_hard"])  # type: ignore[arg-type]
    per_proc_cap = hard - FD_SPARE if hard != resource.RLIM_INFINITY else 1 << 30
    procs = max(args.load_procs, math.ceil(n / per_proc_cap))
    per = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]

    redis = RedisServer()
    env = {
        "REDWIRE_CHANNEL_PREFIX": PREFIX,
        "REDWIRE_MAX_CONNECTIONS_PER_IP": "none",
        "REDWIRE_MAX_CONNECTIONS_PER_WORKER": str(n),
        "REDWIRE_CONNECTION_RATE_PER_S": "none",
    }
    broker: Broker | None = None
    ctx = mp.get_context("spawn")
    loaders: list[tuple[mp.Process, object]] = []
    publisher: mp.Process | None = None
    worker_pids: list[int] = []
    try:
        broker = Broker(args.workers, redis.url, env=env)
        assert broker.proc.stdout is not None
        threading.Thread(target=broker.proc.stdout.read, daemon=True).start()  # keep it drained
        time.sleep(1.5)  # workers import and settle before the baseline
        worker_pids = children(broker.proc.pid)
        rss0 = _worker_rss(worker_pids)
        first = 0
        for count in per:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=load_process,
                args=(broker.host, broker.port, first, count, args.topics, per_address,
                      args.in_flight, args.compress, args.connect_timeout, child),
                daemon=True,
            )  # fmt: skip
            proc.start()
            child.close()
            loaders.append((proc, parent))
            first += count
        for _, pipe in loaders:
            assert pipe.recv()[0] == "loaded"  # type: ignore[attr-defined]
        print(
            f"opening {n:,} connections from {procs} load processes over {addresses} source "
            f"addresses (127.0.0.2..), {args.in_flight} handshakes in flight per process",
            file=sys.stderr,
        )
        loader_pids = [proc.pid for proc, _ in loaders if proc.pid is not None]
        cpu_a, lcpu_a, t0 = cpu_seconds(worker_pids), cpu_seconds(loader_pids), time.monotonic()
        for _, pipe in loaders:
            pipe.send("go")  # type: ignore[attr-defined]
        opened, failures, retries, last_print = 0, {}, 0, 0.0
        progress = dict.fromkeys(range(len(loaders)), 0)
        waiting = set(range(len(loaders)))
        while waiting:
            for k in list(waiting):
                pipe = loaders[k][1]
                while pipe.poll(0.05):  # type: ignore[attr-defined]
                    msg = pipe.recv()  # type: ignore[attr-defined]
                    if msg[0] == "progress":
                        progress[k] = msg[1]
                    elif msg[0] == "ready":
                        progress[k] = msg[1]
                        opened += msg[1]
                        retries += msg[4]
                        for key, value in msg[3].items():
                            failures[key] = failures.get(key, 0) + value
                        waiting.discard(k)
                        break
            now = time.monotonic()
            if now - last_print >= 5:
                last_print = now
                done = sum(progress.values())
                print(f"  {now - t0:6.1f} s  {done:,} subscribed", file=sys.stderr)
            dead = [k for k in waiting if not loaders[k][0].is_alive()]
            if dead:
                raise SystemExit(f"load process(es) {dead} died while connecting")
        accept_s = time.monotonic() - t0
        accept_cpu = cpu_seconds(worker_pids) - cpu_a
        accept_load_cpu = cpu_seconds(loader_pids) - lcpu_a
        print(f"  {accept_s:6.1f} s  {opened:,} subscribed, {sum(failures.values())} failed",
              file=sys.stderr)  # fmt: skip
        time.sleep(2.0)
        rss1 = _worker_rss(worker_pids)
        hwm = sum(_status_kb(pid, "VmHWM") for pid in worker_pids) * 1024
        fds = [len(os.listdir(f"/proc/{pid}/fd")) for pid in worker_pids]

        def stats() -> dict[str, int]:
            total: dict[str, int] = {}
            for _, pipe in loaders:
                pipe.send("stats")  # type: ignore[attr-defined]
                _, part = pipe.recv()  # type: ignore[attr-defined]
                for key, value in part.items():
                    total[key] = total.get(key, 0) + value
            return total

        # idle: nothing but keepalive pings
        s0 = stats()
        cpu0, sup0, rcpu0 = (cpu_seconds(worker_pids), cpu_seconds([broker.proc.pid]),
                             cpu_seconds([redis.proc.pid]))  # fmt: skip
        time.sleep(args.idle_seconds)
        idle_cpu = cpu_seconds(worker_pids) - cpu0
        idle_sup = cpu_seconds([broker.proc.pid]) - sup0
        idle_redis = cpu_seconds([redis.proc.pid]) - rcpu0
        s1 = stats()
        pings = s1["pings"] - s0["pings"]
        print(f"  idle {args.idle_seconds:.0f} s: workers {idle_cpu:.2f} CPU-s", file=sys.stderr)

        # trickle
        pub_parent, pub_child = ctx.Pipe()
        publisher = ctx.Process(
            target=publisher_process,
            args=(redis.url, args.topics, args.trickle_rate, args.trickle_seconds, pub_child),
            daemon=True,
        )
        publisher.start()
        pub_child.close()
        assert pub_parent.recv()[0] == "ready"
        m0 = scrape(broker.port)
        cpu2, tt0 = cpu_seconds(worker_pids), time.monotonic()
        pub_parent.send("go")
        _, published, rounds, pub_elapsed = pub_parent.recv()
        expected = rounds * opened  # every topic got `rounds` messages, each client one topic
        deadline = time.monotonic() + args.drain_seconds
        while True:
            s2 = stats()
            received = s2["messages"] - s1["messages"]
            if received >= expected or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        trickle_s = time.monotonic() - tt0
        trickle_cpu = cpu_seconds(worker_pids) - cpu2
        time.sleep(2.5)  # the workers sync their counters to /metrics once a second
        counters = _delta(scrape(broker.port), m0)
        publisher.join(5)
        rss2 = _worker_rss(worker_pids)
        growth = sum(rss1) - sum(rss0)
        result: dict[str, object] = {
            "bench": "connections",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {os.cpu_count()} CPUs, Linux {platform.release()}",
            "loadavg_at_end": os.getloadavg(),
            "requested_connections": requested,
            "connections": n,
            "clamped_because": clamped,
            "compression_offered": args.compress,
            "workers": args.workers,
            "topics": args.topics,
            "load_processes": procs,
            "source_addresses": addresses,
            "per_address": per_address,
            "limits": limits,
            "opened": opened,
            "failed": sum(failures.values()),
            "failures": failures,
            "retries_503": retries,
            "accept_s": round(accept_s, 2),
            "accept_per_s": round(opened / accept_s) if accept_s else None,
            "accept_worker_cpu_s": round(accept_cpu, 2),
            "accept_load_processes_cpu_s": round(accept_load_cpu, 2),
            "rss_before_bytes": rss0,
            "rss_after_bytes": rss1,
            "rss_growth_bytes": growth,
            "rss_per_connection_bytes": round(growth / opened) if opened else None,
            "workers_vmhwm_bytes": hwm,
            "worker_open_fds": fds,
            "idle_s": args.idle_seconds,
            "idle_worker_cpu_s": round(idle_cpu, 3),
            "idle_worker_cpu_pct_of_core": round(100 * idle_cpu / args.idle_seconds, 1),
            "idle_supervisor_cpu_s": round(idle_sup, 3),
            "idle_redis_cpu_s": round(idle_redis, 3),
            "idle_pings_answered": pings,
            "idle_worker_cpu_us_per_ping": round(idle_cpu / pings * 1e6, 1) if pings else None,
            "trickle_rate_per_topic_s": args.trickle_rate,
            "trickle_published": published,
            "trickle_publish_s": round(pub_elapsed, 2),
            "trickle_expected": expected,
            "trickle_delivered": received,
            "trickle_all_received": received == expected,
            "trickle_window_s": round(trickle_s, 2),
            "trickle_worker_cpu_s": round(trickle_cpu, 3),
            "trickle_broker_counters": counters,
            "rss_after_trickle_bytes": rss2,
            "lost_connections": s2["lost"],
            "closed_by_server": s2["closed_by_server"],
        }
        return result
    finally:
        for proc, _ in loaders:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        if publisher is not None and publisher.is_alive():
            os.kill(publisher.pid, signal.SIGKILL)
            publisher.join(5)
        if broker is not None:
            _stop_broker(broker, worker_pids)
        redis.stop()


METRICS = {
    "redwire_messages_in_total": "messages_in",
    "redwire_deliveries_total": "deliveries",
    "redwire_slow_consumer_closes_total": "slow_consumer_closes",
    "redwire_gaps_announced_total": "gaps_announced",
    "redwire_bus_reconnects_total": "bus_reconnects",
    "redwire_bus_gaps_total": "bus_gaps",
}


def scrape(port: int) -> dict[str, float] | None:
    """The broker's own counters (GET /metrics, summed over workers); None if it fails."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out = dict.fromkeys(METRICS.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRICS:
            out[METRICS[name]] += float(line.rsplit(" ", 1)[1])
    return out


def _delta(after: dict | None, before: dict | None) -> dict[str, float] | None:
    if after is None or before is None:
        return None
    return {key: after[key] - before[key] for key in after}


def _status_kb(pid: int, key: str) -> int:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _stop_broker(broker: Broker, worker_pids: list[int]) -> None:
    """SIGTERM the supervisor (it drains the workers); SIGKILL by PID whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        broker.proc.send_signal(signal.SIGTERM)
    try:
        broker.proc.wait(40)
    except Exception:  # TimeoutExpired: killed below
        pass
    for pid in [broker.proc.pid, *worker_pids]:  # still ours: a broker/worker command line
        cmdline = _read(f"/proc/{pid}/cmdline") or ""
        if "broker" in cmdline or "worker" in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        broker.proc.wait(5)


def rows(r: dict) -> list[tuple[str, str]]:
    """The printed table: (label, value) per line."""
    per = r["rss_per_connection_bytes"] or 0
    trickle = f"{r['trickle_delivered']:,} / {r['trickle_expected']:,}"
    lines = [
        ("connections (requested)", f"{r['opened']:,} ({r['requested_connections']:,})"),
        ("permessage-deflate offered", "yes" if r["compression_offered"] else "no"),
        ("workers / load processes", f"{r['workers']} / {r['load_processes']}"),
        ("open fds per worker", " / ".join(f"{n:,}" for n in r["worker_open_fds"])),
        ("failed connections", f"{r['failed']:,}"),
        ("time to accept all", f"{r['accept_s']:.1f} s"),
        ("connections/s", f"{r['accept_per_s']:,}"),
        ("workers' RSS growth", f"{r['rss_growth_bytes'] / 2**20:,.1f} MiB"),
        ("RSS per connection", f"{per:,} B ({per / 1024:.1f} KB)"),
        (
            "workers' CPU, idle",
            f"{r['idle_worker_cpu_s']:.2f} CPU-s in {r['idle_s']:.0f} s"
            f" ({r['idle_worker_cpu_pct_of_core']}% of a core)",
        ),
        (
            "pings answered while idle",
            f"{r['idle_pings_answered']:,} ({r['idle_worker_cpu_us_per_ping'] or '-'} µs CPU each)",
        ),
        ("trickle deliveries", trickle + (" (all)" if r["trickle_all_received"] else " MISSING")),
        (
            "workers' CPU, trickle",
            f"{r['trickle_worker_cpu_s']:.2f} CPU-s in {r['trickle_window_s']:.1f} s",
        ),
        ("connections lost / closed", f"{r['lost_connections']} / {r['closed_by_server']}"),
    ]
    counters = r.get("trickle_broker_counters")
    if counters:
        lines.insert(
            -2,
            (
                "broker, trickle",
                f"{counters['messages_in']:,.0f} from the bus, {counters['deliveries']:,.0f}"
                f" frames sent, {counters['bus_reconnects']:.0f} bus reconnects"
                f" ({counters['bus_gaps']:.0f} gaps)",
            ),
        )
    return lines


def table(result: dict) -> str:
    lines = rows(result)
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in lines)


def save(result: dict[str, object], path: Path) -> None:
    """Keep one entry per (requested N, workers, compression, trickle rate): the newest
    replaces the older."""
    runs: list[dict[str, object]] = []
    if path.exists():
        with contextlib.suppress(ValueError):
            runs = json.loads(path.read_text()).get("runs", [])
    fields = ("requested_connections", "workers", "compression_offered", "trickle_rate_per_topic_s")
    key = [result[f] for f in fields]
    runs = [r for r in runs if [r.get(f) for f in fields] != key]
    runs.append(result)
    runs.sort(key=lambda r: [r.get(f) for f in fields])
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--compress", action="store_true", help="offer permessage-deflate")
    parser.add_argument("--per-address", type=int, default=25_000,
                        help="most connections per address (the port range caps it)")  # fmt: skip
    parser.add_argument("--load-procs", type=int, default=3, help="at least this many")
    parser.add_argument("--in-flight", type=int, default=64, help="handshakes per load process")
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--trickle-rate", type=float, default=1.0, help="msg/s per topic")
    parser.add_argument("--trickle-seconds", type=float, default=10.0)
    parser.add_argument("--drain-seconds", type=float, default=15.0,
                        help="wait this long after the last publish for deliveries")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900.0, help="hard timeout, seconds")
    parser.add_argument("--no-clamp", action="store_true", help="try N even if it cannot fit")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # the broker's processes inherit it (and the workers raise their own)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _term)
    signal.alarm(int(args.timeout))
    try:
        result = run(args)
    finally:
        signal.alarm(0)
    save(result, args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
