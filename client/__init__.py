"""Redwire's Python SDK.

- `client.pubsub.connect(url)`: the pub/sub client over WebSocket (reconnects, resubscribes,
  surfaces every break as a `Gap`); publishes raise `NotPublished` / `PublishOutcomeUnknown`.
- `client.publisher.Publisher` / `AsyncPublisher`: publish straight into the bus (Redis).
- `client.subscriber.Subscriber`: consume topics straight from the bus.
- `client.ws.connect(url)`: a plain WebSocket client on Redwire's Sans-I/O core.
- `client/js/redwire.js`: the browser client (served by the broker at /redwire.js).
"""

from client.publisher import AsyncPublisher, Publisher, PublisherFull
from client.pubsub import (
    CLOSE_CODE_POLICY,
    NotPublished,
    PublishOutcomeUnknown,
    PubSubClient,
    Subscription,
    connect,
    reconnect_policy,
)
from client.subscriber import Gap, Message, Subscriber

__all__ = [
    "CLOSE_CODE_POLICY",
    "AsyncPublisher",
    "Gap",
    "Message",
    "NotPublished",
    "PubSubClient",
    "PublishOutcomeUnknown",
    "Publisher",
    "PublisherFull",
    "Subscriber",
    "Subscription",
    "connect",
    "reconnect_policy",
]
