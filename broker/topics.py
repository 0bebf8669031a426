"""Topic names: the one grammar every entry point checks (docs/protocol.md).

1 to `max_topic_bytes` characters from `A-Z a-z 0-9 _ . : -`.
"""

from __future__ import annotations

import re
from typing import Any

from broker.errors import ClientError

BAD_TOPIC = "bad_topic"
_TOPIC_RE = re.compile(r"[A-Za-z0-9_.:\-]+")


def check_topic(topic: Any, max_topic_bytes: int) -> str:
    """Return `topic` if it follows the grammar, else raise ClientError("bad_topic")."""
    if not isinstance(topic, str) or not topic:
        raise ClientError(BAD_TOPIC, "topic must be a non-empty string")
    if len(topic) > max_topic_bytes:
        raise ClientError(BAD_TOPIC, f"topic longer than {max_topic_bytes} bytes")
    if not _TOPIC_RE.fullmatch(topic):
        raise ClientError(BAD_TOPIC, "topic may only contain A-Z a-z 0-9 _ . : -")
    return topic
