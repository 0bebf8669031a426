"""Entry point of one worker process: settings from the environment, uvloop, serve, drain.

    python -m worker echo  [--fd N | --host H --port P]
    python -m worker serve [--fd N | --host H --port P --reuse-port] --worker-id ID

Settings come from `REDWIRE_*` variables (the supervisor passes its own settings that way).
On SIGTERM or SIGINT the worker drains (close 1001 to every client) and exits 0. Once
listening it prints one line `listening <host> <port>` on stdout, for whoever started it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys

from broker.errors import ConfigError
from broker.settings import Settings
from worker.server import Server

log = logging.getLogger("redwire.worker")


def install_uvloop() -> bool:
    """Use uvloop when it is installed; the default asyncio loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("mode", choices=("echo", "serve"))
    parser.add_argument("--fd", type=int, help="inherited listening socket")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--worker-id", default="0")
    return parser.parse_args(argv)


def _make_app(mode: str, settings: Settings, worker_id: str):  # type: ignore[no-untyped-def]
    if mode == "echo":
        from worker.echo import EchoApp

        return EchoApp()
    from worker.broker_app import BrokerApp

    return BrokerApp(settings, worker_id=worker_id)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    app = _make_app(args.mode, settings, args.worker_id)
    starter = getattr(app, "start", None)
    if starter is not None:
        await starter()
    server = Server(app, settings)
    sock = socket.socket(fileno=args.fd) if args.fd is not None else None
    host, port = await server.start(sock=sock, reuse_port=args.reuse_port)
    _announce(f"listening {host} {port}")
    log.info("worker %s (%s) listening on %s:%d", args.worker_id, args.mode, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("worker %s draining", args.worker_id)
    await server.drain()
    stopper = getattr(app, "stop", None)
    if stopper is not None:
        await stopper()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides = {"host": args.host, "port": args.port}
    settings = Settings.load(overrides=overrides)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s worker-{args.worker_id} %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    install_uvloop()
    try:
        return asyncio.run(run(args, settings))
    except ConfigError as exc:
        sys.stderr.write(f"worker {args.worker_id}: {exc}\n")
        return 2


def _announce(line: str) -> None:
    """One status line on stdout, written in one call so other output cannot split it."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
