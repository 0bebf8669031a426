"""Every error Redwire raises on purpose, in one tree.

RedwireError
├── ProtocolError          a peer broke RFC 6455/7692; carries the close code to send
│   ├── PayloadTooBig      1009: a message or frame over the configured limit
│   └── InvalidUTF8        1007: a text message or close reason that is not UTF-8
├── HandshakeError         an opening handshake we refuse; carries the HTTP status
│   └── InvalidToken       401: a connection token refused (broker/auth.py)
├── ConnectionClosedError  use of a connection after it closed
├── ClientError            a well-formed WebSocket message the pub/sub protocol rejects;
│                          carries a stable error code string (see docs/protocol.md)
├── BusError               the message bus failed
│   ├── BusUnavailable     not done: the command never reached Redis (a retry is safe)
│   ├── BusOutcomeUnknown  sent, but no reply came: it may have run (retry with the same key)
│   └── EnvelopeError      bytes on a bus channel that are not a well-formed envelope
└── ConfigError            a setting is invalid or a required program is missing
"""

from __future__ import annotations

from collections.abc import Iterable

# Close codes (RFC 6455 section 7.4.1) and the ones we use from the registry.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005  # never sent on the wire
CLOSE_ABNORMAL = 1006  # never sent on the wire
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_MANDATORY_EXTENSION = 1010
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
# Private-use codes (RFC 6455 section 7.4.2), docs/protocol.md "Close codes".
CLOSE_TOKEN_EXPIRED = 4001  # no new token by exp: get a new token, then reconnect


class RedwireError(Exception):
    """Root of every error Redwire raises on purpose."""


class ProtocolError(RedwireError):
    """The peer violated the WebSocket protocol; close with `close_code`."""

    def __init__(self, reason: str, close_code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


class PayloadTooBig(ProtocolError):
    """A frame or message is larger than the configured limit (1009)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, CLOSE_TOO_BIG)


class InvalidUTF8(ProtocolError):
    """Text data that is not valid UTF-8 (1007)."""

    def __init__(self, reason: str = "invalid UTF-8 in text data") -> None:
        super().__init__(reason, CLOSE_INVALID_DATA)


class HandshakeError(RedwireError):
    """The opening handshake is refused with HTTP `status` and extra response `headers`."""

    def __init__(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = list(headers)


class ConnectionClosedError(RedwireError):
    """The connection is closed (or closing) and cannot send data."""

    def __init__(self, code: int = CLOSE_ABNORMAL, reason: str = "") -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class ClientError(RedwireError):
    """A pub/sub request the server rejects; `code` is a stable machine-readable string."""

    def __init__(self, code: str, reason: str, request_id: int | str | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.request_id = request_id  # the `id` of the request it answers, when known


class BusError(RedwireError):
    """The message bus failed."""


class BusUnavailable(BusError):
    """The bus could not take the command: it was never written to Redis, so nothing
    happened and a retry is safe (a publish was NOT published)."""


class BusOutcomeUnknown(BusError):
    """The command was written to Redis but no reply came (timeout, connection lost): it
    may or may not have run. Retry a publish only with the same idempotency key."""


class EnvelopeError(BusError):
    """Bytes read from the bus are not a well-formed envelope (see broker/envelope.py)."""


class ConfigError(RedwireError):
    """A setting is invalid, or something the configuration needs cannot be found."""
