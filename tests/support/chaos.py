"""The chaos harness shared by `bench/chaos.py` (the table) and `tests/faults/test_chaos.py`
(pass/fail): a real `redwire serve --workers 2` against a Redis of its own (optionally behind
tests/support/tcp_proxy.py), faults on a timeline, and independent clients that count.

The clients are the plain `websockets` library speaking docs/protocol.md JSON — not our SDK,
and they never dedupe: whatever they receive is what a naive client would show its user.
Publishers send `{"seq": n, "pub": id}` (n = 0, 1, 2, ... per publisher id) at a paced rate
and record each publish's outcome (acked with offset/epoch, `unavailable`, `outcome_unknown`,
another error, no reply). Subscribers record every frame they get, in arrival order:
messages (offset, epoch, pub, seq), `gap` frames, subscribe acks and errors, connection
closes. On a history topic a subscriber reconnects and resubscribes with `since` = the last
(offset, epoch) it saw; on a plain topic it resubscribes plainly. `analyse` turns the
records into the metrics of one scenario per topic kind (see `TopicMetrics`).

Load stays bounded (≤ ~2000 msg/s published, ≤ 250 clients): the machine has 2 cores and the
verdicts are on counts, never on timing. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import websockets

from support.processes import REPO, ServerProcess, free_port, redwire, worker_pids
from support.tcp_proxy import TcpProxy

HISTORY_PREFIX = "chaos.h."  # topics with history: a TOML rule with HISTORY_SIZE
PLAIN_PREFIX = "chaos.p."  # topics without history
HISTORY_SIZE = 100_000
MIB = 1024 * 1024
KINDS = ("history", "plain")

REPLY_SETTLE_S = 12.0  # after publishing stops: the longest wait for outstanding replies
DELIVERY_SETTLE_S = 8.0  # then: the longest wait for subscribers to catch up
CONNECT_TIMEOUT_S = 10.0
SUBSCRIBE_TIMEOUT_S = 10.0
MAX_INFLIGHT = 4000  # publishes awaiting a reply per publisher; more: the tick is skipped
TICK_S = 0.01  # publisher pacing interval

# Broker settings for every scenario (TOML [redwire] keys); faults are detected quickly.
BROKER_SETTINGS: dict[str, Any] = {
    "log_level": "WARNING",
    "bus_reconnect_min_s": 0.05,
    "bus_reconnect_max_s": 0.5,
    "bus_probe_interval_s": 0.5,
    "bus_probe_timeout_s": 2.0,
    "bus_publish_timeout_s": 3.0,
    "bus_connect_timeout_s": 3.0,
    "close_timeout_s": 2.0,
    "drain_timeout_s": 5.0,
    "worker_restart_delay_s": 0.2,
    "ping_interval_s": 60.0,
}


def now() -> float:
    return time.monotonic()


# --- Redis of the harness's own --------------------------------------------------------------


class ChaosRedis:
    """A `redis-server` on a free loopback port, in a directory of its own; with `aof`, every
    write is fsynced before the reply (`appendfsync always`), so kill -9 loses nothing acked."""

    def __init__(self, *, aof: bool = False) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: apt-get install -y redis-server"
        self.binary = binary
        self.aof = aof
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redwire-chaos-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else [
            "--appendonly", "no"]  # fmt: skip
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            *persistence, "--dir", self.dir, "--logfile", f"{self.dir}/redis.log",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = now() + timeout_s
        while now() < deadline:
            if self._ping():
                return
            time.sleep(0.02)  # polling another process until it answers (bounded)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the broker -------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def start_broker(
    redis_url: str, workdir: str, extra: dict[str, Any] | None = None
) -> ServerProcess:
    """`redwire serve --workers 2 --redis URL --config chaos.toml` on a free port."""
    settings = {**BROKER_SETTINGS, "channel_prefix": f"chaos{os.getpid()}:", **(extra or {})}
    lines = ["[redwire]", *(f"{k} = {_toml_value(v)}" for k, v in settings.items()), ""]
    lines += ["[[redwire.topics]]", f'pattern = "{HISTORY_PREFIX}*"',
              f"history_size = {HISTORY_SIZE}", ""]  # fmt: skip
    path = Path(workdir) / "chaos.toml"
    path.write_text("\n".join(lines))
    argv = redwire(
        "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
        "--redis", redis_url, "--config", str(path),
    )  # fmt: skip
    # CHAOS_BROKER_ROOT: run the broker from another checkout (e.g. `git archive HEAD`) to
    # compare a rewrite in progress with what is committed; the clients stay the same.
    cwd = os.environ.get("CHAOS_BROKER_ROOT") or REPO
    level = os.environ.get("CHAOS_LOG_LEVEL", "WARNING")  # INFO: more broker lines in notes
    return ServerProcess(argv, env={"REDWIRE_LOG_LEVEL": level}, cwd=cwd)


# --- records ----------------------------------------------------------------------------------


@dataclass(eq=False)
class PubRecord:
    """One publish: what the publisher sent and what it was told."""

    pub: str
    seq: int
    sent_t: float
    # acked | unavailable | outcome_unknown | error:CODE | no_reply | timeout
    outcome: str = "pending"
    offset: int | None = None
    epoch: str | None = None
    reply_t: float | None = None


class Harness:
    """Shared state of one scenario run: topics, records, the epoch timeline, the clients."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.topics = {"history": f"{HISTORY_PREFIX}{name}", "plain": f"{PLAIN_PREFIX}{name}"}
        self.records: dict[str, dict[tuple[str, int], PubRecord]] = {k: {} for k in KINDS}
        self.epochs: dict[str, list[str]] = {k: [] for k in KINDS}  # first-seen order
        self.publishers: list[Publisher] = []
        self.subscribers: list[Subscriber] = []
        self.changed = asyncio.Event()  # set on every frame; waiters re-check their condition
        self.url = ""
        self.fault_t: float | None = None  # when the fault began (monotonic)
        self.fault_end_t: float | None = None
        self.notes: list[str] = []

    def note_epoch(self, kind: str, epoch: Any) -> None:
        if isinstance(epoch, str) and epoch not in self.epochs[kind]:
            self.epochs[kind].append(epoch)

    async def until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds, re-checked after every frame; False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
            return True
        except TimeoutError:
            return predicate()


def _close_code(ws: Any) -> int:
    rcvd = ws.protocol.close_rcvd
    return rcvd.code if rcvd is not None else 1006


async def open_ws(url: str, *, small_rcvbuf: bool = False, max_queue: int = 64) -> Any:
    """A `websockets` connection speaking redwire.json, no keepalive, no compression."""
    kwargs: dict[str, Any] = dict(
        subprotocols=["redwire.json"], max_size=None, ping_interval=None, compression=None,
        open_timeout=CONNECT_TIMEOUT_S, close_timeout=2, max_queue=max_queue,
    )  # fmt: skip
    if small_rcvbuf:  # a reader that stops reading is felt by the server within a few KB
        host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (host, int(port))), CONNECT_TIMEOUT_S
        )
        kwargs["sock"] = sock
    return await websockets.connect(url, **kwargs)


def _backoff(code: int) -> float:
    """Reconnect delay by close code (docs/protocol.md): 1001 at once, else a short jitter."""
    return 0.0 if code == 1001 else random.uniform(0.05, 0.5)


_req_ids = itertools.count(1)


# --- publishers -------------------------------------------------------------------------------


class Publisher:
    """Publishes `{"seq": n, "pub": id}` to one topic at `rate`/s, pipelined; reconnects."""

    def __init__(
        self, h: Harness, kind: str, pub_id: str, rate: float, *, pad: int = 0,
        prefer_worker: str | None = None,
    ) -> None:  # fmt: skip
        self.h, self.kind, self.pub_id, self.rate = h, kind, pub_id, rate
        self.topic = h.topics[kind]
        h.records.setdefault(kind, {})
        self.pad = "x" * pad
        self.prefer_worker = prefer_worker
        self.seq = 0
        self.pending: dict[int, PubRecord] = {}
        self.closes: Counter[int] = Counter()
        self.ws: Any = None
        self.worker: str | None = None
        self._reader: asyncio.Task[None] | None = None
        h.publishers.append(self)

    async def connect(self) -> bool:
        try:
            for _ in range(20 if self.prefer_worker else 1):
                ws = await open_ws(self.h.url)
                welcome = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT_S))
                if self.prefer_worker in (None, welcome.get("worker")):
                    break
                await ws.close()
            self.prefer_worker = None  # only the first connection is placed
        except (OSError, TimeoutError, websockets.WebSocketException):
            return False
        self.ws, self.worker = ws, welcome.get("worker")
        self._reader = asyncio.create_task(self._read(ws))
        return True

    async def _read(self, ws: Any) -> None:
        try:
            async for raw in ws:
                frame = json.loads(raw)
                rec = self.pending.pop(frame.get("id"), None)
                if rec is None:
                    continue
                rec.reply_t = now()
                if frame.get("op") == "ack":
                    rec.outcome = "acked"
                    rec.offset, rec.epoch = frame.get("offset"), frame.get("epoch")
                    self.h.note_epoch(self.kind, rec.epoch)
                elif frame.get("op") == "error":
                    code = frame.get("code")
                    known = code in ("unavailable", "outcome_unknown")
                    rec.outcome = code if known else f"error:{code}"
                self.h.changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closes[_close_code(ws)] += 1
            for rec in self.pending.values():
                rec.outcome = "no_reply"  # the connection ended first: it may have landed
            self.pending.clear()
            if self.ws is ws:
                self.ws = None
            self.h.changed.set()

    async def run(self, t0: float, stop_at: float) -> None:
        """Publish from t0 until stop_at; then wait (bounded) for the replies."""
        scheduled = 0
        next_connect = 0.0
        while (t := now()) < stop_at:
            due = int((t - t0) * self.rate)
            if self.ws is None:
                scheduled = due  # nothing is sent while disconnected
                if t >= next_connect and not await self.connect():
                    next_connect = now() + _backoff(1006)
                elif self.ws is None:
                    await asyncio.sleep(TICK_S)  # pacing the reconnect attempts
                continue
            if len(self.pending) >= MAX_INFLIGHT or due - scheduled > self.rate:
                scheduled = due  # too far behind (the server pushes back): skip, don't burst
            ws = self.ws
            try:
                while scheduled < due and self.ws is ws:
                    scheduled += 1
                    await self._send(ws)
            except websockets.ConnectionClosed:
                pass
            await asyncio.sleep(TICK_S)  # pacing: the publish rate is the scenario
        await self.h.until(lambda: not self.pending, REPLY_SETTLE_S)
        for rec in self.pending.values():
            rec.outcome = "timeout"
        self.pending.clear()

    async def _send(self, ws: Any) -> None:
        rec = PubRecord(self.pub_id, self.seq, now())
        self.seq += 1
        req_id = next(_req_ids)
        data: dict[str, Any] = {"seq": rec.seq, "pub": self.pub_id}
        if self.pad:
            data["pad"] = self.pad
        self.pending[req_id] = rec
        self.h.records[self.kind][(rec.pub, rec.seq)] = rec
        try:
            await ws.send(json.dumps({"op": "publish", "topic": self.topic, "data": data,
                                      "id": req_id}))  # fmt: skip
        except websockets.ConnectionClosed:
            if self.pending.pop(req_id, None) is not None:
                rec.outcome = "no_reply"
            raise

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 5)


# --- subscribers ------------------------------------------------------------------------------

Event = tuple[Any, ...]  # ("m", pub, seq, offset, epoch) | ("g", frame, epoch_then) |
#   ("a", since, ack) | ("e", error) | ("c", close_code)  — in arrival order


class Subscriber:
    """One connection subscribed to one topic; records everything; never dedupes."""

    def __init__(
        self, h: Harness, kind: str, name: str, *, since: tuple[str, int] | None = None,
        role: str = "live", prefer_worker: str | None = None, small_rcvbuf: bool = False,
        extra_topics: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.h, self.kind, self.name, self.role = h, kind, name, role
        self.topic = h.topics[kind]
        self.history = kind == "history"
        self.first_since = since
        self.position: tuple[str, int] | None = since  # (epoch, offset)
        self.prefer_worker = prefer_worker
        self.small_rcvbuf = small_rcvbuf
        self.extra_topics = extra_topics  # subscribed on the first connection only, not counted
        self.events: list[Event] = []
        self.subscribed_before_publishing = False
        self.long_lived = True  # subscribed until the end of the run
        self.acked = asyncio.Event()
        self.last_ack_t = 0.0
        self.workers: list[str] = []
        self.last_seq: dict[str, int] = {}
        self.ws: Any = None
        self._stopping = False
        self._bouncing = False
        self._reading = asyncio.Event()
        self._reading.set()
        self._task: asyncio.Task[None] | None = None
        h.subscribers.append(self)

    # control --------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def pause(self) -> None:
        """Stop reading (the socket fills, the server sees a slow consumer)."""
        self._reading.clear()

    def resume(self) -> None:
        """Read again, with a normal receive buffer (the backlog drains at loopback speed)."""
        sock = self.ws.transport.get_extra_info("socket") if self.ws is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._reading.set()

    async def bounce(self) -> None:
        """Close this connection (1000) and reconnect at once: client churn."""
        if self.ws is not None and not self._bouncing:
            self._bouncing = True
            await self.ws.close()

    async def stop(self) -> None:
        self._stopping = True
        self._reading.set()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    # the connection loop --------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            code = await self._session()
            if self._stopping:
                return
            delay = 0.0 if self._bouncing else _backoff(code)
            self._bouncing = False
            await asyncio.sleep(delay)  # reconnect backoff (pacing, per the close-code table)

    async def _session(self) -> int:
        try:
            for _ in range(20 if self.prefer_worker else 1):
                ws = await open_ws(self.h.url, small_rcvbuf=self.small_rcvbuf, max_queue=16)
                welcome = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT_S))
                if self.prefer_worker in (None, welcome.get("worker")):
                    break
                await ws.close()
            self.prefer_worker = None
        except (OSError, TimeoutError, websockets.WebSocketException):
            self.events.append(("c", 1006))
            return 1006
        finally:
            self.small_rcvbuf = False  # only the first connection is the stalled one
        self.ws = ws
        self.workers.append(str(welcome.get("worker")))
        self._sub_ids: set[int] = set()
        await self._subscribe(ws)
        for topic in self.extra_topics:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(json.dumps({"op": "subscribe", "topic": topic}))
        self.extra_topics = ()
        try:
            while True:
                await self._reading.wait()
                raw = await ws.recv()
                self._frame(ws, json.loads(raw))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.ws = None
        code = _close_code(ws)
        if not self._stopping:  # the harness's own final close is no break
            self.events.append(("c", code))
        self.h.changed.set()
        return code

    async def _subscribe(self, ws: Any) -> None:
        req_id = next(_req_ids)
        self._sub_ids.add(req_id)
        request: dict[str, Any] = {"op": "subscribe", "topic": self.topic, "id": req_id}
        since = self.position if self.history else None
        if since is not None:
            request["since"] = {"epoch": since[0], "offset": since[1]}
        self._pending_since = since
        self._sub_sent_t = now()
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(json.dumps(request))

    def _frame(self, ws: Any, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == "message" and frame.get("topic") == self.topic:
            data = frame.get("data") or {}
            pub, seq = data.get("pub"), data.get("seq")
            offset, epoch = frame.get("offset"), frame.get("epoch")
            self.events.append(("m", pub, seq, offset, epoch))
            if isinstance(seq, int):
                self.last_seq[pub] = max(seq, self.last_seq.get(pub, -1))
            if offset is not None and epoch is not None:
                self.position = (epoch, offset)
                self.h.note_epoch(self.kind, epoch)
        elif op == "gap" and frame.get("topic") == self.topic:
            epoch_then = frame.get("epoch") or (self.position[0] if self.position else None)
            self.events.append(("g", frame, epoch_then))
            if frame.get("to") is not None and epoch_then is not None:
                self.position = (epoch_then, frame["to"])
            self.h.note_epoch(self.kind, frame.get("epoch"))
        elif op == "ack" and frame.get("id") in self._sub_ids:
            self.events.append(("a", self._pending_since, frame))
            if frame.get("epoch") is not None and frame.get("offset") is not None:
                self.position = (frame["epoch"], frame["offset"])
                self.h.note_epoch(self.kind, frame["epoch"])
            self.last_ack_t = now()
            self.acked.set()
        elif op == "error" and frame.get("id") in self._sub_ids:
            self.events.append(("e", frame.get("code")))
            self._retry = asyncio.create_task(self._retry_subscribe(ws))
        self.h.changed.set()

    async def _retry_subscribe(self, ws: Any) -> None:
        await asyncio.sleep(random.uniform(0.1, 0.5))  # retry pacing after a refused subscribe
        if self.ws is ws and not self._stopping:
            await self._subscribe(ws)

    # analysis helpers -----------------------------------------------------------------------

    @property
    def disconnects(self) -> int:
        return sum(1 for e in self.events if e[0] == "c")

    def close_codes(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "c"]


# --- analysis ---------------------------------------------------------------------------------


@dataclass
class TopicMetrics:
    """One scenario by topic kind. Counts are of messages unless the name says otherwise."""

    scenario: str
    kind: str
    published: int = 0  # acked publishes
    delivered: int = 0  # message frames received, all subscribers, duplicates included
    duplicates: int = 0  # the same (pub, seq) again to one subscriber
    reorders: int = 0  # a seq lower than one seen before, same publisher, same subscriber
    lost: int = 0  # (subscriber, message) pairs: acked, expected there, never delivered
    announced: int = 0  # lost and covered by a gap frame, a recovered:false ack or a break
    unannounced: int = 0  # lost and not announced
    false_unavailable: int = 0  # refused as `unavailable` (not published) but delivered
    outcome_unknown: int = 0
    unavailable: int = 0
    timeouts: int = 0  # no reply: the connection ended first, or none within the settle time
    other_errors: int = 0
    lost_kept: int = 0  # history: lost although in the final epoch, whose history keeps it
    lost_before_fault: int = 0  # lost although acked before the fault began
    subscribers: int = 0
    reconnects: int = 0  # subscriber connection breaks, voluntary ones included
    gap_frames: int = 0
    epochs: int = 0
    never_subscribed: int = 0  # subscribers never acked (their losses are not counted)
    slow_close_codes: list[int] = field(default_factory=list)  # role "slow": closes seen
    lost_by_role: dict[str, int] = field(default_factory=dict)
    closes_by_role: dict[str, dict[int, int]] = field(default_factory=dict)  # breaks by code
    examples: list[str] = field(default_factory=list)  # a few unannounced losses, described

    def row(self) -> list[Any]:
        return [f"{self.scenario}/{self.kind}", self.published, self.delivered, self.duplicates,
                self.reorders, self.lost, self.announced, self.unannounced,
                self.false_unavailable, self.outcome_unknown, self.unavailable,
                self.timeouts, self.lost_kept]  # fmt: skip


COLUMNS = ["scenario/topic", "published", "delivered", "dup", "reorder", "lost", "announced",
           "unannounced", "false-unavail", "outcome-unknown", "unavail", "no-reply",
           "lost-kept"]  # fmt: skip


def table(rows: list[TopicMetrics]) -> str:
    cells = [COLUMNS, *([str(c) for c in m.row()] for m in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in cells]  # fmt: skip
    return "\n".join(lines)


def _breaks(events: list[Event], history: bool) -> list[int]:
    """Indices of the events that tell a subscriber 'something may be missing here' without
    naming offsets: a connection break, a refused subscribe, a gap without a range."""
    out = []
    for i, e in enumerate(events):
        if e[0] in ("c", "e") or (e[0] == "g" and (not history or e[1].get("from") is None)):
            out.append(i)
    return out


def _context(
    events: list[Event], r: PubRecord, by_pub: dict[str, list[tuple[int, int]]], width: int = 12
) -> str:
    """The subscriber's frames around a lost message, compressed: runs of consecutive seqs of
    one publisher as `pub:first-last`, other events by kind (gap frames whole)."""
    seqs = by_pub.get(r.pub, [])
    j = bisect.bisect_left(seqs, (r.seq, -1))
    before = seqs[j - 1][1] if j > 0 else 0
    out: list[str] = []
    run: list[Any] | None = None
    for e in events[max(0, before - 3) :]:
        if e[0] == "m" and run and run[0] == e[1] and e[2] == run[2] + 1:
            run[2] = e[2]
            continue
        if run:
            out.append(f"{run[0]}:{run[1]}-{run[2]}")
            run = None
        if e[0] == "m":
            run = [e[1], e[2], e[2]]
        elif e[0] == "g":
            out.append("gap" + json.dumps({k: v for k, v in e[1].items() if k != "op"}))
        elif e[0] == "a":
            out.append(f"ack(since={e[1]}, {e[2].get('epoch')}:{e[2].get('offset')}, "
                       f"recovered={e[2].get('recovered')})")  # fmt: skip
        else:
            out.append(f"{'close' if e[0] == 'c' else 'suberror'}({e[1]})")
        if len(out) >= width:
            break
    if run and len(out) < width:
        out.append(f"{run[0]}:{run[1]}-{run[2]}")
    return " ".join(out)


def analyse(h: Harness, kind: str) -> TopicMetrics:
    m = TopicMetrics(h.name, kind)
    records = h.records[kind]
    history = kind == "history"
    rank = {e: i for i, e in enumerate(h.epochs[kind])}
    m.epochs = len(rank)
    for rec in records.values():
        if rec.outcome == "acked":
            m.published += 1
        elif rec.outcome == "unavailable":
            m.unavailable += 1
        elif rec.outcome == "outcome_unknown":
            m.outcome_unknown += 1
        elif rec.outcome in ("no_reply", "timeout", "pending"):
            m.timeouts += 1
        else:
            m.other_errors += 1
    acked = [r for r in records.values() if r.outcome == "acked"]
    final_epoch = h.epochs[kind][-1] if h.epochs[kind] else None
    false_unavailable: set[tuple[str, int]] = set()
    lost_by_role: Counter[str] = Counter()

    def key(epoch: Any, offset: Any) -> tuple[int, int]:
        return (rank.get(epoch, -1), offset if isinstance(offset, int) else -1)

    for sub in (s for s in h.subscribers if s.kind == kind):
        m.subscribers += 1
        events = sub.events
        m.reconnects += sub.disconnects
        m.gap_frames += sum(1 for e in events if e[0] == "g")
        if sub.role == "slow":
            m.slow_close_codes.extend(sub.close_codes())
        for code in sub.close_codes():
            by_code = m.closes_by_role.setdefault(sub.role, {})
            by_code[code] = by_code.get(code, 0) + 1
        seen: Counter[tuple[str, int]] = Counter()
        max_seq: dict[str, int] = {}
        first_idx: dict[tuple[str, int], int] = {}
        for i, e in enumerate(events):
            if e[0] != "m":
                continue
            _, pub, seq, _, _ = e
            m.delivered += 1
            ident = (pub, seq)
            seen[ident] += 1
            first_idx.setdefault(ident, i)
            if not isinstance(seq, int):
                continue
            if seq < max_seq.get(pub, -1):
                m.reorders += 1
            max_seq[pub] = max(seq, max_seq.get(pub, -1))
            rec = records.get(ident)  # type: ignore[arg-type]
            if rec is not None and rec.outcome == "unavailable":
                false_unavailable.add(ident)  # type: ignore[arg-type]
        m.duplicates += sum(c - 1 for c in seen.values() if c > 1)
        acks = [e for e in events if e[0] == "a"]
        if not acks:
            m.never_subscribed += 1
            continue

        # what this subscriber should have received
        if history:
            first = acks[0][2]
            start = sub.first_since or (first.get("epoch"), first.get("offset"))
            end = None if sub.long_lived else sub.position
            lo = key(*start)
            hi = key(*end) if end else None
            expected = [r for r in acked if key(r.epoch, r.offset) > lo
                        and (hi is None or key(r.epoch, r.offset) <= hi)]  # fmt: skip
        else:
            got: dict[str, list[int]] = {}
            for pub, seq in seen:
                if isinstance(seq, int):
                    got.setdefault(pub, []).append(seq)
            bounds = {p: (min(v), max(v)) for p, v in got.items()}
            expected = []
            for r in acked:
                lo_seq, hi_seq = bounds.get(r.pub, (None, None))
                if not sub.subscribed_before_publishing and lo_seq is None:
                    continue
                if not sub.subscribed_before_publishing and r.seq < lo_seq:  # type: ignore[operator]
                    continue
                if not sub.long_lived and (hi_seq is None or r.seq > hi_seq):
                    continue
                expected.append(r)
        lost = [r for r in expected if (r.pub, r.seq) not in seen]
        if not lost:
            continue

        # was each loss announced?
        ranges = []  # (epoch, from, to) of history gap frames
        for e in events:
            if e[0] == "g" and history and e[1].get("from") is not None:
                to = e[1].get("to")
                ranges.append((e[2], e[1]["from"], to if to is not None else float("inf")))
        unrecovered = []  # (since, ack position) of recovered:false acks
        for e in acks:
            if e[1] is not None and e[2].get("recovered") is False:
                unrecovered.append((e[1], (e[2].get("epoch"), e[2].get("offset"))))
        breaks = _breaks(events, history)
        by_pub: dict[str, list[tuple[int, int]]] = {}
        for (pub, seq), i in first_idx.items():
            if isinstance(seq, int):
                by_pub.setdefault(pub, []).append((seq, i))
        for v in by_pub.values():
            v.sort()

        def announced(
            r: PubRecord,
            ranges: list[Any] = ranges,
            unrecovered: list[Any] = unrecovered,
            by_pub: dict[str, list[tuple[int, int]]] = by_pub,
            events: list[Event] = events,
            breaks: list[int] = breaks,
        ) -> bool:
            if history:
                for epoch, lo_off, hi_off in ranges:
                    if r.epoch == epoch and lo_off <= (r.offset or 0) <= hi_off:
                        return True
                for since, pos in unrecovered:
                    if r.epoch == since[0] and (r.offset or 0) > since[1]:
                        return True
                    if rank.get(since[0], -1) < rank.get(r.epoch, -1) and key(
                        r.epoch, r.offset
                    ) <= key(*pos):
                        return True
            seqs = by_pub.get(r.pub, [])
            j = bisect.bisect_left(seqs, (r.seq, -1))
            before = seqs[j - 1][1] if j > 0 else -1
            after = seqs[j][1] if j < len(seqs) else len(events)
            k = bisect.bisect_right(breaks, before)
            return k < len(breaks) and breaks[k] < after

        for r in lost:
            m.lost += 1
            lost_by_role[sub.role] += 1
            if h.fault_t is not None and r.reply_t is not None and r.reply_t < h.fault_t:
                m.lost_before_fault += 1
            if history and r.epoch == final_epoch:
                m.lost_kept += 1
            if announced(r):
                m.announced += 1
            else:
                m.unannounced += 1
                if len(m.examples) < 5:
                    m.examples.append(
                        f"{sub.name} ({sub.role}, workers {sub.workers}, closes "
                        f"{sub.close_codes()}): pub {r.pub} seq {r.seq} offset {r.offset} "
                        f"epoch {r.epoch}; around it: {_context(events, r, by_pub)}"
                    )
    m.false_unavailable = len(false_unavailable)
    m.lost_by_role = dict(lost_by_role)
    return m


# --- scenarios --------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a scenario's hooks get: the harness, the processes, the timeline."""

    h: Harness
    redis: ChaosRedis
    proxy: TcpProxy | None
    broker: ServerProcess
    duration_s: float
    t0: float = 0.0
    stop_at: float = 0.0

    def worker_pid(self, worker: str) -> int:
        return worker_pids(self.broker.proc.pid)[worker]

    async def at_fault(self) -> None:
        """Sleep until the fault is due: the scenario's timeline, not synchronisation."""
        await asyncio.sleep(max(0.0, self.t0 + fault_start(self.duration_s) - now()))  # pacing

    def fault_began(self) -> None:
        self.h.fault_t = now()

    def fault_ended(self) -> None:
        self.h.fault_end_t = now()


@dataclass
class Scenario:
    """One line of the table (two, one per topic kind)."""

    name: str
    doc: str
    rate: float = 200.0  # msg/s per topic, split over `publishers` publishers
    publishers: int = 2
    subscribers: int = 4  # long-lived subscribers per topic
    pad: int = 0  # extra payload bytes per message
    aof: bool = False
    proxy: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    fault_s: float = 0.0  # how long the fault lasts (the run is stretched to hold it)
    setup: Callable[[Ctx], None] | None = None  # extra clients before publishing starts
    during: Callable[[Ctx], Awaitable[None]] | None = None  # the fault / the extra activity

    def run_seconds(self, duration_s: float) -> float:
        """Stretched to hold the fault and 2 s of publishing after it."""
        return max(duration_s, fault_start(duration_s) + self.fault_s + 2.0)


def fault_start(duration_s: float) -> float:
    """When a fault begins: a quarter into the run, at most 2 s (the rest shows recovery)."""
    return min(0.25 * duration_s, 2.0)


async def _kill_worker(c: Ctx) -> None:
    await c.at_fault()
    c.fault_began()
    os.kill(c.worker_pid("0"), signal.SIGKILL)
    c.fault_ended()


async def _drain_worker(c: Ctx) -> None:
    await c.at_fault()
    c.fault_began()
    os.kill(c.worker_pid("0"), signal.SIGTERM)  # that worker drains (1001) and is restarted
    c.fault_ended()


async def _redis_kill(c: Ctx) -> None:
    await c.at_fault()
    c.fault_began()
    await asyncio.to_thread(c.redis.kill)
    await asyncio.sleep(1.0)  # the fault's duration: Redis is down for 1 s
    await asyncio.to_thread(c.redis.start)
    c.fault_ended()


async def _redis_pause(c: Ctx) -> None:
    await c.at_fault()
    c.fault_began()
    c.redis.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(5.0)  # the fault's duration: Redis frozen for 5 s
    finally:
        c.redis.signal(signal.SIGCONT)
    c.fault_ended()


async def _redis_stall(c: Ctx) -> None:
    assert c.proxy is not None
    await c.at_fault()
    c.fault_began()
    links = c.proxy.stall()
    c.h.notes.append(f"stalled {links} worker-Redis links")
    try:
        await asyncio.sleep(8.0)  # the fault's duration: no byte either way for 8 s
    finally:
        c.proxy.resume()
    c.fault_ended()


BALLAST_RATE = 50  # msg/s of BALLAST_BYTES on the ballast topic while the slow readers stall
BALLAST_BYTES = 64 * 1024


def _slow_setup(c: Ctx) -> None:
    c.h.topics["ballast"] = f"{PLAIN_PREFIX}{c.h.name}-ballast"
    for kind in KINDS:
        Subscriber(c.h, kind, f"slow-{kind}", role="slow", small_rcvbuf=True,
                   extra_topics=(c.h.topics["ballast"],))  # fmt: skip


async def _slow_consumer(c: Ctx) -> None:
    await c.at_fault()
    c.fault_began()
    slow = [s for s in c.h.subscribers if s.role == "slow"]
    for s in slow:
        s.pause()
    # Only the stalled readers take the ballast topic: they fall megabytes behind within a
    # second or two (past the kernel's socket buffers and the cap), while the readers that
    # keep reading get small messages and stay far from the cap however the CPU is shared.
    ballast = Publisher(c.h, "ballast", "ballast", BALLAST_RATE, pad=BALLAST_BYTES)
    await ballast.run(now(), c.stop_at)  # it stays stalled to the end of publishing
    for s in slow:
        s.resume()  # it reads its backlog, sees the close, reconnects (and recovers)
    c.fault_ended()


async def _subscribe_live(c: Ctx, total: int = 150, plain: int = 50) -> None:
    """`total` subscribes with `since` on the history topic (and `plain` plain subscribes)
    spread over the run while the long-lived subscribers are live; each stays until it is
    20 messages past its ack, then closes."""
    live = next(s for s in c.h.subscribers if s.kind == "history" and s.role == "live")
    span = c.duration_s * 0.7
    joins: list[tuple[Subscriber, int]] = []
    done: list[asyncio.Task[None]] = []
    rng = random.Random(8)

    async def one(i: int, kind: str) -> None:
        since = None
        if kind == "history" and live.position is not None:
            epoch, offset = live.position
            since = (epoch, max(0, offset - rng.randint(0, 200)))
        sub = Subscriber(c.h, kind, f"late-{kind}-{i}", since=since, role="late")
        sub.long_lived = False
        sub.start()
        await c.h.until(sub.acked.is_set, SUBSCRIBE_TIMEOUT_S)
        ack = next((e[2] for e in sub.events if e[0] == "a"), {})
        target = (ack.get("offset") or 0) + 20
        bound = max(0.5, c.stop_at - now())  # no message comes once publishing is over
        if kind == "history":
            await c.h.until(lambda: sub.position is not None and sub.position[1] >= target, bound)
        else:
            count = len(sub.events)
            await c.h.until(lambda: len(sub.events) >= count + 20, bound)
        await sub.stop()

    plan = [("history", i) for i in range(total)] + [("plain", i) for i in range(plain)]
    rng.shuffle(plan)
    start = now()
    for n, (kind, i) in enumerate(plan):
        await asyncio.sleep(max(0.0, start + 0.5 + n * span / len(plan) - now()))  # pacing
        if now() > c.stop_at:
            break
        done.append(asyncio.create_task(one(i, kind)))
    del joins
    await asyncio.gather(*done)
    c.h.notes.append(f"{len(done)} subscribes while live ({total + plain} planned)")


def _churn_setup(c: Ctx) -> None:
    for kind in KINDS:
        for i in range(100):
            Subscriber(c.h, kind, f"churn-{kind}-{i}", role="churn")


async def _churn(c: Ctx, per_second: float = 50.0) -> None:
    """50 reconnect-and-resubscribes per second among the 200 churning clients."""
    churners = [s for s in c.h.subscribers if s.role == "churn"]
    rng = random.Random(10)
    start = now()
    n = 0
    while now() < c.stop_at - 1.0:
        n += 1
        await asyncio.sleep(max(0.0, start + n / per_second - now()))  # pacing of the churn
        c.h.fault_t = c.h.fault_t or now()
        await rng.choice(churners).bounce()


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("baseline", "no fault: publishers and subscribers on both workers", rate=300),
        Scenario(
            "subscribe_live",
            "1000 msg/s on the history topic; 150 subscribes with `since` (50 plain ones) "
            "while others are live",
            rate=1000,
            subscribers=2,
            during=_subscribe_live,
        ),
        Scenario(
            "churn",
            "200 clients (100 per topic), 50 reconnect+resubscribes/s (history ones with `since`)",
            rate=20,
            subscribers=2,
            setup=_churn_setup,
            during=_churn,
        ),
        Scenario(
            "kill_worker",
            "kill -9 worker 0; the supervisor restarts it",
            rate=300,
            during=_kill_worker,
        ),
        Scenario(
            "redis_kill",
            "kill -9 Redis (no persistence), restart after 1 s: it comes back empty",
            rate=300,
            fault_s=1.0,
            during=_redis_kill,
        ),
        Scenario(
            "redis_kill_aof",
            "the same with AOF (appendfsync always): nothing acked is lost, the epoch stays",
            rate=300,
            aof=True,
            fault_s=1.0,
            during=_redis_kill,
        ),
        Scenario(
            "redis_pause",
            "SIGSTOP Redis for 5 s, then SIGCONT",
            rate=300,
            fault_s=5.0,
            during=_redis_pause,
        ),
        Scenario(
            "redis_stall",
            "worker-Redis traffic stalled 8 s, sockets open (TCP proxy)",
            rate=300,
            proxy=True,
            fault_s=8.0,
            during=_redis_stall,
        ),
        Scenario(
            "slow_consumer",
            "one subscriber per topic stops reading (and also takes a 3 MB/s ballast topic); "
            "the others must lose nothing, it must get close 1013",
            rate=300,
            setup=_slow_setup,
            during=_slow_consumer,
            settings={
                "max_send_buffer_bytes": 2 * MIB,
                "write_buffer_high_bytes": 64 * 1024,
                "write_buffer_low_bytes": 16 * 1024,
                # the stalled reader reads again only when publishing ends: the server
                # must not give up on its close handshake (and reset) before that
                "close_timeout_s": 30.0,
            },
        ),
        Scenario(
            "drain",
            "SIGTERM worker 0 (drain, close 1001); clients reconnect to the other worker",
            rate=300,
            during=_drain_worker,
        ),
    ]
}


@dataclass
class ScenarioResult:
    name: str
    seconds: float
    metrics: dict[str, TopicMetrics]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.name, "doc": SCENARIOS[self.name].doc, "seconds": self.seconds,
                "notes": self.notes,
                "topics": {k: asdict(v) for k, v in self.metrics.items()}}  # fmt: skip


def _caught_up(h: Harness) -> bool:
    last: dict[tuple[str, str], int] = {}
    for kind in KINDS:
        for rec in h.records[kind].values():
            if rec.outcome == "acked":
                k = (kind, rec.pub)
                last[k] = max(last.get(k, -1), rec.seq)
    last_reply = {k: max((r.reply_t or 0.0 for r in h.records[k].values()), default=0.0)
                  for k in KINDS}  # fmt: skip
    for sub in h.subscribers:
        if not sub.long_lived or not sub.acked.is_set():
            continue
        if not sub.history and sub.last_ack_t > last_reply[sub.kind]:
            continue  # resubscribed after the last publish: nothing more can come
        for (kind, pub), seq in last.items():
            if kind == sub.kind and sub.last_seq.get(pub, -1) < seq:
                return False
    return True


async def run_scenario(
    name: str, duration_s: float, *, settle_s: float = DELIVERY_SETTLE_S
) -> ScenarioResult:
    """Run one scenario end to end (its own Redis, broker and clients) and analyse it;
    `settle_s` bounds the wait for subscribers to catch up once publishing is over."""
    spec = SCENARIOS[name]
    duration_s = spec.run_seconds(duration_s)
    h = Harness(name)
    started = now()
    phases: dict[str, float] = {}
    workdir = tempfile.mkdtemp(prefix="redwire-chaos-")
    redis = await asyncio.to_thread(ChaosRedis, aof=spec.aof)
    proxy: TcpProxy | None = None
    broker: ServerProcess | None = None
    try:
        target = redis.url
        if spec.proxy:
            proxy = TcpProxy(redis.port)
            await proxy.start()
            target = proxy.url
        broker = await asyncio.to_thread(start_broker, target, workdir, spec.settings)
        h.url = broker.url + "/"
        ctx = Ctx(h, redis, proxy, broker, duration_s)
        per_pub = spec.rate / spec.publishers
        for kind in KINDS:
            for i in range(spec.publishers):
                Publisher(h, kind, f"{kind[0]}{i}", per_pub, pad=spec.pad,
                          prefer_worker=str(i % 2))  # fmt: skip
            for i in range(spec.subscribers):
                Subscriber(h, kind, f"{kind}-{i}", prefer_worker=str(i % 2))
        if spec.setup is not None:
            spec.setup(ctx)
        subs = list(h.subscribers)
        for batch in range(0, len(subs), 50):  # connect in batches: 200 at once is a storm
            for sub in subs[batch : batch + 50]:
                sub.start()
            await h.until(lambda b=batch: all(s.acked.is_set() for s in subs[b : b + 50]), 20)
        for sub in subs:
            sub.subscribed_before_publishing = sub.acked.is_set()
        if not all(s.acked.is_set() for s in subs):
            h.notes.append(f"{sum(not s.acked.is_set() for s in subs)} subscribers not acked "
                           "before publishing")  # fmt: skip
        ctx.t0 = now()
        phases = {"start": ctx.t0 - started}
        ctx.stop_at = ctx.t0 + duration_s
        jobs: list[Awaitable[Any]] = [p.run(ctx.t0, ctx.stop_at) for p in h.publishers]
        if spec.during is not None:
            jobs.append(spec.during(ctx))
        await asyncio.gather(*jobs)
        phases["publish+replies"] = now() - ctx.t0
        t = now()
        if not await h.until(lambda: _caught_up(h), settle_s):
            h.notes.append("subscribers had not caught up when the settle time ran out")
        phases["catch-up"] = now() - t
    finally:
        t = now()
        for sub in h.subscribers:
            await sub.stop()
        for pub in h.publishers:
            with contextlib.suppress(Exception):
                await pub.close()
        if broker is not None:
            await asyncio.to_thread(broker.stop)
        if proxy is not None:
            await proxy.close()
        await asyncio.to_thread(redis.close)
        shutil.rmtree(workdir, ignore_errors=True)
    if "catch-up" in phases:
        phases["teardown"] = now() - t
        h.notes.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if broker is not None:  # what the broker complained about, for the diagnosis
        logged = [line.rstrip() for line in broker.output
                  if any(w in line for w in ("INFO", "WARNING", "ERROR", "Traceback"))]  # fmt: skip
        h.notes.extend(f"broker: {line[:300]}" for line in logged[:30])
        if len(logged) > 30:
            h.notes.append(f"broker: ... {len(logged) - 30} more warning/error lines")
    for pub in h.publishers:
        codes = {c: n for c, n in pub.closes.items() if c != 1000}
        if codes:
            h.notes.append(f"publisher {pub.kind}/{pub.pub_id} closes {codes}")
    metrics = {kind: analyse(h, kind) for kind in KINDS}
    return ScenarioResult(name, round(now() - started, 1), metrics, h.notes)


def guarantee_violations(result: ScenarioResult) -> list[str]:
    """What the guarantee (docs/guarantees.md) forbids, found in one scenario's metrics."""
    bad = []
    hist, plain = result.metrics["history"], result.metrics["plain"]
    if hist.duplicates:
        bad.append(f"history: {hist.duplicates} duplicates")
    if hist.reorders:
        bad.append(f"history: {hist.reorders} reorders")
    if hist.lost_kept:
        bad.append(f"history: {hist.lost_kept} lost although history keeps them")
    for m in (hist, plain):
        if m.unannounced:
            bad.append(f"{m.kind}: {m.unannounced} unannounced losses")
        if m.false_unavailable:
            bad.append(f"{m.kind}: {m.false_unavailable} delivered after `unavailable`")
        if m.never_subscribed:
            bad.append(f"{m.kind}: {m.never_subscribed} subscribers never acked")
        if m.published == 0:
            bad.append(f"{m.kind}: nothing was published")
    name = result.name
    if name == "redis_kill_aof":
        if hist.lost:
            bad.append(f"history: {hist.lost} lost across a restart with AOF")
        if hist.epochs != 1:
            bad.append(f"history: {hist.epochs} epochs across a restart with AOF (want 1)")
    if name == "slow_consumer":
        for m in (hist, plain):
            if 1013 not in m.slow_close_codes:
                bad.append(f"{m.kind}: the stalled subscriber saw closes "
                           f"{m.slow_close_codes}, not 1013")  # fmt: skip
            others = sum(v for k, v in m.lost_by_role.items() if k != "slow")
            if others:
                bad.append(f"{m.kind}: {others} lost by subscribers that kept reading")
    if name == "drain" and hist.lost_before_fault:
        bad.append(f"history: {hist.lost_before_fault} acked before the drain, not delivered")
    if name in ("baseline",):
        for m in (hist, plain):
            if m.lost:
                bad.append(f"{m.kind}: {m.lost} lost with no fault at all")
    return bad


def report(result: ScenarioResult) -> str:
    """The table of one scenario plus its notes and examples, for failure messages."""
    rows = list(result.metrics.values())
    lines = [table(rows)]
    for m in rows:
        extra = {k: getattr(m, k) for k in ("subscribers", "reconnects", "gap_frames", "epochs",
                                             "lost_before_fault", "lost_by_role", "closes_by_role",
                                             "slow_close_codes", "other_errors")}  # fmt: skip
        lines.append(f"{m.kind}: {extra}")
        lines.extend(f"  unannounced: {x}" for x in m.examples)
    lines.extend(f"note: {n}" for n in result.notes)
    return "\n".join(lines)
