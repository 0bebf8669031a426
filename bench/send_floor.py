"""The floor under one delivery: what a loopback `send()` costs the sending process here.

    python bench/send_floor.py [--sockets 100] [--count 20000] [--json]

No broker: one process sends 100-byte messages round-robin over N accepted TCP connections
(TCP_NODELAY, as the worker sets) to a child process that reads them with epoll, and
reports the sender's user and system CPU per `send()` from `getrusage`. Rows: back to back,
and 200 us apart (the receiver has gone back to sleep before each one, as in T1000-R5000,
where each subscriber gets one message every 20 ms), and the same spin with no send (the
control: its system time should be ~0).

Every delivery a broker makes that cannot be joined with another costs at least one such
`send()`, whatever the broker is written in: this is the part of deliveries per CPU-second
that no broker code can remove (docs/performance.md, "Why T1000 stays under 2x").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import time

MESSAGE = b"x" * 100


def _reader(port: int, sockets: int) -> None:
    """The child: connect `sockets` times, then read everything until the sender closes."""
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(sockets)]
    poller = select.epoll()
    by_fd = {conn.fileno(): conn for conn in conns}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    open_fds = set(by_fd)
    while open_fds:
        for fd, _ in poller.poll():
            if not by_fd[fd].recv(65536):
                poller.unregister(fd)
                open_fds.discard(fd)
    os._exit(0)


def _cost(
    conns: list[socket.socket], count: int, gap_s: float, *, send: bool = True
) -> dict[str, float | None]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(count):
        if send:
            conns[i % len(conns)].send(MESSAGE)
        if gap_s:
            until = time.perf_counter() + gap_s
            while time.perf_counter() < until:  # spin: sleeping would add wakeups of our own
                pass
    after = resource.getrusage(resource.RUSAGE_SELF)
    sys_us = (after.ru_stime - before.ru_stime) / count * 1e6
    # with a gap, user time is mostly the spin's, so it is not reported
    user_us = None if gap_s else round((after.ru_utime - before.ru_utime) / count * 1e6, 2)
    return {"sys_us_per_send": round(sys_us, 2), "user_us_per_send": user_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(args.sockets)
    port = listener.getsockname()[1]
    child = os.fork()
    if child == 0:
        listener.close()
        _reader(port, args.sockets)
    conns = [listener.accept()[0] for _ in range(args.sockets)]
    for conn in conns:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rows = [
        {"sends": "back to back", **_cost(conns, args.count, 0.0)},
        {"sends": "200 us apart", **_cost(conns, max(1, args.count // 4), 0.0002)},
        # the control: the same spin with no send costs ~0 sys, so the row above is the send's
        {"sends": "(spin, no send)", **_cost(conns, max(1, args.count // 4), 0.0002, send=False)},
    ]
    for conn in conns:
        conn.close()
    os.waitpid(child, 0)
    if args.json:
        print(json.dumps({"sockets": args.sockets, "rows": rows}))
        return
    print(f"loopback send() of {len(MESSAGE)} bytes over {args.sockets} sockets, sender's CPU")
    print(f"{'sends':16} {'sys us/send':>12} {'user us/send':>13}")
    for row in rows:
        user = row["user_us_per_send"]
        user_text = "-" if user is None else f"{user:.2f}"
        print(f"{row['sends']:16} {row['sys_us_per_send']:12.2f} {user_text:>13}")


if __name__ == "__main__":
    main()
