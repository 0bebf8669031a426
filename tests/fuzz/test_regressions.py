"""Bugs the fuzz harness's properties caught, each pinned by a plain unit test.

1. A JSON request whose id (or any option: `key`, `token`, `since.epoch`) held half a
   surrogate pair, written as a `\\ud800` escape, was accepted; the reply echoing the id
   could not be encoded as a UTF-8 text frame, so the session failed and the connection was
   closed 1011 with a traceback logged, for 27 bytes any client can send. The same bytes in
   a POST /publish body (`key`) reached Redis, which cannot encode them either. Now such
   JSON is `bad_request` (400 on /publish). Inputs: corpus/wire/found-lone-surrogate-*.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ClientError
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
