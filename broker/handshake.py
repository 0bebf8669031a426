"""Sans-I/O HTTP/1.1 and the WebSocket opening handshake (RFC 6455 section 4), both roles.

Server role: `RequestParser` turns received bytes into one `Request` (head, then a body by
Content-Length), failing as soon as a limit from `Settings` is crossed; `accept_upgrade` runs
the RFC 6455 section 4.2.1 checks in order, then the Origin policy (`origin_allowed`: the
same origin, or `allowed_origins`), and builds the 101 response, or raises `HandshakeError`,
which `error_response` turns into bytes. `http_response` serves plain HTTP.
Client role: `client_request` builds the upgrade request, `ResponseParser` reads the answer's
head and `check_response` runs the section 4.1 checks. permessage-deflate negotiation is
delegated to `broker.deflate`. Nothing here does I/O.

Parsing is strict: lines end in CRLF only (a bare CR or LF is a 400), no obs-fold, no
whitespace before a header's colon, no blank lines before the request line. Transfer-Encoding
is refused with 501 Not Implemented (RFC 7230 section 3.3.1: a transfer coding the server does
not understand); bodies are framed by Content-Length only.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

from broker import deflate
from broker.deflate import DeflateParams
from broker.errors import HandshakeError
from broker.settings import Settings

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
WS_VERSION = "13"  # RFC 6455 section 4.1, item 9

_DEFAULTS = Settings()
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 7230 section 3.2.6
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE_RE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE_RE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_FIELD_RE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_VERSIONS = ("1.0", "1.1")

Headers = tuple[tuple[str, str], ...]


def _tokens(values: Iterable[str]) -> list[str]:
    """Elements of comma-separated header values (RFC 7230 section 7), whitespace stripped."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


class _HeaderAccess:
    """Case-insensitive header look-up shared by `Request` and `Response`."""

    __slots__ = ()
    headers: Headers

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name`, in the order received."""
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def header(self, name: str) -> str | None:
        """The header's value, repeated headers joined with ", "; None if absent."""
        values = self.header_values(name)
        return ", ".join(values) if values else None

    def has_token(self, name: str, token: str) -> bool:
        """Whether the comma-list header `name` contains `token` (case-insensitive)."""
        return token.lower() in (t.lower() for t in _tokens(self.header_values(name)))


@dataclass(frozen=True, slots=True)
class Request(_HeaderAccess):
    method: str
    target: str  # raw request target
    path: str  # target without query
    query: str  # after '?', '' if none
    http_version: str  # "1.0" or "1.1"
    headers: Headers  # (name as received, value stripped), in order
    body: bytes = b""

    @property
    def is_upgrade(self) -> bool:
        return self.has_token("Upgrade", "websocket")

    @property
    def keep_alive(self) -> bool:
        # RFC 7230 section 6.3: 1.1 persists unless "close"; 1.0 only with "keep-alive".
        if self.has_token("Connection", "close"):
            return False
        return self.http_version != "1.0" or self.has_token("Connection", "keep-alive")


@dataclass(frozen=True, slots=True)
class Response(_HeaderAccess):
    http_version: str
    status: int
    reason: str
    headers: Headers


class _HeadParser(ABC):
    """CRLF-strict line reader for a start line plus header fields (RFC 7230 section 3)."""

    _LINE_TOO_LONG = 414

    def __init__(self, *, max_first_line_bytes: int, max_header_bytes: int, max_headers: int):
        self.max_first_line_bytes = max_first_line_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self._buf = bytearray()
        self._pos = 0  # start of the line being read
        self._scan = 0  # where to resume looking for LF
        self._first: bytes | None = None
        self._fields: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._head_done = False
        self._leftover = b""

    @property
    def leftover(self) -> bytes:
        """Bytes received after the complete message (a pipelined request or early frames)."""
        return self._leftover

    def _feed_head(self, data: bytes) -> bool:
        """Consume header lines from `data`; True once the blank line ending the head is in."""
        self._buf += data
        while not self._head_done:
            line = self._next_line()
            if line is None:
                self._check_pending()
                return False
            if self._first is None:
                self._take_first_line(line)
            elif line:
                self._take_field(line)
            else:
                self._head_done = True
        return True

    def _next_line(self) -> bytes | None:
        buf = self._buf
        lf = buf.find(b"\n", self._scan)
        if lf < 0:
            self._scan = len(buf)
            return None
        if lf == self._pos or buf[lf - 1] != 0x0D:
            raise HandshakeError(400, "line ends in a bare LF, not CRLF")
        line = bytes(buf[self._pos : lf - 1])
        if b"\r" in line:
            raise HandshakeError(400, "bare CR inside a line")
        self._pos = self._scan = lf + 1
        return line

    def _check_pending(self) -> None:
        """Fail now if the partial line already makes the head exceed a limit."""
        pending = len(self._buf) - self._pos
        if pending and self._buf[-1] == 0x0D:
            pending -= 1  # the CR of the CRLF that will end this line
        if self._first is None:
            if pending > self.max_first_line_bytes:
                raise HandshakeError(self._LINE_TOO_LONG, "start line too long")
        elif pending and self._header_bytes + pending + 2 > self.max_header_bytes:
            raise HandshakeError(431, "header fields too large")

    def _take_first_line(self, line: bytes) -> None:
        if len(line) > self.max_first_line_bytes:
            raise HandshakeError(self._LINE_TOO_LONG, "start line too long")
        self._parse_first_line(line)
        self._first = line

    def _take_field(self, line: bytes) -> None:
        self._header_bytes += len(line) + 2
        if self._header_bytes > self.max_header_bytes:
            raise HandshakeError(431, "header fields too large")
        if len(self._fields) >= self.max_headers:
            raise HandshakeError(431, f"more than {self.max_headers} header fields")
        if line[:1] in (b" ", b"\t"):
            raise HandshakeError(400, "obsolete line folding in header")  # RFC 7230 3.2.4
        match = _FIELD_RE.fullmatch(line)
        if match is None:
            raise HandshakeError(400, "malformed header field line")
        self._fields.append((match[1].decode("ascii"), match[2].decode("latin-1")))

    @abstractmethod
    def _parse_first_line(self, line: bytes) -> None:
        """Parse the request line or the status line (each subclass has its own)."""

    def _rest(self) -> bytes:
        """Everything after the head, releasing the buffer."""
        rest = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = self._scan = 0
        return rest


def _check_version(major: bytes, minor: bytes) -> str:
    version = f"{major.decode()}.{minor.decode()}"
    if version not in _VERSIONS:
        raise HandshakeError(505, f"HTTP/{version} is not supported")
    return version


class RequestParser(_HeadParser):
    """Incremental parser of one HTTP/1.1 request head (+ body by Content-Length)."""

    def __init__(
        self,
        *,
        max_request_line_bytes: int,
        max_header_bytes: int,
        max_headers: int,
        max_body_bytes: int,
    ) -> None:
        super().__init__(
            max_first_line_bytes=max_request_line_bytes,
            max_header_bytes=max_header_bytes,
            max_headers=max_headers,
        )
        self.max_body_bytes = max_body_bytes
        self._body_length: int | None = None
        self._body = bytearray()
        self._request: Request | None = None
        self._line: tuple[str, str, str] = ("", "", "")

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestParser:
        return cls(
            max_request_line_bytes=settings.max_request_line_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            max_body_bytes=settings.max_http_body_bytes,
        )

    def feed(self, data: bytes) -> Request | None:
        """Add received bytes; return the request once complete, else None."""
        if self._request is not None:
            raise RuntimeError("request already complete; read `leftover` for later bytes")
        if self._body_length is None:
            if not self._feed_head(data):
                return None
            self._body_length = self._content_length()
            data = self._rest()
        self._body += data
        if len(self._body) < self._body_length:
            return None
        self._leftover = bytes(self._body[self._body_length :])
        method, target, version = self._line
        path, _, query = target.partition("?")
        body = bytes(self._body[: self._body_length])
        self._request = Request(method, target, path, query, version, tuple(self._fields), body)
        self._body = bytearray()
        return self._request

    def _parse_first_line(self, line: bytes) -> None:
        match = _REQUEST_LINE_RE.fullmatch(line)
        if match is None:
            raise HandshakeError(400, "malformed request line")
        version = _check_version(match[3], match[4])
        self._line = (match[1].decode("ascii"), match[2].decode("ascii"), version)

    @property
    def target(self) -> str | None:
        """The request line's target once it is parsed (None before): how to refuse the
        request may depend on it (`POST /publish` refusals are JSON)."""
        return self._line[1] if self._first is not None else None

    def _content_length(self) -> int:
        """Body length from the head (RFC 7230 section 3.3.3); 0 without Content-Length."""
        if any(name.lower() == "transfer-encoding" for name, _ in self._fields):
            raise HandshakeError(501, "Transfer-Encoding is not supported; use Content-Length")
        values = [v for name, v in self._fields if name.lower() == "content-length"]
        if not values:
            return 0
        if len(values) > 1 or not values[0].isdigit() or not values[0].isascii():
            raise HandshakeError(400, "invalid Content-Length")
        digits = values[0].lstrip("0") or "0"
        if len(digits) > len(str(self.max_body_bytes)) or int(digits) > self.max_body_bytes:
            raise HandshakeError(413, f"body larger than {self.max_body_bytes} bytes")
        return int(digits)


class ResponseParser(_HeadParser):
    """Incremental parser of one HTTP/1.1 response head; the status line shares the header
    limit (over it: 431). Everything after the head is `leftover` (early frames)."""

    _LINE_TOO_LONG = 431

    def __init__(
        self,
        *,
        max_header_bytes: int = _DEFAULTS.max_header_bytes,
        max_headers: int = _DEFAULTS.max_headers,
    ) -> None:
        super().__init__(
            max_first_line_bytes=max_header_bytes,
            max_header_bytes=max_header_bytes,
            max_headers=max_headers,
        )
        self._line: tuple[str, int, str] = ("", 0, "")
        self._response: Response | None = None

    def feed(self, data: bytes) -> Response | None:
        """Add received bytes; return the response head once complete, else None."""
        if self._response is not None:
            raise RuntimeError("response already complete; read `leftover` for later bytes")
        if not self._feed_head(data):
            return None
        self._leftover = self._rest()
        self._response = Response(*self._line, tuple(self._fields))
        return self._response

    def _parse_first_line(self, line: bytes) -> None:
        # The reason phrase and its SP may be missing, as h11 tolerates (RFC 7230 3.1.2).
        match = _STATUS_LINE_RE.fullmatch(line)
        if match is None:
            raise HandshakeError(400, "malformed status line")
        version = _check_version(match[1], match[2])
        self._line = (version, int(match[3]), (match[4] or b"").decode("latin-1"))


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for `key` (RFC 6455 section 4.2.2 item 5.4), no trailing newline."""
    digest = hashlib.sha1((key + WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def new_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64 (RFC 6455 section 4.1 item 7)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


@dataclass(frozen=True, slots=True)
class Accepted:
    response: bytes  # the full "HTTP/1.1 101 Switching Protocols" response bytes
    subprotocol: str | None
    deflate: DeflateParams | None


@dataclass(frozen=True, slots=True)
class Established:
    subprotocol: str | None
    deflate: DeflateParams | None


def _head(start_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """Start line and header lines, each CRLF-terminated, then the blank line."""
    lines = [start_line]
    for name, value in headers:
        if not _TOKEN_RE.fullmatch(name.encode("latin-1")):
            raise ValueError(f"header name {name!r} is not a token")
        if any(c in value for c in "\r\n\0") or value != value.strip(" \t"):
            raise ValueError(f"header {name} value {value!r} has CR, LF, NUL or edge spaces")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _status_line(status: int) -> str:
    try:
        return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP/1.1 {status} "


def http_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
    keep_alive: bool = False,
) -> bytes:
    """A plain HTTP/1.1 response with Content-Length and an explicit Connection header.

    Every one says `X-Content-Type-Options: nosniff` (unless `headers` sets it), so no
    browser runs a body as something its Content-Type does not say it is."""
    fields = [("Content-Type", content_type)] if body else []
    fields.append(("Content-Length", str(len(body))))
    fields.append(("Connection", "keep-alive" if keep_alive else "close"))
    extra = list(headers)
    if not any(name.lower() == "x-content-type-options" for name, _ in extra):
        fields.append(("X-Content-Type-Options", "nosniff"))
    fields.extend(extra)
    return _head(_status_line(status), fields) + body


def error_response(error: HandshakeError) -> bytes:
    """The response refusing a handshake: status, reason as text body, Connection: close."""
    body = (error.reason + "\n").encode("utf-8")
    return http_response(error.status, body, headers=error.headers)


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def split_authority(authority: str) -> tuple[str, int | None] | None:
    """(host lower-cased, port or None) of `host[:port]` or `[v6][:port]`; None if malformed."""
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if end < 0 or (rest and rest[0] != ":"):
            return None
        port_text = rest[1:] if rest else None
    elif ":" in authority:
        host, _, port_text = authority.partition(":")  # a second colon: not digits, refused
    else:
        host, port_text = authority, None
    if not host or any(c in host for c in "/?#@ \t"):
        return None
    if port_text is None:
        return host.lower(), None
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        return None
    port = int(port_text)
    return (host.lower(), port) if port <= 65535 else None


def _origin_parts(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of a serialised origin (RFC 6454 section 6.2), the port filled in
    for http/https/ws/wss; None for anything else (`null`, a path, garbage)."""
    scheme, sep, authority = origin.partition("://")
    if not sep or not scheme.isascii() or not scheme.isalpha():
        return None
    parts = split_authority(authority)
    if parts is None:
        return None
    scheme = scheme.lower()
    host, port = parts
    return scheme, host, port if port is not None else _DEFAULT_PORTS.get(scheme)


def _origin_key(origin: str) -> tuple[str, str, int | None] | str:
    # RFC 6454 section 6.1: scheme and host compare case-insensitively; default ports too.
    return _origin_parts(origin) or origin.lower()


@functools.lru_cache(maxsize=64)
def _allowed_keys(allowed_origins: tuple[str, ...]) -> frozenset[tuple[str, str, int | None] | str]:
    return frozenset(_origin_key(o) for o in allowed_origins)


def same_origin(origin: str, host: str) -> bool:
    """Whether `origin` names the host:port this request was sent to (its Host header).

    The scheme is not compared (behind a TLS load balancer the browser says https while we
    see plain HTTP); a Host without a port matches an origin on port 80 or 443."""
    parts, authority = _origin_parts(origin), split_authority(host)
    if parts is None or authority is None:
        return False
    _, origin_host, origin_port = parts
    host_name, host_port = authority
    if origin_host != host_name:
        return False
    if host_port is None:
        return origin_port in (80, 443)
    return host_port == origin_port


def origin_allowed(origin: str | None, host: str | None, allowed_origins: Sequence[str]) -> bool:
    """The Origin policy (docs/security.md): no Origin (not a browser) passes; `*` admits any;
    a listed origin passes (`null` only when listed); otherwise only the same origin."""
    if origin is None:
        return True
    allowed = _allowed_keys(tuple(allowed_origins))
    if "*" in allowed or _origin_key(origin) in allowed:
        return True
    return host is not None and same_origin(origin, host)


def host_allowed(host: str | None, allowed_hosts: Sequence[str]) -> bool:
    """Whether a Host header value is one we serve (docs/security.md). No list: any Host.

    An entry `name` matches that name on any port, `name:port` that port only, `.name` the
    name and every subdomain of it. Names compare case-insensitively."""
    if not allowed_hosts:
        return True
    authority = split_authority(host) if host else None
    if authority is None:
        return False
    name, port = authority
    for entry in allowed_hosts:
        if entry.startswith("."):
            suffix = entry.lower()
            if name == suffix[1:] or name.endswith(suffix):
                return True
            continue
        wanted = split_authority(entry)
        if wanted is not None and wanted[0] == name and wanted[1] in (None, port):
            return True
    return False


def check_host(request: Request, allowed_hosts: Sequence[str]) -> None:
    """Raise HandshakeError 421 (Misdirected Request) unless the request's one Host header
    is served here (`host_allowed`); with `allowed_hosts` empty, any request passes."""
    if not allowed_hosts:
        return
    hosts = request.header_values("Host")
    if len(hosts) != 1 or not host_allowed(hosts[0], allowed_hosts):
        raise HandshakeError(421, "this server does not serve that Host (allowed_hosts)")


def _check_request(request: Request, allowed_origins: Sequence[str]) -> str:
    """RFC 6455 section 4.2.1 checks, in its order; returns the Sec-WebSocket-Key.

    Then the Origin policy (section 10.2: the server decides which origins it serves)."""
    if request.method != "GET":
        raise HandshakeError(405, f"method {request.method} not allowed", [("Allow", "GET")])
    if tuple(map(int, request.http_version.split("."))) < (1, 1):
        raise HandshakeError(400, "WebSocket upgrade needs HTTP/1.1 or later")
    if len(request.header_values("Host")) != 1 or not request.header("Host"):
        raise HandshakeError(400, "missing or repeated Host header")
    if not request.is_upgrade:
        raise HandshakeError(400, "Upgrade header does not contain 'websocket'")
    if not request.has_token("Connection", "upgrade"):
        raise HandshakeError(400, "Connection header does not contain 'upgrade'")
    keys = request.header_values("Sec-WebSocket-Key")
    if len(keys) != 1 or not _is_valid_key(keys[0]):
        raise HandshakeError(400, "Sec-WebSocket-Key must appear once: 16 bytes in base64")
    if request.header("Sec-WebSocket-Version") != WS_VERSION:
        # RFC 6455 section 4.4; RFC 7231 section 6.5.15 requires Upgrade in a 426.
        headers = [("Sec-WebSocket-Version", WS_VERSION), ("Upgrade", "websocket")]
        raise HandshakeError(426, "unsupported Sec-WebSocket-Version, use 13", headers)
    if not origin_allowed(request.header("Origin"), request.header("Host"), allowed_origins):
        raise HandshakeError(403, "Origin not allowed (same origin only, or allowed_origins)")
    return keys[0]


def _is_valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


def accept_upgrade(
    request: Request,
    *,
    allowed_origins: Sequence[str] = (),
    subprotocols: Sequence[str] = (),
    default_subprotocol: str | None = None,
    compression: bool = True,
    max_window_bits: int = 15,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> Accepted:
    """Check an upgrade request and build the 101 response, or raise HandshakeError.

    The subprotocol is the first of ours (server preference) the client offered; with no
    match, no header is sent (RFC 6455 section 4.2.2 allows it) and `default_subprotocol`
    is reported. A browser's `Origin` must be the request's own (its Host) or one of
    `allowed_origins` (`origin_allowed`), else 403. Invalid `extra_headers` raise ValueError.
    """
    key = _check_request(request, allowed_origins)
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    ]
    offered = _tokens(request.header_values("Sec-WebSocket-Protocol"))
    chosen = next((p for p in subprotocols if p in offered), None)
    if chosen is not None:
        headers.append(("Sec-WebSocket-Protocol", chosen))
    params = None
    if compression:
        offers = request.header_values("Sec-WebSocket-Extensions")
        negotiated = deflate.negotiate_server(offers, max_window_bits=max_window_bits)
        if negotiated is not None:
            params, value = negotiated
            headers.append(("Sec-WebSocket-Extensions", value))
    headers.extend(extra_headers)
    response = _head(_status_line(101), headers)
    return Accepted(response, chosen or default_subprotocol, params)


def client_request(
    host: str,
    port: int,
    path: str,
    *,
    key: str,
    subprotocols: Sequence[str] = (),
    compression: bool = True,
    origin: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The client's upgrade request (RFC 6455 section 4.1); bad arguments raise ValueError."""
    if not path.startswith("/") or not re.fullmatch(r"[\x21-\x7e]+", path):
        raise ValueError(f"path {path!r} must start with '/' and hold no spaces or controls")
    if any(not _TOKEN_RE.fullmatch(p.encode("latin-1")) for p in subprotocols):
        raise ValueError(f"subprotocols must be tokens: {list(subprotocols)!r}")
    authority = f"[{host}]" if ":" in host and not host.startswith("[") else host
    headers = [
        ("Host", f"{authority}:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", WS_VERSION),
    ]
    if origin is not None:
        headers.append(("Origin", origin))
    if subprotocols:
        headers.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
    if compression:
        headers.append(("Sec-WebSocket-Extensions", deflate.client_offer()))
    headers.extend(extra_headers)
    return _head(f"GET {path} HTTP/1.1", headers)


def check_response(
    response: Response, *, key: str, subprotocols: Sequence[str] = (), compression: bool = True
) -> Established:
    """RFC 6455 section 4.1 client checks on the server's answer, or HandshakeError.

    The error's status is the response's: anything but 101 is a refusal; 101 means the
    server agreed but its response breaks RFC 6455, so the connection must be failed.
    """

    def fail(reason: str) -> HandshakeError:
        return HandshakeError(response.status, reason)

    if response.status != 101:
        raise fail(f"server answered {response.status} {response.reason}, not 101")
    if not response.has_token("Upgrade", "websocket"):
        raise fail("Upgrade header does not contain 'websocket'")
    if not response.has_token("Connection", "upgrade"):
        raise fail("Connection header does not contain 'upgrade'")
    if response.header_values("Sec-WebSocket-Accept") != [accept_key(key)]:
        raise fail("Sec-WebSocket-Accept does not match our key")
    chosen = _tokens(response.header_values("Sec-WebSocket-Protocol"))
    if len(chosen) > 1 or (chosen and chosen[0] not in subprotocols):
        raise fail(f"server chose a subprotocol we did not offer: {', '.join(chosen)}")
    extensions = response.header_values("Sec-WebSocket-Extensions")
    params = None
    if extensions:
        if not compression:
            raise fail(f"server chose an extension we did not offer: {', '.join(extensions)}")
        params = deflate.accept_client_response(extensions)
    return Established(chosen[0] if chosen else None, params)
