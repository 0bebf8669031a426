"""A Redis connection's replies, parsed by hiredis inside our own asyncio protocol.

redis-py does the connecting (TCP, TLS or a unix socket, AUTH, SELECT, CLIENT SETNAME);
`pack_commands` packs commands with hiredis' C packer (redis-py's bytes; redis-py's packer
for an argument type hiredis does not take). `RespWire.take(conn)` then moves the
connection's transport from redis-py's stream to a `RespWire`. Every read is fed to one
`hiredis.Reader`, and the whole replies it completes go, as one list in arrival order, to
the owner's `on_replies` inside `data_received`: no coroutine, task or await per reply.
(redis-py's `read_response` costs two awaits per reply, and its `can_read` a zero-timeout
read that is cancelled when nothing is buffered.)

Rules after `take`:
- the connection is written only with `write` and read only here (redis-py's
  `read_response` and `can_read` would wait on a stream that gets nothing);
- an error reply arrives as an exception object in the list (redis-py's classes:
  `NoScriptError`, `MovedError`, ... via its parser's `parse_error`), never raised;
- `closed` is a future done once the connection is gone: with `RedisConnectionError` when
  Redis closed it, the link broke, the bytes were not RESP, or `on_replies` raised (the
  connection is then aborted: replies may be half-handled); with None after `close()`.
  Its exception is always retrieved, so an unawaited `closed` logs nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

NOT_ENOUGH = object()  # hiredis' answer when the buffer holds no whole reply


def pack_commands(conn: AbstractConnection | None, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """RESP for `commands`: hiredis' C packer (the same bytes as redis-py's, several times
    faster), redis-py's for an argument type hiredis does not take."""
    try:
        return [b"".join([hiredis.pack_command(command) for command in commands])]
    except TypeError:
        assert conn is not None
        return conn.pack_commands(commands)


class RespWire(asyncio.Protocol):
    """One Redis connection's transport, replies parsed here; see the module docstring."""

    __slots__ = ("_on_replies", "_reader", "_transport", "closed")

    def __init__(self, on_replies: Callable[[list[Any]], None]) -> None:
        self._on_replies = on_replies
        self._reader = hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=NOT_ENOUGH)
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed.add_done_callback(_retrieve)

    @classmethod
    def take(cls, conn: AbstractConnection, on_replies: Callable[[list[Any]], None]) -> RespWire:
        """Move connected `conn`'s transport to a new wire (nothing of it may be unread)."""
        writer = conn._writer  # redis-py keeps the StreamWriter here once connected
        if writer is None or writer.transport.is_closing():
            raise RedisConnectionError("the connection closed before it was taken over")
        wire = cls(on_replies)
        transport = writer.transport
        transport.set_protocol(wire)
        wire._transport = transport  # type: ignore[assignment]
        if not transport.is_reading():  # redis-py's stream may have paused it (full buffer)
            transport.resume_reading()
        return wire

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    def write(self, chunks: list[bytes]) -> None:
        """Send packed commands (redis-py's `pack_commands`) in one write."""
        transport = self._transport
        if transport is None or self.closed.done() or transport.is_closing():
            raise RedisConnectionError("the Redis connection is closed")
        transport.write(b"".join(chunks) if len(chunks) != 1 else chunks[0])

    def close(self) -> None:
        """Close the connection; `closed` gets None."""
        if not self.closed.done():
            self.closed.set_result(None)
        if self._transport is not None:
            self._transport.close()

    def abort(self, reason: str) -> None:
        self._fail(RedisConnectionError(reason))
        if self._transport is not None:
            self._transport.abort()

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed.done():
            return
        reader = self._reader
        try:
            reader.feed(data)
            reply = reader.gets()
            if reply is NOT_ENOUGH:
                return
            replies = [reply]
            while (reply := reader.gets()) is not NOT_ENOUGH:
                replies.append(reply)
        except hiredis.ProtocolError as exc:
            self.abort(f"Redis sent bytes that are not RESP: {exc}")
            return
        try:
            self._on_replies(replies)
        except Exception as exc:  # the owner could not take them: start over on a new one
            self.abort(f"handling Redis replies failed: {exc!r}")
            raise

    def eof_received(self) -> bool:
        self._fail(RedisConnectionError("Redis closed the connection"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"the Redis connection was lost: {exc}" if exc else "Redis closed the connection"
        self._fail(RedisConnectionError(reason))

    def _fail(self, error: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_exception(error)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
