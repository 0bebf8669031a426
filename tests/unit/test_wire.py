"""worker.wire: request decoding (both encodings), the topic grammar, ids, and message frames.

Pure: no sockets, no event loop. Every malformed request maps to its docs/protocol.md error
code; message frames are parsed back with json/msgpack and compared as data.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from broker.envelope import ENCODING_JSON, ENCODING_MSGPACK
from broker.errors import ClientError
from broker.settings import Settings
from worker import wire
from worker.wire import (
    BAD_REQUEST,
    BAD_TOPIC,
    TOO_LARGE,
    UNKNOWN_OP,
    Request,
    WireCodec,
    check_topic,
    message_frame_body,
)

S = Settings()
MAX_TOPIC = S.max_topic_bytes


def json_codec(max_data_bytes: int = S.max_data_bytes) -> WireCodec:
    return WireCodec(None, max_topic_bytes=MAX_TOPIC, max_data_bytes=max_data_bytes)


def msgpack_codec(max_data_bytes: int = S.max_data_bytes) -> WireCodec:
    return WireCodec(
        wire.SUBPROTOCOL_MSGPACK, max_topic_bytes=MAX_TOPIC, max_data_bytes=max_data_bytes
    )


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def error_of(codec: WireCodec, frame: str | bytes) -> ClientError:
    with pytest.raises(ClientError) as info:
        codec.decode(frame)
    return info.value


# --- decode: one table per encoding ----------------------------------------------------------

JSON_BAD: list[tuple[str, str | bytes, str, Any]] = [
    # (id, frame, error code, request id the error reply carries)
    ("binary-frame", b'{"op":"ping"}', BAD_REQUEST, None),
    ("not-json", "{op: ping}", BAD_REQUEST, None),
    ("truncated", '{"op":"ping"', BAD_REQUEST, None),
    ("empty", "", BAD_REQUEST, None),
    ("byte-order-mark", '\ufeff{"op":"ping"}', BAD_REQUEST, None),
    ("trailing-data", '{"op":"ping"} {}', BAD_REQUEST, None),
    ("array", '["ping"]', BAD_REQUEST, None),
    ("string", '"ping"', BAD_REQUEST, None),
    ("number", "1", BAD_REQUEST, None),
    ("null", "null", BAD_REQUEST, None),
    ("no-op", '{"id":1}', UNKNOWN_OP, 1),
    ("unknown-op", '{"op":"shout","id":"a"}', UNKNOWN_OP, "a"),
    ("op-case", '{"op":"PING"}', UNKNOWN_OP, None),
    ("op-number", '{"op":5}', UNKNOWN_OP, None),
    ("op-null", '{"op":null}', UNKNOWN_OP, None),
    ("op-list", '{"op":["ping"],"id":2}', UNKNOWN_OP, 2),
    ("op-object", '{"op":{"x":1}}', UNKNOWN_OP, None),
    ("subscribe-no-topic", '{"op":"subscribe","id":3}', BAD_TOPIC, 3),
    ("subscribe-empty-topic", '{"op":"subscribe","topic":""}', BAD_TOPIC, None),
    ("subscribe-topic-number", '{"op":"subscribe","topic":7}', BAD_TOPIC, None),
    ("subscribe-topic-list", '{"op":"subscribe","topic":["a"]}', BAD_TOPIC, None),
    ("subscribe-topic-space", '{"op":"subscribe","topic":"a b","id":4}', BAD_TOPIC, 4),
    ("unsubscribe-bad-topic", '{"op":"unsubscribe","topic":"a/b"}', BAD_TOPIC, None),
    ("publish-no-topic", '{"op":"publish","data":1}', BAD_TOPIC, None),
    ("publish-no-data", '{"op":"publish","topic":"t","id":5}', BAD_REQUEST, 5),
    ("publish-nan", '{"op":"publish","topic":"t","data":NaN}', BAD_REQUEST, None),
    ("publish-infinity", '{"op":"publish","topic":"t","data":[-Infinity]}', BAD_REQUEST, None),
    ("id-bool", '{"op":"ping","id":true}', BAD_REQUEST, None),
    ("id-float", '{"op":"ping","id":1.0}', BAD_REQUEST, None),
    ("id-list", '{"op":"ping","id":[1]}', BAD_REQUEST, None),
    ("id-object", '{"op":"ping","id":{}}', BAD_REQUEST, None),
    ("id-too-big", '{"op":"ping","id":9007199254740992}', BAD_REQUEST, None),
    ("id-too-small", '{"op":"ping","id":-9007199254740992}', BAD_REQUEST, None),
    ("id-too-long", '{"op":"ping","id":"' + "x" * 65 + '"}', BAD_REQUEST, None),
    ("huge-int-literal", '{"op":"ping","id":' + "9" * 5000 + "}", BAD_REQUEST, None),
]


@pytest.mark.parametrize(
    ("frame", "code", "request_id"), [c[1:] for c in JSON_BAD], ids=[c[0] for c in JSON_BAD]
)
def test_json_decode_errors(frame: str | bytes, code: str, request_id: Any) -> None:
    err = error_of(json_codec(), frame)
    assert err.code == code, err
    assert err.request_id == request_id
    assert err.reason


MSGPACK_BAD: list[tuple[str, str | bytes, str, Any]] = [
    ("text-frame", '{"op":"ping"}', BAD_REQUEST, None),
    ("not-msgpack", b"\xc1", BAD_REQUEST, None),
    ("empty", b"", BAD_REQUEST, None),
    ("truncated", pack({"op": "ping"})[:-1], BAD_REQUEST, None),
    ("trailing-bytes", pack({"op": "ping"}) + b"\x00", BAD_REQUEST, None),
    ("array", pack(["ping"]), BAD_REQUEST, None),
    ("int-keys", pack({1: "ping"}), BAD_REQUEST, None),
    (
        "ext-type",
        pack({"op": "publish", "topic": "t", "data": msgpack.ExtType(5, b"x")}),
        BAD_REQUEST,
        None,
    ),
    ("bytes-op", pack({"op": b"ping"}), UNKNOWN_OP, None),
    ("op-list", pack({"op": ["ping"], "id": 1}), UNKNOWN_OP, 1),
    ("op-map", pack({"op": {"a": 1}}), UNKNOWN_OP, None),
    ("no-op", pack({"id": "x"}), UNKNOWN_OP, "x"),
    ("topic-bytes", pack({"op": "subscribe", "topic": b"t"}), BAD_TOPIC, None),
    ("publish-no-data", pack({"op": "publish", "topic": "t", "id": 9}), BAD_REQUEST, 9),
    ("id-bytes", pack({"op": "ping", "id": b"1"}), BAD_REQUEST, None),
    ("id-float", pack({"op": "ping", "id": 1.5}), BAD_REQUEST, None),
    ("id-bool", pack({"op": "ping", "id": False}), BAD_REQUEST, None),
    ("id-uint64", pack({"op": "ping", "id": 2**64 - 1}), BAD_REQUEST, None),
]


@pytest.mark.parametrize(
    ("frame", "code", "request_id"),
    [c[1:] for c in MSGPACK_BAD],
    ids=[c[0] for c in MSGPACK_BAD],
)
def test_msgpack_decode_errors(frame: str | bytes, code: str, request_id: Any) -> None:
    err = error_of(msgpack_codec(), frame)
    assert err.code == code, err
    assert err.request_id == request_id


def test_decode_valid_requests_json() -> None:
    c = json_codec()
    assert c.decode('{"op":"ping"}') == Request("ping", None, None)
    assert c.decode('{"op":"ping","id":7}') == Request("ping", None, 7)
    assert c.decode('{"op":"ping","id":null}') == Request("ping", None, None)
    assert c.decode('{"op":"subscribe","topic":"a.b","id":"s1"}') == Request(
        "subscribe", "a.b", "s1"
    )
    assert c.decode('{"op":"unsubscribe","topic":"a"}') == Request("unsubscribe", "a", None)
    # Extra fields travel as options, for later features.
    assert c.decode('{"op":"subscribe","topic":"a","since":3}').options == {"since": 3}
    req = c.decode('{"op":"publish","topic":"t","data":{"k": [1, 2.5, "é", null]},"id":1}')
    assert req.op == "publish" and req.topic == "t" and req.id == 1
    assert req.encoding == ENCODING_JSON
    assert json.loads(req.payload) == {"k": [1, 2.5, "é", None]}
    assert req.payload == '{"k":[1,2.5,"é",null]}'.encode()  # compact, UTF-8 as is


def test_decode_valid_requests_msgpack() -> None:
    c = msgpack_codec()
    assert c.decode(pack({"op": "ping", "id": "p"})) == Request("ping", None, "p")
    assert c.decode(pack({"op": "subscribe", "topic": "x"})) == Request("subscribe", "x", None)
    data = {"bin": b"\x00\xff", "n": [1, -2, 3.5], "s": "ü", "none": None}
    req = c.decode(pack({"op": "publish", "topic": "t", "data": data}))
    assert req.encoding == ENCODING_MSGPACK
    assert msgpack.unpackb(req.payload, raw=False) == data


@pytest.mark.parametrize("codec", [json_codec, msgpack_codec], ids=["json", "msgpack"])
def test_data_size_limit(codec) -> None:
    c = codec(max_data_bytes=100)

    def frame(data: str) -> str | bytes:
        obj = {"op": "publish", "topic": "t", "data": data}
        return pack(obj) if c.binary else json.dumps(obj)

    # The longest string whose encoding fits: the header size depends on the length.
    unlimited = codec()
    fits = max(n for n in range(100) if len(unlimited.encode_data("x" * n)) <= 100)
    assert len(c.decode(frame("x" * fits)).payload) <= 100
    err = error_of(c, frame("x" * (fits + 1)))
    assert err.code == TOO_LARGE


# --- ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "req_id",
    [0, 1, -1, 2**53 - 1, -(2**53 - 1), "", "a", "x" * 64, "é" * 64, "42"],
)
@pytest.mark.parametrize("codec", [json_codec, msgpack_codec], ids=["json", "msgpack"])
def test_ids_accepted_and_echoed(codec, req_id: int | str) -> None:
    c = codec()
    obj = {"op": "ping", "id": req_id}
    req = c.decode(pack(obj) if c.binary else json.dumps(obj))
    assert req.id == req_id
    assert type(req.id) is type(req_id)
    reply = c.ack(req.id)
    parsed = msgpack.unpackb(reply, raw=False) if c.binary else json.loads(reply)
    assert parsed == {"op": "ack", "id": req_id}


@pytest.mark.parametrize(
    "req_id",
    [True, False, 1.0, 0.5, 2**53, -(2**53), "x" * 65, [1], {"a": 1}],
    ids=["true", "false", "1.0", "0.5", "2^53", "-2^53", "65-chars", "list", "map"],
)
@pytest.mark.parametrize("codec", [json_codec, msgpack_codec], ids=["json", "msgpack"])
def test_ids_rejected(codec, req_id: Any) -> None:
    c = codec()
    obj = {"op": "ping", "id": req_id}
    err = error_of(c, pack(obj) if c.binary else json.dumps(obj))
    assert err.code == BAD_REQUEST
    assert err.request_id is None  # an invalid id is not echoed


def test_error_and_ack_replies() -> None:
    c = json_codec()
    assert json.loads(c.error(None, "bad_topic", "no")) == {
        "op": "error",
        "code": "bad_topic",
        "reason": "no",
    }
    assert json.loads(c.error(3, "bad_topic", "no"))["id"] == 3
    assert json.loads(c.ack("a")) == {"op": "ack", "id": "a"}
    m = msgpack_codec()
    assert msgpack.unpackb(m.error("x", "internal", "r"), raw=False) == {
        "op": "error",
        "code": "internal",
        "reason": "r",
        "id": "x",
    }


# --- topic grammar ---------------------------------------------------------------------------

GOOD_TOPICS = [
    "a",
    "Z",
    "0",
    "prices.eur:usd-spot_1",
    "...",
    "-",
    ":",
    "_",
    "x" * MAX_TOPIC,
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-",
]
BAD_TOPICS = [
    "",
    "x" * (MAX_TOPIC + 1),
    "a b",
    "a/b",
    "a*",
    "a#",
    "a\n",
    "\na",
    "a\x00",
    "é",
    "caf\u00e9",
    "\uff41",  # fullwidth a
    "\u0663",  # arabic-indic digit three
    "\u212a",  # Kelvin sign (folds to k)
    "a\u200b",  # zero-width space
    "topic\U0001f600",
]


@pytest.mark.parametrize("topic", GOOD_TOPICS)
def test_topic_accepted(topic: str) -> None:
    assert check_topic(topic, MAX_TOPIC) == topic
    assert json_codec().decode(json.dumps({"op": "subscribe", "topic": topic})).topic == topic


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_topic_rejected(topic: str) -> None:
    with pytest.raises(ClientError) as info:
        check_topic(topic, MAX_TOPIC)
    assert info.value.code == BAD_TOPIC
    err = error_of(msgpack_codec(), pack({"op": "subscribe", "topic": topic}))
    assert err.code == BAD_TOPIC


@pytest.mark.parametrize("bad", [None, 5, b"a", ["a"], {"a": 1}, 1.5, True])
def test_topic_of_wrong_type(bad: Any) -> None:
    with pytest.raises(ClientError) as info:
        check_topic(bad, MAX_TOPIC)
    assert info.value.code == BAD_TOPIC


def test_topic_limit_follows_setting() -> None:
    assert check_topic("x" * 10, 10) == "x" * 10
    with pytest.raises(ClientError):
        check_topic("x" * 11, 10)


# --- message frames --------------------------------------------------------------------------

SAMPLES: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    "",
    'héllo \u2028 "quoted" \\ 𝄞',
    [],
    {},
    [1, "two", None, [3.25]],
    {"nested": {"list": [{"a": 1}], "s": "x"}, "n": -7},
]


def parse_json_frame(body: bytes) -> dict[str, Any]:
    return json.loads(body.decode("utf-8"))


def parse_msgpack_frame(body: bytes) -> dict[str, Any]:
    return msgpack.unpackb(body, raw=False)


def published(codec: WireCodec, topic: str, data: Any) -> Request:
    obj = {"op": "publish", "topic": topic, "data": data}
    return codec.decode(pack(obj) if codec.binary else json.dumps(obj))


@pytest.mark.parametrize("data", SAMPLES, ids=[f"s{i}" for i in range(len(SAMPLES))])
@pytest.mark.parametrize("publisher", [json_codec, msgpack_codec], ids=["from-json", "from-mp"])
@pytest.mark.parametrize("subscriber_binary", [False, True], ids=["to-json", "to-msgpack"])
def test_message_frame_body_round_trip(publisher, subscriber_binary: bool, data: Any) -> None:
    req = published(publisher(), "room:1", data)
    body = message_frame_body("room:1", req.payload, req.encoding, binary=subscriber_binary)
    parse = parse_msgpack_frame if subscriber_binary else parse_json_frame
    assert parse(body) == {"op": "message", "topic": "room:1", "data": data}


def test_json_message_frame_keeps_payload_bytes_untouched() -> None:
    payload = b'{"b":1,  "a":[ 2 ]}'  # not how we would format it: must not be re-encoded
    body = message_frame_body("t", payload, ENCODING_JSON, binary=False)
    assert body.endswith(b',"data":' + payload + b"}")
    mp = pack({"x": b"\x01"})
    assert message_frame_body("t", mp, ENCODING_MSGPACK, binary=True).endswith(mp)


def test_msgpack_bin_reaches_json_subscribers_as_base64() -> None:
    raw = bytes(range(256))
    req = published(msgpack_codec(), "t", {"blob": raw, "list": [b"\x00", "s"]})
    json_body = parse_json_frame(message_frame_body("t", req.payload, req.encoding, binary=False))
    assert json_body["data"] == {
        "blob": base64.b64encode(raw).decode("ascii"),
        "list": [base64.b64encode(b"\x00").decode("ascii"), "s"],
    }
    mp_body = parse_msgpack_frame(message_frame_body("t", req.payload, req.encoding, binary=True))
    assert mp_body["data"] == {"blob": raw, "list": [b"\x00", "s"]}


# Data one encoding accepts but the other cannot express as such: each must either be refused
# at publish time (bad_request) or reach subscribers of both encodings; an exception while
# building the fan-out frame drops the hub's whole batch (worker/hub.py `deliver`).
CROSS = [
    ("json-int-above-uint64", json_codec, 2**64),
    ("json-int-below-int64", json_codec, -(2**63) - 1),
    ("json-big-int-in-list", json_codec, [1, 10**30]),
    ("msgpack-nan", msgpack_codec, math.nan),
    ("msgpack-infinity", msgpack_codec, {"x": -math.inf}),
]


@pytest.mark.parametrize(("publisher", "data"), [c[1:] for c in CROSS], ids=[c[0] for c in CROSS])
def test_accepted_publish_reaches_both_encodings(publisher, data: Any) -> None:
    try:
        req = published(publisher(), "t", data)
    except ClientError as exc:
        assert exc.code == BAD_REQUEST
        return
    for binary in (False, True):
        body = message_frame_body("t", req.payload, req.encoding, binary=binary)
        parsed = parse_msgpack_frame(body) if binary else parse_json_frame(body)
        assert parsed["op"] == "message" and "data" in parsed


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
)
_data = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@hsettings(max_examples=200, deadline=None)
@given(data=_data, from_binary=st.booleans())
def test_any_accepted_publish_can_be_framed_for_every_subscriber(
    data: Any, from_binary: bool
) -> None:
    codec = msgpack_codec() if from_binary else json_codec()
    obj = {"op": "publish", "topic": "t", "data": data}
    try:
        frame = pack(obj) if from_binary else json.dumps(obj)
    except OverflowError:
        return  # an integer msgpack itself cannot express: no client could send it
    try:
        req = codec.decode(frame)
    except ClientError as exc:
        assert exc.code in (BAD_REQUEST, TOO_LARGE)
        return
    for binary in (False, True):
        body = message_frame_body("t", req.payload, req.encoding, binary=binary)
        parsed = parse_msgpack_frame(body) if binary else parse_json_frame(body)
        assert parsed["op"] == "message" and parsed["topic"] == "t"


@pytest.mark.parametrize("topic", ["t", "room:1", "caf\u00e9.\u00fcber", 'q"uote\\d'])
@pytest.mark.parametrize("position", [None, (0, "e" * 16), (2**53, "0123456789abcdef")])
def test_the_cached_json_frame_is_what_json_dumps_writes(topic: str, position) -> None:
    """message_frame_body builds the JSON around the payload from cached pieces: the bytes
    are exactly those of the object the protocol describes, keys in the documented order."""
    payload = b'{"a":[1,2,{"b":null}]}'
    fields: dict[str, Any] = {"op": "message", "topic": topic}
    offset, epoch = position or (None, None)
    if position is not None:
        fields.update(offset=offset, epoch=epoch)
    fields["data"] = json.loads(payload)
    expected = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    body = message_frame_body(topic, payload, ENCODING_JSON, binary=False, offset=offset,
                              epoch=epoch)  # fmt: skip
    assert body == expected
