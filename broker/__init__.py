"""Redwire's core: everything that is not an asyncio server.

Sans-I/O WebSocket layer (frames, handshake, connection state machine, permessage-deflate),
settings, errors, the message envelope, the bus (Redis and in-memory) and the supervisor.
This package never imports `worker` or `client`.
"""

__version__ = "0.1.0"
