"""`redwire publish` and `redwire subscribe`: the Python client as a command, for scripts and
debugging (like `redis-cli` or `wscat`), JSON lines out.

    redwire publish prices '{"eur": 1.08}'          # prints the ack: {"offset":..,"epoch":..}
    redwire subscribe prices orders --count 10      # one JSON object per line

The `redwire` entry point lives in `broker.cli`, which parses the arguments; the broker
package never depends on the client (tests/test_packaging.py), so `broker.cli` loads this
module by name, and only for these two subcommands. Everything here goes through
`client.pubsub.connect`: the same reconnects, resubscriptions and gaps as any client.

Output of `subscribe`, one object per line, flushed at once:
- a message: `{"topic": T, "offset": N, "epoch": E, "data": D}` (offset and epoch are null on
  topics without history; bytes in msgpack data are base64 text);
- a gap (messages may be missing: a reconnect, a position history no longer holds, a `gap`
  frame): `{"gap": {"topic": T, "reason": R}}`.

Once every topic is subscribed, `redwire: subscribed to T ...` goes to stderr (a human or a
script knows that what is published from then on will be printed).

Exit codes: 0 done (`--count` reached, SIGINT or SIGTERM); 1 the broker refused or failed
(a publish error: its code and reason on stderr; no connection; a subscription ended by the
server); 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit

from broker.errors import ClientError, ConnectionClosedError, HandshakeError
from client.pubsub import PubSubClient, Subscription, connect
from client.subscriber import Gap, Message

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """An argument the parser accepted but this command cannot use."""


def parse_data(text: str) -> Any:
    """DATA as JSON, or the text itself when it is not JSON (`hello` is sent as "hello")."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_since(text: str) -> tuple[int, str]:
    """`OFFSET:EPOCH` → (offset, epoch); the epoch may itself contain colons."""
    offset, sep, epoch = text.partition(":")
    if not sep or not epoch:
        raise UsageError(f"--since must be OFFSET:EPOCH, got {text!r}")
    try:
        value = int(offset)
    except ValueError:
        raise UsageError(f"--since: offset must be an integer, got {offset!r}") from None
    if value < 0:
        raise UsageError("--since: offset must be >= 0")
    return value, epoch


def _jsonable(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=_jsonable)


def message_line(item: Message) -> str:
    return dumps(
        {"topic": item.topic, "offset": item.offset, "epoch": item.epoch, "data": item.data}
    )


def gap_line(topic: str, item: Gap) -> str:
    gap: dict[str, Any] = {"topic": topic, "reason": item.reason}
    for name in ("epoch", "first", "last"):
        value = getattr(item, name)
        if value is not None:
            gap[name] = value
    return dumps({"gap": gap})


def _error(message: str) -> None:
    print(f"redwire: {message}", file=sys.stderr)


def check_url(url: str) -> str:
    """A `ws://host[:port]/path` URL (this client does not do TLS), or UsageError."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        raise UsageError(f"--url: bad port in {url!r}") from None
    if parts.scheme != "ws" or not parts.hostname:
        raise UsageError(f"--url must be ws://HOST[:PORT]/ (no TLS in this client), got {url!r}")
    return url


async def _connect(args: argparse.Namespace) -> PubSubClient | None:
    """The client for `--url`, or None (the reason on stderr) when it cannot connect."""
    encoding = "msgpack" if args.msgpack else "json"
    try:
        return await connect(args.url, token=args.token, encoding=encoding)
    except (OSError, HandshakeError, ConnectionClosedError, TimeoutError) as exc:
        _error(f"cannot connect to {args.url}: {exc}")
        return None


async def publish(args: argparse.Namespace, out: TextIO) -> int:
    data = parse_data(args.data)
    client = await _connect(args)
    if client is None:
        return EXIT_FAILED
    async with client:
        try:
            ack = await client.publish(args.topic, data, key=args.key)
        except ClientError as exc:
            print(f"redwire: publish failed: {exc.code}: {exc.reason}", file=sys.stderr)
            return EXIT_FAILED
        except (ConnectionClosedError, TimeoutError) as exc:
            _error(f"publish failed: outcome_unknown: {exc}")
            return EXIT_FAILED
    print(dumps({k: v for k, v in ack.items() if k not in ("op", "id")}), file=out, flush=True)
    return EXIT_OK


class _Counter:
    """Messages printed so far, and the event that stops the command."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.seen = 0
        self.done = asyncio.Event()


async def _drain(sub: Subscription, out: TextIO, state: _Counter) -> None:
    """Print one subscription's items until it ends or the command stops."""
    async for item in sub:
        if state.done.is_set():
            return
        if isinstance(item, Gap):
            print(gap_line(sub.topic, item), file=out, flush=True)
            continue
        print(message_line(item), file=out, flush=True)
        state.seen += 1
        if state.limit is not None and state.seen >= state.limit:
            state.done.set()
            return


async def _stop_all(tasks: list[asyncio.Task[None]]) -> BaseException | None:
    """Cancel the tasks; the first error one of them ended with before, if any."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    return errors[0] if errors else None


async def subscribe(args: argparse.Namespace, out: TextIO) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be >= 1")
    since = parse_since(args.since) if args.since else None
    state = _Counter(args.count)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, state.done.set)
    try:
        client = await _connect(args)
        if client is None:
            return EXIT_FAILED
        async with client:
            return await _subscribe_all(client, list(dict.fromkeys(args.topics)), since, out, state)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _subscribe_all(
    client: PubSubClient,
    topics: list[str],
    since: tuple[int, str] | None,
    out: TextIO,
    state: _Counter,
) -> int:
    drains: list[asyncio.Task[None]] = []
    for topic in topics:
        if since is not None:
            client.positions[topic] = since  # the subscribe request carries it as `since`
        try:
            sub = await client.subscribe(topic)
        except (ClientError, ConnectionClosedError, TimeoutError) as exc:
            await _stop_all(drains)
            reason = f"{exc.code}: {exc.reason}" if isinstance(exc, ClientError) else str(exc)
            _error(f"subscribe {topic} failed: {reason}")
            return EXIT_FAILED
        drains.append(asyncio.create_task(_drain(sub, out, state)))
    print(f"redwire: subscribed to {' '.join(topics)}", file=sys.stderr, flush=True)
    stop = asyncio.create_task(state.done.wait())
    await asyncio.wait([stop, *drains], return_when=asyncio.FIRST_COMPLETED)
    failed = await _stop_all([stop, *drains])
    if failed is not None and not state.done.is_set():
        _error(f"subscription ended: {failed}")
        return EXIT_FAILED
    return EXIT_OK


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `publish` or `subscribe` with the arguments `broker.cli` parsed."""
    command = publish if args.command == "publish" else subscribe
    try:
        check_url(args.url)
        return asyncio.run(command(args, out or sys.stdout))
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError:  # `redwire subscribe t | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet
        return EXIT_OK
