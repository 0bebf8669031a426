"""The pub/sub wire protocol a client speaks (docs/protocol.md), both encodings.

Client frames are decoded into `Request`s (or a `ClientError` naming what is wrong); server
frames are encoded here. JSON text frames are the default (`redwire.json`); with the
`redwire.msgpack` subprotocol the same maps travel as msgpack binary frames. Published data
is turned into payload bytes once, at publish time; fan-out frames are assembled around
those bytes without decoding them (`message_frame_body`).
"""

from __future__ import annotations

import base64
import functools
import json
import re
from typing import Any, NamedTuple

from broker.envelope import ENCODING_JSON, ENCODING_MSGPACK, msgpack_dumps, msgpack_loads
from broker.errors import ClientError
from broker.topics import BAD_TOPIC as BAD_TOPIC
from broker.topics import check_topic as check_topic

SUBPROTOCOL_JSON = "redwire.json"
SUBPROTOCOL_MSGPACK = "redwire.msgpack"
SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)
PROTOCOL_VERSION = 1

# Error codes (stable strings; docs/protocol.md lists them).
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
TOO_LARGE = "too_large"
FORBIDDEN = "forbidden"
UNAVAILABLE = "unavailable"  # not published: nothing happened, a retry is safe
OUTCOME_UNKNOWN = "outcome_unknown"  # may have been published: retry only with the same key
TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
NOT_ENABLED = "not_enabled"
INTERNAL = "internal"
RATE_LIMITED = "rate_limited"  # over publish_rate_per_s: retry after `retry_after` seconds

# Reserved topics: `$sys.` and the grammar after it, the broker's own (worker/dashboard.py
# `check_reserved_topic` decides who may use them: no client publishes there).
SYS_PREFIX = "$sys."
UNAUTHORIZED = "unauthorized"  # a `refresh` token refused (the connection keeps its old one)

_OPS = frozenset({"subscribe", "unsubscribe", "publish", "ping", "presence", "refresh"})
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry
_MSGPACK_DATA = msgpack_dumps("data")


def _json_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _INT_MAX:
        raise ValueError("integer out of the 64-bit range msgpack subscribers can receive")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every str: `json.loads` with hooks builds a new decoder per call (half the
# cost of a small frame). Bytes still go through `json.loads`, which detects their encoding.
_decode_str = json.JSONDecoder(parse_int=_json_int, parse_constant=_json_constant).decode


def _loads(text: str | bytes) -> Any:
    """JSON that every subscriber can receive: no NaN/Infinity, integers within 64 bits."""
    if isinstance(text, str):
        if text.startswith("\ufeff"):  # what json.loads refuses, refused here too
            raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        return _decode_str(text)
    return json.loads(text, parse_int=_json_int, parse_constant=_json_constant)


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_text(obj: Any) -> None:
    """ValueError if a string in `obj` (keys too) holds half a surrogate pair: JSON's
    `\\ud800` escapes decode to one, and no UTF-8 frame, Redis command or JWT library takes
    it (a reply echoing such an id would fail in the worker, not in the client)."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise ValueError("text holds half a surrogate pair (a \\ud800 escape?)")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads_json(text: str | bytes) -> Any:
    """JSON for the broker (the HTTP publish body too): ValueError for anything every
    subscriber could not receive, nesting too deep for the parser and lone surrogates
    included."""
    try:
        obj = _loads(text)
    except RecursionError:
        raise ValueError("nested too deep") from None
    _check_text(obj)  # bytes are decoded with surrogatepass: always look
    return obj


def check_data(data: Any, max_depth: int, *, finite: bool) -> None:
    """Published data every subscriber can receive: nested at most `max_depth` arrays or
    objects deep (converting it between encodings must not overflow a stack) and, when
    `finite` (msgpack data, which JSON subscribers get converted), no NaN or infinity.
    ClientError(bad_request) otherwise. Iterative: no input can exhaust our stack."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | tuple | dict):
            if depth >= max_depth:
                raise ClientError(BAD_REQUEST, f"data nested deeper than {max_depth} levels")
            values = item.values() if isinstance(item, dict) else item
            stack.extend((value, depth + 1) for value in values)
        elif finite and isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise ClientError(
                    BAD_REQUEST, "NaN and infinite numbers cannot reach JSON subscribers"
                )


def check_client_topic(topic: Any, max_topic_bytes: int) -> str:
    """A topic a request may name: the grammar (broker/topics.py), or a reserved topic,
    `SYS_PREFIX` followed by the grammar; ClientError(bad_topic) otherwise."""
    if isinstance(topic, str) and topic.startswith(SYS_PREFIX):
        rest = topic[len(SYS_PREFIX) :]
        check_topic(rest, max_topic_bytes - len(SYS_PREFIX))
        return topic
    return check_topic(topic, max_topic_bytes)


class Request(NamedTuple):
    """One decoded client request (immutable; a NamedTuple is cheap to build per frame)."""

    op: str
    topic: str | None
    id: int | str | None
    payload: bytes | None = None  # publish: the data, encoded as `encoding` says
    encoding: int = ENCODING_JSON
    options: dict[str, Any] | None = None  # extra fields (e.g. "since"), for later features


class WireCodec:
    """Decode client frames and encode server frames for one encoding."""

    __slots__ = ("binary", "encoding", "max_data_bytes", "max_data_depth", "max_topic_bytes")

    def __init__(
        self,
        subprotocol: str | None,
        *,
        max_topic_bytes: int,
        max_data_bytes: int,
        max_data_depth: int = 64,
    ):
        self.binary = subprotocol == SUBPROTOCOL_MSGPACK
        self.encoding = ENCODING_MSGPACK if self.binary else ENCODING_JSON
        self.max_topic_bytes = max_topic_bytes
        self.max_data_bytes = max_data_bytes
        self.max_data_depth = max_data_depth

    # --- client -> server --------------------------------------------------------------------

    def decode(self, frame: str | bytes) -> Request:
        """One client frame as a Request; ClientError carries the reply's code and reason.

        Every way a frame can be wrong ends here as a ClientError, nesting so deep that the
        parser gives up (RecursionError) included: nothing else escapes."""
        if self.binary:
            if not isinstance(frame, bytes):
                raise ClientError(BAD_REQUEST, "text frame on a redwire.msgpack connection")
            try:
                obj = msgpack_loads(frame)
            except (ValueError, RecursionError) as exc:
                raise ClientError(BAD_REQUEST, f"invalid msgpack: {exc}"[:200]) from None
        else:
            if not isinstance(frame, str):
                raise ClientError(BAD_REQUEST, "binary frame on a redwire.json connection")
            try:
                obj = _loads(frame)
                if "\\u" in frame:  # only an escape makes a lone surrogate in a str frame
                    _check_text(obj)
            except RecursionError:
                raise ClientError(BAD_REQUEST, "invalid JSON: nested too deep") from None
            except ValueError as exc:
                raise ClientError(BAD_REQUEST, f"invalid JSON: {exc}"[:200]) from None
        if not isinstance(obj, dict):
            raise ClientError(BAD_REQUEST, "a request must be an object")
        req_id = obj.get("id")
        if req_id is not None and (
            isinstance(req_id, bool) or not isinstance(req_id, int | str) or _too_long(req_id)
        ):
            raise ClientError(BAD_REQUEST, "id must be an integer or a short string")
        try:
            return self._decode_request(obj, req_id)
        except ClientError as exc:
            exc.request_id = req_id  # the error reply carries the request's id
            raise

    def _decode_request(self, obj: dict[str, Any], req_id: int | str | None) -> Request:
        op = obj.get("op")
        if not isinstance(op, str) or op not in _OPS:
            raise ClientError(UNKNOWN_OP, f"unknown op {op!r}"[:120])
        if op == "ping":
            return Request("ping", None, req_id)
        if op == "refresh":  # a new connection token (docs/protocol.md, "Authentication")
            token = obj.get("token")
            if not isinstance(token, str) or not token:
                raise ClientError(BAD_REQUEST, "refresh needs a token (a string)")
            return Request("refresh", None, req_id, options={"token": token})
        topic = check_client_topic(obj.get("topic"), self.max_topic_bytes)
        extra = {k: v for k, v in obj.items() if k not in ("op", "topic", "id", "data")} or None
        if op != "publish":
            return Request(op, topic, req_id, options=extra)
        if "data" not in obj:
            raise ClientError(BAD_REQUEST, "publish needs data")
        check_data(obj["data"], self.max_data_depth, finite=self.binary)
        payload = self.encode_data(obj["data"])
        return Request("publish", topic, req_id, payload, self.encoding, extra)

    def encode_data(self, data: Any) -> bytes:
        """Application data as payload bytes in this codec's encoding, within the limit."""
        try:
            payload = msgpack_dumps(data) if self.binary else _dumps(data).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ClientError(BAD_REQUEST, f"data cannot be encoded: {exc}") from None
        if len(payload) > self.max_data_bytes:
            raise ClientError(TOO_LARGE, f"data over {self.max_data_bytes} bytes")
        return payload

    # --- server -> client --------------------------------------------------------------------

    def encode(self, obj: dict[str, Any]) -> str | bytes:
        """A control reply (ack, error, pong, welcome, ...) as a frame's data."""
        return msgpack_dumps(obj) if self.binary else _dumps(obj)

    def ack(self, req_id: Any, **fields: Any) -> str | bytes:
        return self.encode({"op": "ack", "id": req_id, **fields})

    def error(self, req_id: Any, code: str, reason: str) -> str | bytes:
        reply: dict[str, Any] = {"op": "error", "code": code, "reason": reason}
        if req_id is not None:
            reply["id"] = req_id
        return self.encode(reply)


def _too_long(value: int | str) -> bool:
    if isinstance(value, str):
        return len(value) > 64
    return abs(value) >= 2**53


def message_frame_body(
    topic: str,
    payload: bytes,
    encoding: int,
    *,
    binary: bool,
    offset: int | None = None,
    epoch: str | None = None,
) -> bytes:
    """The `message` frame's data for one published payload, built around its bytes.

    `encoding` is the payload's; `binary` says which the receiving clients speak. When they
    differ the data is converted (once per message per worker, by the caller's cache).
    """
    return b"".join(message_frame_parts(topic, payload, encoding, binary, offset, epoch))


@functools.lru_cache(maxsize=16384)
def _json_head(topic: str) -> bytes:
    """`{"op":"message","topic":T` for JSON clients: made once per topic, not per message."""
    return _dumps({"op": "message", "topic": topic})[:-1].encode()


@functools.lru_cache(maxsize=1024)
def _json_epoch(epoch: str | None) -> bytes:
    return b',"epoch":' + _dumps(epoch).encode() + b',"data":'


def message_frame_parts(
    topic: str,
    payload: bytes,
    encoding: int,
    binary: bool,
    offset: int | None = None,
    epoch: str | None = None,
) -> list[bytes]:
    """`message_frame_body` as the pieces to join, so a caller can put the frame header in
    front and join once (the hub does: one join per message per variant)."""
    if not binary:
        if encoding != ENCODING_JSON:
            payload = _dumps(_jsonable(msgpack_loads(payload))).encode("utf-8")
        if offset is None:
            return [_json_head(topic), b',"data":', payload, b"}"]
        return [_json_head(topic), b',"offset":', b"%d" % offset, _json_epoch(epoch), payload, b"}"]
    fields: dict[str, Any] = {"op": "message", "topic": topic}
    if offset is not None:
        fields["offset"] = offset
        fields["epoch"] = epoch
    if encoding != ENCODING_MSGPACK:
        payload = msgpack_dumps(_loads(payload))
    head = msgpack_dumps(fields)
    # One more entry in the map, then "data": payload. A fixmap header is 0x80 | n.
    return [bytes((head[0] + 1,)), head[1:], _MSGPACK_DATA, payload]


def _jsonable(value: Any) -> Any:
    """msgpack data for JSON clients: bytes become base64 strings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value
