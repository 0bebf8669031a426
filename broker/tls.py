"""TLS for the listening port: the one place that turns `certfile`/`keyfile` into an SSLContext.

With both settings set, every worker serves `wss://` and `https://` on its port (the same
port: there is no plain listener beside it). The supervisor builds the context once before
it starts anything, so a missing file, a key that does not match the certificate or a
wrong passphrase ends `redwire serve` with exit 2 and a message, not a worker crash loop.

The context is Python's server default (`ssl.create_default_context(Purpose.CLIENT_AUTH)`:
TLS 1.2 and newer, the OpenSSL build's secure cipher list), plus:
- ALPN `http/1.1` only: a browser must not pick h2, which we do not speak (RFC 8441's
  WebSocket over HTTP/2 included);
- no client certificates asked for (authentication is the application's or the token's);
- a certificate file may hold the chain after the leaf, as every CA delivers it.
The TLS handshake itself is bounded by `handshake_timeout_s` (worker/server.py), as the HTTP
one is: a client that opens TCP and sends nothing is dropped either way.
"""

from __future__ import annotations

import ssl

from broker.errors import ConfigError
from broker.settings import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The SSLContext for `settings`' listener, or None when TLS is off. ConfigError when
    the certificate or key cannot be loaded."""
    if settings.certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    for path in (settings.certfile, settings.keyfile):
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"TLS: cannot read {path}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(settings.certfile, settings.keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"TLS: cannot load the certificate {settings.certfile} with the key"
            f" {settings.keyfile or '(in the certificate file)'}: {exc}"
        ) from None
    return context
