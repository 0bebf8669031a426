"""Plain HTTP on the WebSocket port: demo page, browser client, health, metrics, publish.

GET  /            the demo page            GET /healthz   200 or 503, JSON
GET  /redwire.js  the browser client       GET /metrics   Prometheus exposition
POST /publish     {"topic": T, "data": D} with `Authorization: Bearer <api_key>`
                  (disabled, 404, when no api_key is set)
"""

from __future__ import annotations

import hmac
import json
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusError, ClientError
from broker.handshake import Request, http_response
from worker import wire

if TYPE_CHECKING:
    from worker.broker_app import BrokerApp

JSON = "application/json"


def _json(status: int, obj: object) -> bytes:
    return http_response(status, json.dumps(obj).encode(), content_type=JSON)


@cache
def _asset(package: str, *parts: str) -> bytes:
    return resources.files(package).joinpath(*parts).read_bytes()


async def handle(app: BrokerApp, request: Request) -> bytes:
    path, method = request.path, request.method
    if path == "/publish":
        if method != "POST":
            return http_response(405, b"use POST\n", headers=[("Allow", "POST")])
        return await _publish(app, request)
    if method not in ("GET", "HEAD"):
        return http_response(405, b"method not allowed\n", headers=[("Allow", "GET, HEAD")])
    response = _get(app, path)
    if method == "HEAD":
        head, _, _ = response.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"
    return response


def _get(app: BrokerApp, path: str) -> bytes:
    if path == "/healthz":
        ok, body = app.health()
        return _json(200 if ok else 503, body)
    if path == "/metrics":
        text, content_type = app.metrics.render()
        return http_response(200, text, content_type=content_type)
    if path == "/redwire.js":
        return http_response(
            200,
            _asset("client", "js", "redwire.js"),
            content_type="text/javascript; charset=utf-8",
            headers=[("Cache-Control", "no-cache")],
        )
    if path == "/demo.js":
        return http_response(
            200,
            _asset("worker", "static", "demo.js"),
            content_type="text/javascript; charset=utf-8",
            headers=[("Cache-Control", "no-cache")],
        )
    if path == "/demo.css":
        return http_response(
            200,
            _asset("worker", "static", "demo.css"),
            content_type="text/css; charset=utf-8",
            headers=[("Cache-Control", "no-cache")],
        )
    if path in ("/", "/index.html"):
        return http_response(
            200,
            _asset("worker", "static", "index.html"),
            content_type="text/html; charset=utf-8",
            headers=[
                ("Cache-Control", "no-cache"),
                ("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:"),
            ],
        )
    return http_response(404, b"not found\n")


async def _publish(app: BrokerApp, request: Request) -> bytes:
    key = app.settings.api_key
    if key is None:
        return _json(404, {"error": "disabled", "reason": "POST /publish needs an api_key"})
    auth = request.header("authorization") or ""
    given = auth[7:] if auth.lower().startswith("bearer ") else request.header("x-api-key") or ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        return _json(401, {"error": "unauthorized", "reason": "missing or wrong API key"})
    try:
        body = json.loads(request.body)
    except ValueError as exc:
        return _json(400, {"error": wire.BAD_REQUEST, "reason": f"invalid JSON: {exc}"})
    if not isinstance(body, dict) or "data" not in body:
        return _json(400, {"error": wire.BAD_REQUEST, "reason": "body must be {topic, data}"})
    codec = wire.WireCodec(
        None,
        max_topic_bytes=app.settings.max_topic_bytes,
        max_data_bytes=app.settings.max_data_bytes,
    )
    try:
        topic = wire.check_topic(body.get("topic"), app.settings.max_topic_bytes)
        payload = codec.encode_data(body["data"])
    except ClientError as exc:
        status = 413 if exc.code == wire.TOO_LARGE else 400
        return _json(status, {"error": exc.code, "reason": exc.reason})
    try:
        published = await app.bus.publish(
            BusMessage(topic, payload, ENCODING_JSON, f"http-{app.worker_id}")
        )
    except BusError as exc:
        app.stats.publish_errors += 1
        return _json(503, {"error": wire.UNAVAILABLE, "reason": str(exc)})
    app.stats.publishes += 1
    reply: dict[str, object] = {"ok": True}
    if published.offset is not None:
        reply.update(offset=published.offset, epoch=published.epoch)
    return _json(200, reply)
