"""`redwire serve --certfile --keyfile`: wss:// and https:// on the port, nothing in clear.

Real supervisor and workers, a real Redis, a self-signed certificate made for the test
(tests/support/tls.py). Clients: our Python client and SDK, the `websockets` library and
plain `ssl` sockets; the browser's side is tests/e2e/test_browser_tls.py.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess

import pytest
import websockets
from support.processes import REPO, ServerProcess, free_port, redwire
from support.tls import SelfSigned

from client.pubsub import connect


def test_the_startup_line_says_https(tls_broker: ServerProcess) -> None:
    tls_broker.wait_for_output(rf"^serving https://127\.0\.0\.1:{tls_broker.port}/ with redis")


async def test_pub_sub_over_wss_across_workers(tls_broker: ServerProcess, tls_cert) -> None:
    url = f"wss://127.0.0.1:{tls_broker.port}/"
    context = tls_cert.client_context()
    clients = [await connect(url, ssl=context, reconnect=False) for _ in range(6)]
    try:
        subs = [await c.subscribe("tls.room") for c in clients]
        await clients[0].publish("tls.room", {"n": 1})
        for sub in subs:
            message = await sub.get(timeout_s=10)
            assert message.data == {"n": 1}
    finally:
        for c in clients:
            await c.close()


async def test_an_independent_client_speaks_wss(tls_broker: ServerProcess, tls_cert) -> None:
    url = f"wss://127.0.0.1:{tls_broker.port}/"
    async with websockets.connect(
        url, ssl=tls_cert.client_context(), subprotocols=["redwire.json"]
    ) as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["op"] == "welcome"
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "topic": "tls.solo"}))
        reply = json.loads(await ws.recv())
        assert (reply["op"], reply["id"]) == ("ack", 1), reply


def test_https_serves_health_and_the_page(tls_broker: ServerProcess, tls_cert) -> None:
    context = tls_cert.client_context()
    for path, status in (("/healthz", b"200"), ("/", b"200"), ("/nope", b"404")):
        with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                assert tls.selected_alpn_protocol() in (None, "http/1.1")
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                head = tls.recv(65536)
                assert head.split(b" ", 2)[1] == status, head[:200]


def test_plain_http_on_the_tls_port_gets_nothing_served(tls_broker: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        try:
            while chunk := raw.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"HTTP/1.1 200" not in answer  # a TLS alert or nothing: never a clear-text page


def test_a_client_that_does_not_trust_the_certificate_is_refused(
    tls_broker: ServerProcess,
) -> None:
    context = ssl.create_default_context()  # the system's CAs: not our self-signed one
    with socket.create_connection(("127.0.0.1", tls_broker.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, c: ("--certfile", str(d / "missing.pem")), "missing.pem"),
        (lambda d, c: ("--certfile", str(c.keyfile), "--keyfile", str(c.keyfile)), "TLS"),
        (lambda d, c: ("--keyfile", str(c.keyfile)), "keyfile needs certfile"),
    ],
    ids=["missing-file", "not-a-certificate", "key-without-certificate"],
)
def test_a_bad_certificate_setting_exits_2_before_serving(
    tmp_path, tls_cert: SelfSigned, make_args, message: str
) -> None:
    argv = redwire(
        "serve",
        "--port",
        str(free_port()),
        "--workers",
        "1",
        "--redis",
        "memory://",
        *make_args(tmp_path, tls_cert),
    )
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert "serving" not in done.stdout
