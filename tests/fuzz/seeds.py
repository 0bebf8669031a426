"""The handcrafted seed corpus: `python -m tests.fuzz.seeds` (re)writes tests/fuzz/corpus/.

Each seed is a valid (or almost valid) input in its target's layout (tests/fuzz/targets.py
docstrings), so the fuzzer starts past the checks random bytes never get through: masks,
the request line, the Sec-WebSocket-Accept of the key, deflate streams, msgpack maps.
Inputs the fuzzer found worth keeping (minimized crashes, regressions) live beside these
under names starting `found-`; this script leaves them alone.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

import jwt
import msgpack

from broker.envelope import BusMessage, pack
from broker.frames import Opcode, serialize_frame
from broker.handshake import accept_key

from .targets import JWT_SECRET, frame

CORPUS = Path(__file__).parent / "corpus"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="

# frames flags: bit 0 client, 1 deflate, 2 structured, 3 peer keeps context, 4-7 split.
SERVER, CLIENT, DEFLATE, STRUCT, CONTEXT = 0x00, 0x01, 0x02, 0x04, 0x08


def _split(pattern: int) -> int:
    return pattern << 4


def _deflate(data: bytes, bits: int = 15) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -bits)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def _masked(opcode: int, payload: bytes, **kw: bool) -> bytes:
    return frame(opcode, payload, mask=True, **kw)


def _record(kind: int, payload: bytes) -> bytes:
    return bytes((kind, len(payload))) + payload


def frames() -> dict[str, bytes]:
    text, binary = Opcode.TEXT, Opcode.BINARY
    cont, ping, close = Opcode.CONTINUATION, Opcode.PING, Opcode.CLOSE
    hello = b'{"op":"subscribe","topic":"chat.a","id":1}'
    window = 0x36  # bits byte: both windows 15 bits (9 + (bits & 7) % 7, 9 + (bits >> 3) % 7)
    seeds = {
        "server-text": bytes((SERVER, 0)) + _masked(text, hello),
        "server-binary-ping-close": bytes((SERVER | _split(3), 0))
        + _masked(binary, b"\x81\xa2op\xa4ping")
        + _masked(ping, b"hi")
        + _masked(close, struct.pack("!H", 1000) + b"bye"),
        "server-fragmented-utf8": bytes((SERVER | _split(1), 0))
        + _masked(text, "h\u00e9".encode()[:2], fin=False)
        + _masked(ping, b"")
        + _masked(cont, "h\u00e9".encode()[2:] + "\u20ac".encode()),
        "server-bad-utf8-partial": bytes((SERVER | _split(2), 0))
        + _masked(text, b"ok\xf4\x90\x80\x80 and more text after it"),
        "server-unmasked": bytes((SERVER, 0)) + serialize_frame(text, b"no mask"),
        "server-len16": bytes((SERVER | _split(5), 0)) + _masked(binary, b"x" * 200),
        "server-len64-too-big": bytes((SERVER, 0))
        + b"\x82\xff"
        + struct.pack("!Q", 1 << 40)
        + b"mask",
        "server-deflate": bytes((SERVER | DEFLATE, window))
        + _masked(text, _deflate(b"compressed " * 10), rsv1=True)
        + _masked(binary, b"plain"),
        "server-deflate-fragmented": bytes((SERVER | DEFLATE | _split(4), window))
        + _masked(binary, _deflate(b"abc" * 40)[:5], rsv1=True, fin=False)
        + _masked(cont, _deflate(b"abc" * 40)[5:]),
        "server-deflate-bomb": bytes((SERVER | DEFLATE, window))
        + _masked(binary, _deflate(b"\x00" * 100_000), rsv1=True),
        "client-text": bytes((CLIENT, 0)) + serialize_frame(text, hello),
        "client-deflate-context": bytes((CLIENT | DEFLATE | CONTEXT, window))
        + serialize_frame(text, _deflate(b"hello"), rsv1=True),
        "client-close-bad-code": bytes((CLIENT, 0)) + serialize_frame(close, b"\x03\xed"),
        # Structured: [kind][length][payload] records (targets._build_stream).
        "struct-server-all-kinds": bytes((SERVER | STRUCT | _split(1), 0))
        + _record(0, b"text")
        + _record(1, b"\x00\x01")
        + _record(2, b"ping")
        + _record(3, b"")
        + _record(0x36, "fragments \u00e9\u20ac".encode())
        + _record(0x57, b"binary in two with a ping")
        + _record(4, b"\x00bye"),
        "struct-client-deflate": bytes((CLIENT | DEFLATE | STRUCT | _split(2), 0x12))
        + _record(0x08, b"compress me " * 5)
        + _record(0x3E, b"and me, in four fragments " * 3)
        + _record(0x01, b"not compressed"),
        "struct-server-deflate-context": bytes(
            (SERVER | DEFLATE | CONTEXT | STRUCT, 0x3F)
        )  # 9 bits
        + _record(0x08, b"one " * 20)
        + _record(0x08, b"one " * 20)
        + _record(0x09, b"x"),
        "struct-local-closing": bytes((CLIENT | DEFLATE | STRUCT | _split(3), 0x40 | 0x36))
        + _record(0x08, b"still delivered " * 4)
        + _record(2, b"not answered")
        + _record(4, b"\x05done"),
        "struct-over-limit": bytes((SERVER | STRUCT | _split(7), 0)) + _record(0xF7, b"y" * 100),
        # Found: the second fragment's header announces more than the limit has left.
        "struct-fragment-past-limit": bytes((SERVER | STRUCT | _split(1), 0))
        + _record(0x97, b"z" * 120),
        "struct-garbage": bytes((CLIENT | STRUCT, 0)) + _record(0, b"a") + _record(5, b"\x8f\x00"),
    }
    return seeds


def _request(*headers: str, line: str = "GET /ws?x=1 HTTP/1.1", body: bytes = b"") -> bytes:
    return ("\r\n".join((line, *headers)) + "\r\n\r\n").encode() + body


UPGRADE = (
    "Host: broker.example:8765",
    "Upgrade: websocket",
    "Connection: keep-alive, Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
)


def _token(claims: dict[str, object], alg: str = "HS256") -> str:
    return jwt.encode({"exp": 4_000_000_000, **claims}, JWT_SECRET, algorithm=alg)


def handshake() -> dict[str, bytes]:
    # flags: bits 0-1 mode (0 server, 1 PROXY + server, 2 client, 3 policy), 2-3 origins,
    # 4 no compression, 5-6 hosts; then a split pattern byte.
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-foo"
    accepted = "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover"
    return {
        "server-upgrade": b"\x00\x00" + _request(*UPGRADE),
        "server-upgrade-all": b"\x24\x03"
        + _request(
            *UPGRADE,
            "Origin: https://app.example",
            "Sec-WebSocket-Protocol: chat, redwire.msgpack",
            offer,
            'Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits="10"',
        ),
        "server-upgrade-token": b"\x00\x00"
        + _request(
            *UPGRADE,
            "X-Forwarded-For: 203.0.113.7, 10.0.0.2",
            "Sec-WebSocket-Protocol: redwire.json, redwire.token." + _token({"sub": "ann"}),
            line="GET /ws HTTP/1.1",
        ),
        "server-upgrade-bearer": b"\x00\x05"
        + _request(*UPGRADE, "Authorization: Bearer " + _token({"sub": "b", "subs": ["a.*"]})),
        "server-upgrade-token-query": b"\x00\x00"
        + _request(*UPGRADE, line=f"GET /ws?token={_token({'sub': 1}, 'HS384')} HTTP/1.1"),
        "proxy-v1": b"\x01\x03"
        + b"PROXY TCP4 203.0.113.9 10.0.0.1 51000 8765\r\n"
        + _request(*UPGRADE, "X-Forwarded-For: unknown"),
        "proxy-v1-unknown": b"\x01\x00" + b"PROXY UNKNOWN\r\n" + _request("Host: h"),
        "proxy-v2": b"\x01\x07"
        + b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24"
        + bytes(range(32))
        + b"\xc3\x50\x22\x3d"
        + _request(*UPGRADE),
        "proxy-v2-local": b"\x01\x00"
        + b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x03abc"
        + _request("Host: h"),
        "server-upgrade-foreign-origin": b"\x00\x01"
        + _request(*UPGRADE, "Origin: http://evil.example"),
        "server-upgrade-bad-version": b"\x40\x00"
        + _request(*UPGRADE[:4], "Sec-WebSocket-Version: 8"),
        "server-post": b"\x00\x02"
        + _request(
            "Host: h", "Content-Length: 11", line="POST /publish HTTP/1.1", body=b'{"a":1}tail'
        ),
        "server-http10-path": b"\x00\x00"
        + _request("Host: h", line="GET /a%20b%00%zz/%C3%A9 HTTP/1.0"),
        "server-static-traversal": b"\x00\x00"
        + _request("Host: h", line="GET /sub/%2e%2e/%2E%2E/secret.txt HTTP/1.1"),
        "server-static-symlink": b"\x00\x03"
        + _request("Host: h", line="GET /sub/../link.txt?x HTTP/1.1"),
        "server-static-file": b"\x00\x00" + _request("Host: h", line="GET //sub/a.txt HTTP/1.1"),
        "server-transfer-encoding": b"\x00\x00" + _request("Host: h", "Transfer-Encoding: chunked"),
        "server-obs-fold": b"\x00\x00" + _request("Host: h", " folded"),
        "client-101": b"\x02\x00"
        + _request(
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_key(KEY)}",
            "Sec-WebSocket-Protocol: redwire.json",
            accepted + "; client_no_context_takeover; client_max_window_bits=12",
            line="HTTP/1.1 101 Switching Protocols",
        )
        + serialize_frame(Opcode.TEXT, b"early"),
        "client-403": b"\x02\x01" + _request("Content-Length: 0", line="HTTP/1.1 403 Forbidden"),
        "client-no-reason": b"\x02\x00" + _request(line="HTTP/1.1 101"),
        "policy": b"\x67\x00"
        + b"\n".join(
            (
                b"https://app.example broker.example",
                b"null [::1]:8765",
                b"http://LOCALHOST:3000 localhost:3000",
                b"permessage-deflate; client_max_window_bits=9; server_no_context_takeover",
                b'permessage-deflate; server_max_window_bits="8", permessage-deflate',
            )
        ),
    }


def deflate() -> dict[str, bytes]:
    # flags: bit 0 server, bit 1 context, bits 2-3 mode; then a window-bits byte.
    def messages(*items: bytes) -> bytes:
        return b"".join(bytes((len(m),)) + m for m in items)

    return {
        "inflate-messages": b"\x01\x36"
        + messages(_deflate(b"hello " * 20), b"\x00", b"\xff\xff", _deflate(b"x", 9)),
        "inflate-stored-final": b"\x00\x3f" + messages(b"\x01\x03\x00\xfc\xffabc"),
        "inflate-context": b"\x03\x36"
        + messages(_deflate(b"again " * 10), _deflate(b"again " * 10)),
        "roundtrip": b"\x05\x09" + messages(b"abc" * 10, b"", bytes(range(100)), b"\x80x"),
        "roundtrip-context": b"\x07\x2d" + messages(b"same text " * 8, b"same text " * 8),
        "bomb": b"\x09\x36\x00",
        "bomb-text": b"\x08\x00" + b"0123456789abcdef",
        "bomb-connection": b"\x0d\x3f\x00",
    }


def wire() -> dict[str, bytes]:
    # flags: bits 0-1 mode (0 JSON, 1 msgpack, 2 wrong frame type, 3 envelope), 2-7 depth.
    depth = 0x3F << 2

    def j(obj: object) -> bytes:
        return bytes((depth,)) + json.dumps(obj).encode()

    def m(obj: object) -> bytes:
        return bytes((depth | 1,)) + msgpack.packb(obj, use_bin_type=True)

    return {
        "json-subscribe": j({"op": "subscribe", "topic": "chat.a", "id": 1, "since": 3}),
        "json-publish": j(
            {"op": "publish", "topic": "t", "id": "x", "data": {"a": [1, 2.5, None, "\u00e9"]}}
        ),
        "json-publish-bigint": b"\xfc"
        + b'{"op":"publish","topic":"t","data":18446744073709551616}',
        "json-publish-deep": b"\x08" + b'{"op":"publish","topic":"t","data":[[[[[1]]]]]}',
        "json-nan": b"\x00" + b'{"op":"publish","topic":"t","data":NaN}',
        "json-ping": j({"op": "ping", "id": 9007199254740993}),
        "json-escapes": j({"op": "subscribe", "topic": "t", "id": "\u00e9\n", "key": "\u2603"}),
        "json-bad-topic": j({"op": "unsubscribe", "topic": "a b", "id": True}),
        "msgpack-publish": m(
            {"op": "publish", "topic": "t", "id": 2, "data": {"b": b"\x00\xff", "f": 1.5}}
        ),
        "msgpack-presence": m({"op": "presence", "topic": "room:1"}),
        "msgpack-ext": bytes((depth | 1,)) + b"\x81\xa2op\xd4\x01\x00",
        "msgpack-float-inf": m({"op": "publish", "topic": "t", "data": float("inf")}),
        "wrong-type": b"\x02" + b'{"op":"ping"}',
        "envelope": b"\x03" + pack(BusMessage("chat.a", b'{"x":1}', 0, "w1", 5, "ep")),
        "envelope-v2": b"\x03" + msgpack.packb([2, "t"]),
    }


def _raw(b0: int, payload: bytes) -> bytes:
    return bytes((b0, len(payload))) + payload


def session() -> dict[str, bytes]:
    # flags: bit 0 msgpack, bit 1 deflate, bit 2 the other frame type; then [length][frame].
    def frames(flags: int, *requests: object) -> bytes:
        out = bytes((flags,))
        for request in requests:
            raw = request if isinstance(request, bytes) else _encode(request, flags & 1)
            out += bytes((len(raw),)) + raw
        return out

    def _encode(obj: object, binary: int) -> bytes:
        return msgpack.packb(obj, use_bin_type=True) if binary else json.dumps(obj).encode()

    history = {"op": "subscribe", "topic": "h.a", "id": 1, "since": {"offset": 0, "epoch": "x"}}
    return {
        "json-pubsub": frames(
            0,
            {"op": "subscribe", "topic": "room.1", "id": 1},
            {"op": "publish", "topic": "room.1", "data": {"n": 1}, "id": 2, "key": "k1"},
            {"op": "publish", "topic": "room.1", "data": {"n": 1}, "id": 3, "key": "k1"},
            {"op": "unsubscribe", "topic": "room.1", "id": 4},
        ),
        "json-history-presence": frames(
            2,
            {"op": "publish", "topic": "h.a", "data": [1, 2], "id": "p"},
            history,
            {"op": "subscribe", "topic": "p.room", "id": 2},
            {"op": "presence", "topic": "p.room", "id": 3},
        ),
        "json-refused": frames(
            0,
            {"op": "subscribe", "topic": "closed.x", "id": 1},
            {"op": "publish", "topic": "$sys.stats", "data": 1, "id": 2},
            {"op": "refresh", "token": "a.b.c", "id": 3},
            b"not json",
            b'{"op":"ping","id":"\\u00e9"}',
        ),
        "msgpack-pubsub": frames(
            1,
            {"op": "subscribe", "topic": "h.b", "id": 1},
            {"op": "publish", "topic": "h.b", "data": b"\x00\xff", "id": 2},
            {"op": "subscribe", "topic": "h.b", "id": 3, "since": {"offset": 1, "epoch": ""}},
        ),
        "wrong-type": frames(4, b'{"op":"ping","id":1}'),
        # raw: [first byte][length][payload]
        "raw-fragments": b"\x0a"
        + _raw(0x01, b'{"op":"pin')
        + _raw(0x89, b"hi")
        + _raw(0x80, b'g","id":1}')
        + _raw(0xC1, zlib.compress(b"{}")[2:7])
        + _raw(0x81, b"\xff\xfe\xfd"),
        "raw-close": b"\x08" + _raw(0x88, b"\x03\xf3ok"),
        # plain HTTP: flags bit 4, then the request bytes
        "http-healthz": b"\x10" + _request("Host: h", line="GET /healthz HTTP/1.1"),
        "http-publish": b"\x10"
        + _request(
            "Host: h",
            "Authorization: Bearer fuzz-api-key",
            "Content-Length: 40",
            line="POST /publish HTTP/1.1",
            body=b'{"topic":"h.x","data":[1],"key":"k"}    ',
        ),
        "http-static": b"\x10" + _request("Host: h", line="GET /sub/%61.txt HTTP/1.1"),
        "http-bad-path": b"\x10" + _request("Host: h", line="GET /%00%ff HTTP/1.1"),
        "http-upgrade": b"\x10" + _request(*UPGRADE),
    }


GENERATORS = {
    "frames": frames,
    "handshake": handshake,
    "deflate": deflate,
    "wire": wire,
    "session": session,
}


def main() -> int:
    for target, make in GENERATORS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            (folder / name).write_bytes(data)
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"corpus: {total} bytes under {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
