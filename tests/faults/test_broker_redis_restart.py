"""Redis goes away under `redwire serve`: /healthz says so, delivery resumes after."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from support.broker_client import clients_on_workers
from support.processes import ServerProcess, redwire
from support.redis_server import RedisServer
from support.waiting import eventually


def _health(server: ServerProcess) -> int:
    """Status of /healthz from one connection (it may land on any worker)."""
    try:
        with urllib.request.urlopen(f"http://{server.host}:{server.port}/healthz", timeout=5) as r:
            json.loads(r.read())
            return r.status
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        assert body["status"] == "unavailable"
        return exc.code


async def _all_workers_say(server: ServerProcess, status: int) -> bool:
    """Several scrapes in a row all answer `status` (they spread over the workers)."""
    for _ in range(8):
        if await asyncio.to_thread(_health, server) != status:
            return False
    return True


async def test_redis_restart_503_then_200_and_delivery_resumes(own_redis: RedisServer) -> None:
    server = ServerProcess(
        redwire(
            "serve", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
            "--redis", own_redis.url,
        ),
        env={"REDWIRE_BUS_PROBE_INTERVAL_S": "0.2", "REDWIRE_BUS_PROBE_TIMEOUT_S": "1",
             "REDWIRE_BUS_RECONNECT_MAX_S": "0.5"},
    )  # fmt: skip
    try:
        clients = await clients_on_workers(server.url, 2)
        for client in clients:
            await client.subscribe("resilient")
        assert await _all_workers_say(server, 200)

        own_redis.stop()
        await eventually(lambda: _all_workers_say(server, 503), timeout_s=15)
        reply = await clients[0].publish("resilient", "during outage")
        assert reply["op"] == "error" and reply["code"] == "unavailable", reply

        own_redis.start()
        await eventually(lambda: _all_workers_say(server, 200), timeout_s=15)

        async def delivered_everywhere() -> bool:
            # Resubscription is asynchronous: publish until both workers deliver again.
            await clients[1].publish("resilient", "after restart")
            results = []
            for client in clients:
                try:
                    results.append(await client.next_message(timeout_s=0.5))
                except TimeoutError:
                    return False
            return all(r["data"] == "after restart" for r in results)

        await eventually(delivered_everywhere, timeout_s=15)
        for client in clients:
            await client.close()
    finally:
        assert server.stop() == 0
