"""A small pub/sub client for tests, on the independent `websockets` library."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import websockets

_ids = itertools.count(1)


class PubSubClient:
    """One connection speaking redwire.json; replies and messages are sorted apart."""

    def __init__(self, ws: Any, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.worker = welcome["worker"]
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.others: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # unsolicited frames
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> PubSubClient:
        ws = await websockets.connect(url, subprotocols=["redwire.json"], max_size=None, **kwargs)
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert welcome["op"] == "welcome", welcome
        return cls(ws, welcome)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                op = frame.get("op")
                if op == "message":
                    self.messages.put_nowait(frame)
                elif op in ("ack", "error", "pong") and frame.get("id") in self.replies:
                    self.replies.pop(frame["id"]).set_result(frame)
                else:
                    self.others.put_nowait(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            if not self.closed.done():
                self.closed.set_result((rcvd.code, rcvd.reason) if rcvd else (1006, ""))

    async def request(self, timeout_s: float = 10.0, **fields: Any) -> dict[str, Any]:
        req_id = next(_ids)
        waiter = asyncio.get_running_loop().create_future()
        self.replies[req_id] = waiter
        await self.ws.send(json.dumps({**fields, "id": req_id}))
        return await asyncio.wait_for(waiter, timeout_s)

    async def subscribe(self, topic: str) -> dict[str, Any]:
        reply = await self.request(op="subscribe", topic=topic)
        assert reply["op"] == "ack", reply
        return reply

    async def unsubscribe(self, topic: str) -> dict[str, Any]:
        return await self.request(op="unsubscribe", topic=topic)

    async def publish(self, topic: str, data: Any) -> dict[str, Any]:
        return await self.request(op="publish", topic=topic, data=data)

    async def next_message(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), timeout_s)

    async def next_other(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The next frame that is neither a message nor a reply we wait for."""
        return await asyncio.wait_for(self.others.get(), timeout_s)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


async def clients_on_workers(url: str, workers: int, *, limit: int = 64) -> list[PubSubClient]:
    """Open connections until every worker has at least one; return one client per worker."""
    by_worker: dict[str, PubSubClient] = {}
    spare: list[PubSubClient] = []
    for _ in range(limit):
        client = await PubSubClient.connect(url)
        if client.worker in by_worker:
            spare.append(client)
        else:
            by_worker[client.worker] = client
        if len(by_worker) == workers:
            break
    for client in spare:
        await client.close()
    assert len(by_worker) == workers, f"connections reached only workers {sorted(by_worker)}"
    return [by_worker[k] for k in sorted(by_worker)]
