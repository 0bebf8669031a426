"""Plain HTTP on the WebSocket port: demo page, browser client, health, metrics, publish.

GET  /            the demo page            GET /healthz   200 or 503, JSON
GET  /redwire.js  the browser client       GET /metrics   Prometheus exposition (built in a
                                                          thread; 404 here with metrics_listen:
                                                          worker/metrics_listener.py serves it)
GET  /dashboard   the live dashboard (worker/dashboard.py: with the API key only; 404 without one)
POST /publish     {"topic": T, "data": D} with `Authorization: Bearer <api_key>`
                  (disabled, 404, when no api_key is set); every refusal of it is JSON,
                  `{"error": code, "reason": text}` (`publish_error`, docs/protocol.md)

With `static_dir` set, other paths are files under it. A path whose percent-escapes do not
decode to UTF-8 text without control characters (`/%00`, `/%ff`, `/%zz`) is a 400 before any
route sees it; a path that resolves outside `static_dir` is a 404. Every response carries
`X-Content-Type-Options: nosniff` (`broker.handshake.http_response`).
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from broker.envelope import ENCODING_JSON, BusMessage
from broker.errors import BusError, ClientError
from broker.handshake import HandshakeError, Request, error_response, http_response
from worker import dashboard, wire
from worker.session import bus_error

if TYPE_CHECKING:
    from worker.broker_app import BrokerApp

JSON = "application/json"


def _json(status: int, obj: object) -> bytes:
    return http_response(status, json.dumps(obj).encode(), content_type=JSON)


# A POST /publish refusal's error code when the refusal has none of its own (by status).
PUBLISH_ERROR_CODES = {
    400: wire.BAD_REQUEST,
    401: "unauthorized",
    403: wire.FORBIDDEN,
    404: "disabled",
    405: "method_not_allowed",
    413: wire.TOO_LARGE,
    431: wire.TOO_LARGE,
    503: "unavailable",
}


def publish_error(
    status: int,
    reason: str,
    code: str | None = None,
    *,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The one shape of every `POST /publish` refusal: `{"error": code, "reason": text}`.

    `code` defaults to the status's (`PUBLISH_ERROR_CODES`; another 4xx is `bad_request`,
    another 5xx `internal`)."""
    if code is None:
        code = PUBLISH_ERROR_CODES.get(status, wire.BAD_REQUEST if status < 500 else "internal")
    body = json.dumps({"error": code, "reason": reason}).encode()
    return http_response(status, body, content_type=JSON, headers=headers)


def refusal(target: str | None, error: HandshakeError) -> bytes:
    """The response to a request the HTTP parser refused (`error`): JSON for `/publish`
    (e.g. 413, body over `max_http_body_bytes`), text for anything else. `target` is the
    request line's target, None when the parser failed before it."""
    if target is not None and target.partition("?")[0] == "/publish":
        return publish_error(error.status, error.reason, headers=error.headers)
    return error_response(error)


@cache
def _asset(package: str, *parts: str) -> bytes:
    return resources.files(package).joinpath(*parts).read_bytes()


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def decode_path(path: str) -> str | None:
    """The request path percent-decoded as UTF-8, or None when that fails or the result holds
    a control character (NUL included): such a path names no file and no route."""
    if _BAD_ESCAPE.search(path):
        return None
    try:
        text = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _CONTROL.search(text) else text


async def handle(app: BrokerApp, request: Request) -> bytes:
    path, method = request.path, request.method
    decoded = decode_path(path)
    if decoded is None:
        return http_response(400, b"bad request path\n")
    if path == "/publish":
        if method != "POST":
            return publish_error(405, "use POST", headers=[("Allow", "POST")])
        return await _publish(app, request)
    if method not in ("GET", "HEAD"):
        return http_response(405, b"method not allowed\n", headers=[("Allow", "GET, HEAD")])
    if path == "/metrics" and app.settings.metrics_listen is None:
        text, content_type = await app.metrics.render_async()
        response = http_response(200, text, content_type=content_type)
    elif path == "/dashboard":  # needs the query and cookies: not one of the _get paths
        html = _asset("worker", "static", "dashboard.html")
        response = dashboard.page(app.settings, request, html)
    else:
        response = _get(app, path, decoded)
    if method == "HEAD":
        head, _, _ = response.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"
    return response


# Files the broker always serves: path -> (package, file inside it, content type).
_ASSETS = {
    "/redwire.js": ("client", ("js", "redwire.js"), "text/javascript; charset=utf-8"),
    "/demo.js": ("worker", ("static", "demo.js"), "text/javascript; charset=utf-8"),
    "/demo.css": ("worker", ("static", "demo.css"), "text/css; charset=utf-8"),
    "/favicon.ico": ("worker", ("static", "favicon.ico"), "image/x-icon"),
    "/dashboard.js": ("worker", ("static", "dashboard.js"), "text/javascript; charset=utf-8"),
    "/dashboard.css": ("worker", ("static", "dashboard.css"), "text/css; charset=utf-8"),
    "/": ("worker", ("static", "index.html"), "text/html; charset=utf-8"),
}
_PAGE_HEADERS = [
    ("Cache-Control", "no-cache"),
    ("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:"),
]


def _get(app: BrokerApp, path: str, decoded: str) -> bytes:
    if path == "/healthz":
        ok, body = app.health()
        return _json(200 if ok else 503, body)
    if path == "/index.html":
        path = "/"
    static_dir = app.settings.static_dir
    if static_dir is not None and path != "/redwire.js":
        found = _static_file(static_dir, "/" if path == "/" else decoded)
        if found is not None:
            body, content_type = found
            return http_response(200, body, content_type=content_type, headers=_PAGE_HEADERS)
    asset = _ASSETS.get(path)
    if asset is not None:
        package, parts, content_type = asset
        return http_response(
            200, _asset(package, *parts), content_type=content_type, headers=_PAGE_HEADERS
        )
    return http_response(404, b"not found\n")


def _static_file(root: str, path: str) -> tuple[bytes, str] | None:
    """A file under the application's `static_dir` (`/` is its index.html), or None.

    `path` is already decoded (`decode_path`). It is resolved and must stay inside the
    directory: no `..`, no symlink escape; a file we cannot read is not there either."""
    relative = "index.html" if path == "/" else path.lstrip("/")
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, relative))
    if os.path.commonpath((base, target)) != base or not os.path.isfile(target):
        return None
    content_type = mimetypes.guess_type(target)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type.endswith("javascript"):
        content_type += "; charset=utf-8"
    try:
        with open(target, "rb") as fh:
            return fh.read(), content_type
    except OSError:
        return None


async def _publish(app: BrokerApp, request: Request) -> bytes:
    key = app.settings.api_key
    if key is None:
        return publish_error(404, "POST /publish needs an api_key", "disabled")
    auth = request.header("authorization") or ""
    given = auth[7:] if auth.lower().startswith("bearer ") else request.header("x-api-key") or ""
    if not dashboard.api_key_matches(key, given):
        return publish_error(401, "missing or wrong API key", "unauthorized")
    try:
        body = wire.loads_json(request.body)  # 64-bit integers, no NaN: as WebSocket publishes
    except ValueError as exc:
        return publish_error(400, f"invalid JSON: {exc}", wire.BAD_REQUEST)
    if not isinstance(body, dict) or "data" not in body:
        return publish_error(400, "body must be {topic, data}", wire.BAD_REQUEST)
    codec = wire.WireCodec(
        None,
        max_topic_bytes=app.settings.max_topic_bytes,
        max_data_bytes=app.settings.max_data_bytes,
        max_data_depth=app.settings.max_data_depth,
    )
    try:
        topic = wire.check_client_topic(body.get("topic"), app.settings.max_topic_bytes)
        dashboard.check_reserved_topic("publish", topic, admin=True)
        wire.check_data(body["data"], app.settings.max_data_depth, finite=False)
        payload = codec.encode_data(body["data"])
    except ClientError as exc:
        status = {wire.TOO_LARGE: 413, wire.FORBIDDEN: 403}.get(exc.code, 400)
        return publish_error(status, exc.reason, exc.code)
    key = body.get("key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 64):
        return publish_error(400, "key: 1 to 64 characters", wire.BAD_REQUEST)
    try:
        published = await app.bus.publish(
            BusMessage(topic, payload, ENCODING_JSON, f"http-{app.worker_id}"), key=key
        )
    except BusError as exc:
        app.stats.publish_errors += 1
        error = bus_error(exc, "not published")
        return publish_error(503, error.reason, error.code)
    app.stats.publishes += 1
    reply: dict[str, object] = {"ok": True}
    if published.offset is not None:
        reply.update(offset=published.offset, epoch=published.epoch)
        if published.duplicate:
            reply["duplicate"] = True
    return _json(200, reply)
