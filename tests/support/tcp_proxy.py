"""A TCP proxy in front of a Redis port, for fault tests: it can silently drop what Redis sends
on chosen links (the connection stays open, Redis thinks it answered, nothing arrives: a dead
NAT entry, a lost reply), stall every link (nothing is forwarded either way, the sockets stay
open, and what was held flows again on `resume`: a congested or partitioned network that
heals), cut every link, and be pointed at another port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass(eq=False)
class Link:
    """One client connection and its connection to Redis."""

    writer: asyncio.StreamWriter  # to the client
    upstream: asyncio.StreamWriter  # to Redis
    sent: bytearray = field(default_factory=bytearray)  # all the client sent (a test's worth)
    frozen: bool = False  # what Redis answers is dropped

    def has_sent(self, command: bytes) -> bool:
        return command in self.sent


def subscriber_link(link: Link) -> bool:
    """The link of a pub/sub connection: its client sent SUBSCRIBE."""
    return link.has_sent(b"SUBSCRIBE")


def publisher_link(link: Link) -> bool:
    """The link RedisBus publishes on: its client ran a script (EVALSHA)."""
    return link.has_sent(b"EVALSHA")


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`; `target_port` may be changed for
    the links made afterwards (a failover: `proxy.target_port = other; proxy.cut()`)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.links: list[Link] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()  # cleared while stalled
        self._flowing.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def cut(self) -> None:
        """Close every link, both sides."""
        for link in self.links:
            link.writer.close()
            link.upstream.close()
        self.links.clear()

    def freeze(self, matching: Callable[[Link], bool]) -> int:
        """Drop from now on what Redis sends on the open links `matching` picks; how many."""
        links = [link for link in self.links if matching(link) and not link.writer.is_closing()]
        for link in links:
            link.frozen = True
        return len(links)

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def stall(self) -> int:
        """Stop forwarding in both directions on every link, present and future, with every
        socket left open (bytes wait in the kernel's buffers, then TCP pushes back); returns
        how many links are open. `resume` lets everything held flow again, in order."""
        self._flowing.clear()
        return sum(not link.writer.is_closing() for link in self.links)

    def resume(self) -> None:
        """End a `stall`: forwarding goes on where it stopped."""
        self._flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # Redis is down: the client sees its connection refused (closed)
            writer.close()
            return
        link = Link(writer, up_writer)
        self.links.append(link)

        async def client_to_redis() -> None:
            while True:
                await self._flowing.wait()
                if not (data := await reader.read(CHUNK)):
                    return
                await self._flowing.wait()  # a stall that began during the read holds it
                link.sent += data
                up_writer.write(data)
                await up_writer.drain()

        async def redis_to_client() -> None:
            while True:
                await self._flowing.wait()
                if not (data := await up_reader.read(CHUNK)):
                    return
                await self._flowing.wait()
                if not link.frozen:
                    writer.write(data)
                    await writer.drain()

        tasks = [asyncio.create_task(client_to_redis()), asyncio.create_task(redis_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            up_writer.close()
