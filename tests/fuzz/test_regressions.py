"""Bugs the fuzz harness's properties caught, each pinned by a plain unit test.

1. A JSON request whose id (or any option: `key`, `token`, `since.epoch`) held half a
   surrogate pair, written as a `\\ud800` escape, was accepted; the reply echoing the id
   could not be encoded as a UTF-8 text frame, so the session failed and the connection was
   closed 1011 with a traceback logged, for 27 bytes any client can send. The same bytes in
   a POST /publish body (`key`) reached Redis, which cannot encode them either. Now such
   JSON is `bad_request` (400 on /publish). Inputs: corpus/wire/found-lone-surrogate-*.
2. A fragmented message could hold twice `max_message_bytes`: each continuation frame's
   header was checked against the whole limit, not what the message had left of it, so a
   frame that had to fail 1009 was buffered in full first (1 MiB so far + a 1 MiB frame
   announced: 2 MiB held per connection). Now the header fails it (`buffered_in_bytes` at
   most the limit + a header). Input: corpus/frames/struct-fragment-past-limit.
3. (In the first fix for 2, found by the harness within minutes:) the lowered limit also
   applied to the first frame of the next message when it arrived in the same chunk as
   the last fragment, a false 1009. Only continuation frames are held to what their
   message has left. Input: corpus/frames/found-next-message-after-fragments.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.connection import Connection, ConnectionFailed, Role
from broker.errors import CLOSE_TOO_BIG, ClientError
from broker.frames import Opcode
from fuzz import targets
from worker import wire

CORPUS = Path(__file__).parent / "corpus"
CODEC = wire.WireCodec(None, max_topic_bytes=32, max_data_bytes=1000)


@pytest.mark.parametrize(
    "frame",
    [
        r'{"op":"ping","id":"\ud800"}',
        r'{"op":"subscribe","topic":"t","key":"x\udfff"}',
        r'{"op":"refresh","token":"\udbff"}',
        r'{"op":"subscribe","topic":"t","since":{"offset":1,"epoch":"\ud83d"}}',
        r'{"op":"publish","topic":"t","data":{"\ude00":1}}',
    ],
)
def test_a_lone_surrogate_in_a_json_request_is_bad_request(frame: str) -> None:
    with pytest.raises(ClientError) as caught:
        CODEC.decode(frame)
    assert caught.value.code == wire.BAD_REQUEST
    assert "surrogate" in caught.value.reason


def test_a_surrogate_pair_is_text() -> None:
    request = CODEC.decode(r'{"op":"ping","id":"\ud83d\ude00"}')
    assert request.id == "\N{GRINNING FACE}"
    CODEC.encode({"op": "pong", "id": request.id}).encode("utf-8")


@pytest.mark.parametrize(
    "body", [rb'{"topic":"t","data":1,"key":"\ud800"}', b'{"topic":"t","data":"\xed\xa0\x80"}']
)
def test_a_lone_surrogate_in_an_http_publish_body_is_refused(body: bytes) -> None:
    # json.loads decodes bytes with surrogatepass: raw ED A0 80 is one as well as the escape.
    with pytest.raises(ValueError, match="surrogate"):
        wire.loads_json(body)


def test_the_harness_reports_it_without_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    found = (CORPUS / "wire" / "found-lone-surrogate-id").read_bytes()
    targets.fuzz_wire(found)
    monkeypatch.setattr(wire, "_check_text", lambda obj: None)
    with pytest.raises(targets.Finding, match="text frame"):
        targets.fuzz_wire(found)


def _fragmented_past_the_limit(role: Role) -> tuple[Connection, bytes, bytes]:
    conn = Connection(role, max_message_bytes=1000)
    mask = role is Role.SERVER
    first = targets.frame(Opcode.BINARY, b"a" * 900, fin=False, mask=mask)
    second = targets.frame(Opcode.CONTINUATION, b"b" * 900, mask=mask)
    return conn, first, second


@pytest.mark.parametrize("one_chunk", [False, True], ids=["apart", "one-chunk"])
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_a_continuation_frame_past_the_limit_fails_at_its_header(
    role: Role, one_chunk: bool
) -> None:
    conn, first, second = _fragmented_past_the_limit(role)
    header = 4 + (4 if role is Role.SERVER else 0)
    start = second[: header + 10]  # the header and 10 bytes of 900
    if one_chunk:  # its header is read before the fragment ahead of it lowers the limit
        events = conn.receive_data(first + start)
    else:
        assert conn.receive_data(first) == []
        events = conn.receive_data(start)
    assert [type(e) for e in events] == [ConnectionFailed]
    assert events[0].code == CLOSE_TOO_BIG
    assert conn.buffered_in_bytes <= 1000 + 14


def test_fragments_within_the_limit_and_pings_between_still_pass() -> None:
    conn = Connection(Role.CLIENT, max_message_bytes=1000)
    stream = targets.frame(Opcode.TEXT, b"a" * 990, fin=False)
    stream += targets.frame(Opcode.PING, b"p" * 125)  # more than the 10 bytes left: control
    stream += targets.frame(Opcode.CONTINUATION, b"b" * 10)
    stream += targets.frame(Opcode.BINARY, b"c" * 1000)  # the next message: the whole limit
    for size in (1, 7, len(stream)):
        conn = Connection(Role.CLIENT, max_message_bytes=1000)
        events = [
            e for i in range(0, len(stream), size) for e in conn.receive_data(stream[i : i + size])
        ]
        assert [type(e).__name__ for e in events] == ["Ping", "TextMessage", "BinaryMessage"]


@pytest.mark.parametrize("split", ["one-read", "bytewise", "last-fragment-and-next-header"])
def test_the_next_message_has_the_whole_limit_whatever_the_reads(split: str) -> None:
    first = targets.frame(Opcode.BINARY, b"a" * 900, fin=False)
    last = targets.frame(Opcode.CONTINUATION, b"b" * 99)  # 999 of 1000
    stream = first + last + targets.frame(Opcode.PING, b"p" * 125)
    stream += targets.frame(Opcode.TEXT, b"c" * 1000)  # a new message: the whole limit
    cut = len(first) + 12  # the last fragment's header and 10 bytes: the limit is lowered
    reads = {
        "one-read": [stream],
        "bytewise": [stream[i : i + 1] for i in range(len(stream))],
        # Then its end, the ping and the next message's header are parsed in one read,
        # before the last fragment is handled and the message's limit restored.
        "last-fragment-and-next-header": [stream[:cut], stream[cut:]],
    }[split]
    conn = Connection(Role.CLIENT, max_message_bytes=1000)
    events = [event for data in reads for event in conn.receive_data(data)]
    assert [type(e).__name__ for e in events] == ["BinaryMessage", "Ping", "TextMessage"]


def test_the_harness_reports_the_old_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = (CORPUS / "frames" / "struct-fragment-past-limit").read_bytes()
    targets.fuzz_frames(seed)
    append = Connection._append

    def old_append(self: Connection, payload: bytes, final: bool) -> None:
        append(self, payload, final)
        self._parser.continuation_bytes = None  # each frame against the whole limit

    monkeypatch.setattr(Connection, "_append", old_append)
    with pytest.raises(targets.Finding, match="partial message holds"):
        targets.fuzz_frames(seed)


def test_the_session_target_reports_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: without the fix, the worker closed the connection 1011."""
    ping = rb'{"op":"ping","id":"\ud800"}'
    found = b"\x00" + bytes((len(ping),)) + ping
    targets.fuzz_session(found)
    monkeypatch.setattr(wire, "_check_text", lambda obj: None)
    with pytest.raises(targets.Finding, match="1011"):
        targets.fuzz_session(found)
