"""`redwire serve` as shipped, against a browser on another site and a hostile HTTP client.

Real supervisor and worker processes on a loopback port, a real Redis. Checks the defaults
docs/security.md promises: the same origin only, no Origin (not a browser) welcome, bad
request paths a 400 and never a traceback, nosniff everywhere, the API key from a file
(`REDWIRE_API_KEY_FILE`) and never in the log, and a misspelt REDWIRE_* variable refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator

import pytest
import websockets
from support.processes import REPO, ServerProcess, redwire, serve
from websockets.exceptions import InvalidStatus

API_KEY = "file-key-5d1f0c"


@pytest.fixture(scope="module")
def secured(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("security")
    key_file = root / "api_key"
    key_file.write_text(API_KEY + "\n")
    site = root / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>app</h1>")
    server = serve(
        redis_server.url,
        workers=1,
        env={
            "REDWIRE_API_KEY_FILE": str(key_file),
            "REDWIRE_STATIC_DIR": str(site),
            "REDWIRE_CHANNEL_PREFIX": "security:",
        },
    )
    yield server
    assert server.stop() == 0
    output = "".join(server.output)
    assert API_KEY not in output, "the API key reached the log"
    assert "Traceback" not in output


async def http(server: ServerProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        data = await asyncio.wait_for(reader.read(), 10)  # the server closes after answering
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        (None, True),  # not a browser
        ("same", True),
        ("http://evil.example", False),
        ("http://127.0.0.1:1", False),  # same host, another port: another origin
        ("null", False),
    ],
)
async def test_origin_by_default(secured: ServerProcess, origin: str | None, ok: bool) -> None:
    if origin == "same":
        origin = f"http://{secured.host}:{secured.port}"
    kwargs = {} if origin is None else {"origin": origin}
    if ok:
        async with websockets.connect(secured.url, subprotocols=["redwire.json"], **kwargs) as ws:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert welcome["op"] == "welcome"
    else:
        with pytest.raises(InvalidStatus) as info:
            await websockets.connect(secured.url, **kwargs)
        assert info.value.response.status_code == 403


@pytest.mark.parametrize(
    ("path", "status"),
    [("/", 200), ("/%00", 400), ("/%ff", 400), ("/..%2f..%2fetc%2fpasswd", 404), ("/x", 404)],
)
async def test_paths_under_static_dir(secured: ServerProcess, path: str, status: int) -> None:
    got, headers, body = await http(secured, f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    assert got == status, body
    assert headers["x-content-type-options"] == "nosniff"
    assert b"root:" not in body


@pytest.mark.parametrize(("key", "status"), [(API_KEY, 200), ("wrong", 401)])
async def test_publish_with_the_key_from_the_file(
    secured: ServerProcess, key: str, status: int
) -> None:
    body = json.dumps({"topic": "security.t", "data": 1}).encode()
    request = (
        f"POST /publish HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    got, headers, _ = await http(secured, request)
    assert got == status
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REDWIRE_MAX_MESAGE_BYTES": "1"}, "did you mean REDWIRE_MAX_MESSAGE_BYTES?"),
        (
            {"REDWIRE_API_KEY": "k", "REDWIRE_API_KEY_FILE": "/nonexistent"},
            "api_key and api_key_file",
        ),
        ({"REDWIRE_API_KEY_FILE": "/nonexistent/key"}, "/nonexistent/key"),
        ({"REDWIRE_ALLOWED_ORIGINS": "https://app.example/"}, "allowed_origins"),
    ],
)
def test_bad_security_settings_stop_serve(env: dict[str, str], expected: str) -> None:
    argv = redwire("serve", "--host", "127.0.0.1", "--port", "0", "--redis", "memory://")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REDWIRE_")}
    done = subprocess.run(
        argv, env={**full_env, **env}, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 2, done
    assert expected in done.stdout + done.stderr
