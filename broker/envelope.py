"""The envelope: how one publication travels over the bus, and Redwire's only msgpack user.

A publication is packed once by the publishing worker and unpacked once by each receiving
worker; its `payload` is the application data already encoded for clients (JSON text or
msgpack, says `encoding`) and is never re-encoded on the fan-out path.

Wire format, version 1: one msgpack array

    [1, topic: str, payload: bin, encoding: int, origin: str, offset: int|nil, epoch: str|nil]

A new field means a new version number; `unpack` refuses every version but its own, so a
worker never misreads a newer peer's envelope (the bus counts and skips it).

`msgpack_dumps` / `msgpack_loads` are the seam for other modules that speak msgpack (the
worker's client protocol): they bound every length and raise ValueError on bad input.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from broker.errors import EnvelopeError

ENCODING_JSON = 0  # payload is the UTF-8 JSON text of the data
ENCODING_MSGPACK = 1  # payload is the msgpack encoding of the data
ENCODINGS = frozenset((ENCODING_JSON, ENCODING_MSGPACK))

VERSION = 1
_FIELDS = 7  # version, topic, payload, encoding, origin, offset, epoch

_MSGPACK_ERRORS = (ValueError, TypeError, msgpack.UnpackException)


class BusMessage(NamedTuple):
    """One publication on one topic, as carried by the bus. Immutable (a NamedTuple: one
    is built per publish and per message each worker reads, and a frozen dataclass costs
    four times as much to build). The fields are in wire order: `pack` sends them as they
    stand, behind VERSION."""

    topic: str
    payload: bytes  # the application data, already encoded; never re-encoded on fan-out
    encoding: int  # ENCODING_JSON or ENCODING_MSGPACK
    origin: str = ""  # who published (worker id, SDK id)
    offset: int | None = None  # reserved for per-topic history (a later issue)
    epoch: str | None = None


def pack(message: BusMessage) -> bytes:
    """The envelope bytes for `message`; ValueError if a field has the wrong type."""
    m = message
    if (
        type(m.topic) is not str
        or not isinstance(m.payload, bytes | bytearray | memoryview)
        or m.encoding not in ENCODINGS
        or type(m.encoding) is not int
        or type(m.origin) is not str
        or not (m.offset is None or type(m.offset) is int)
        or not (m.epoch is None or type(m.epoch) is str)
    ):
        raise ValueError(f"cannot pack {message!r}: a field has the wrong type")
    return msgpack.packb((VERSION, *m), use_bin_type=True)


def unpack(data: bytes) -> BusMessage:
    """The message in an envelope; EnvelopeError on anything but a well-formed version 1."""
    try:
        fields = msgpack.unpackb(data, use_list=False, raw=False, strict_map_key=True)
    except _MSGPACK_ERRORS as exc:
        raise EnvelopeError(f"envelope is not valid msgpack: {exc!r}") from None
    if type(fields) is not tuple or not fields:
        raise EnvelopeError("envelope is not a msgpack array")
    if type(fields[0]) is not int or fields[0] != VERSION:
        raise EnvelopeError(f"unsupported envelope version {fields[0]!r}")
    if len(fields) != _FIELDS:
        raise EnvelopeError(f"envelope has {len(fields)} fields, version 1 has {_FIELDS}")
    _, topic, payload, encoding, origin, offset, epoch = fields
    if (
        type(topic) is not str
        or type(payload) is not bytes
        or type(encoding) is not int
        or encoding not in ENCODINGS
        or type(origin) is not str
        or not (offset is None or type(offset) is int)
        or not (epoch is None or type(epoch) is str)
    ):
        raise EnvelopeError("envelope field of the wrong type")
    return BusMessage(topic, payload, encoding, origin, offset, epoch)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not accepted")


def msgpack_dumps(obj: Any) -> bytes:
    """msgpack bytes for `obj` (str as str, bytes as bin); ValueError if it cannot be encoded."""
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, msgpack.PackException) as exc:
        raise ValueError(f"cannot encode as msgpack: {exc}") from None


def msgpack_loads(
    data: bytes | bytearray | memoryview,
    *,
    max_str_len: int | None = None,
    max_bin_len: int | None = None,
    max_array_len: int | None = None,
    max_map_len: int | None = None,
) -> Any:
    """Decode one msgpack object (arrays as lists, map keys str or bytes).

    Each `max_*` bounds one kind of length (bytes for str/bin, items for array/map);
    None means "no more than the input's own size". Extension types are refused.
    Raises ValueError on malformed input, trailing bytes, or a length over its limit.
    """
    size = len(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=size if max_str_len is None else max_str_len,
            max_bin_len=size if max_bin_len is None else max_bin_len,
            max_array_len=size if max_array_len is None else max_array_len,
            max_map_len=size // 2 if max_map_len is None else max_map_len,
            max_ext_len=0,
        )
    except _MSGPACK_ERRORS as exc:
        raise ValueError(f"invalid msgpack: {exc!r}") from None
