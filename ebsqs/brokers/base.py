"""The broker contract: what every broker (SQS, SQLite, memory) provides.

Brokers move opaque string bodies; they know nothing of tasks or envelopes. Semantics follow
SQS: a received message is invisible for its visibility timeout and comes back unless it is
acknowledged (deleted); a message received more than a queue's ``max_receive_count`` times is
moved to that queue's dead-letter queue by the broker itself (the redrive policy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

#: SQS's own limits, which every broker enforces so code that works locally works on AWS.
MAX_BATCH = 10
MAX_DELAY_SECONDS = 900
MAX_VISIBILITY_SECONDS = 12 * 60 * 60
MAX_WAIT_SECONDS = 20
#: SQS's largest message (body and attributes) since August 2025, and its default for new queues.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: SQS's deduplication interval on FIFO queues.
DEDUP_WINDOW_SECONDS = 300

#: Message attributes a receive returns even with ``metadata=False``: the claim-check pointer's
#: size (AWS's SQS Extended Client writes the first, its older versions the second) and what
#: ebsqs signs an offloaded payload with. Every other attribute is fetched only with metadata.
WORKER_ATTRIBUTES = (
    "ExtendedPayloadSize",
    "SQSLargePayloadSize",
    "ebsqs-payload-sha256",
    "ebsqs-payload-signature",
)


def is_fifo(queue: str) -> bool:
    """Whether a broker-side queue name is a FIFO queue's (on SQS the name ends in ``.fifo``)."""
    return queue.endswith(".fifo")


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message to send.

    Attributes:
        body: the message body (text).
        delay: seconds before it becomes visible, 0..900.
        attributes: message attributes (dead-letter reasons travel here): a ``str`` is sent as
            SQS data type ``String``, an ``int`` as ``Number``.
        group_id: the message group: on a FIFO queue its order and exclusivity group; on a
            standard queue the tenant of SQS's fair queues.
        dedup_id: FIFO deduplication id (FIFO queues only): SQS drops a later send with the
            same id within five minutes.
    """

    body: str
    delay: int = 0
    attributes: Mapping[str, str | int] = field(default_factory=dict)
    group_id: str | None = None
    dedup_id: str | None = None


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One received message, with the handle needed to ack it or change its visibility.

    ``group_id``, ``dedup_id`` and ``receive_count`` are returned by every receive (with or
    without metadata); ``attributes`` holds every message attribute with metadata, and only
    :data:`WORKER_ATTRIBUTES` without (``Number`` attributes arrive as their text).
    """

    queue: str
    message_id: str
    receipt: str
    body: str
    receive_count: int = 1
    attributes: Mapping[str, str] = field(default_factory=dict)
    sent_at: float | None = None
    group_id: str | None = None
    dedup_id: str | None = None


def carried_attributes(message: ReceivedMessage) -> dict[str, str | int]:
    """The attributes a copy of ``message`` (a dead letter, a redrive) must keep: those of its
    claim-check pointer, the payload sizes as the ``Number`` attributes they were sent as."""
    carried: dict[str, str | int] = {}
    for name in WORKER_ATTRIBUTES:
        value = message.attributes.get(name)
        if value is not None:
            carried[name] = int(value) if value.isdigit() else value
    return carried


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """What ``ensure_queue`` creates.

    Attributes:
        visibility_timeout: default seconds a received message stays invisible.
        dead_letter_queue: name of the queue poison messages move to (created too), or None.
        max_receive_count: receives after which the broker moves a message to the DLQ.
        fifo: create a FIFO queue (the name must end in ``.fifo``); its dead-letter queue is
            FIFO too.
        max_body_bytes: the largest message the queue takes (SQS's ``MaximumMessageSize``);
            the dead-letter queue gets the same.
    """

    visibility_timeout: int = 30
    dead_letter_queue: str | None = None
    max_receive_count: int = 10
    fifo: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """The largest message a queue takes, and where that number comes from (for errors)."""

    bytes: int
    source: str


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Approximate counts, as SQS reports them."""

    queue: str
    visible: int
    in_flight: int
    delayed: int


@runtime_checkable
class Broker(Protocol):
    """The operations the producer, the worker loop and the CLI need.

    Batch operations take at most :data:`MAX_BATCH` entries. They retry the entries that fail
    transiently and raise :class:`~ebsqs.errors.PartialBatchError` naming the ones that still
    failed, except ``ack`` and ``change_visibility``, which return the failures (a failed delete
    is not an error the caller can fix: the message will simply be delivered again).

    A broker class also has a ``from_url(url)`` class method, which :func:`ebsqs.brokers.from_url`
    calls for the URL's scheme; a third-party broker registers its class under the entry-point
    group ``ebsqs.brokers`` with its scheme as the name.
    """

    #: The largest body (in UTF-8 bytes) the broker accepts on any queue.
    max_body_bytes: int

    def body_limit(self, queue: str) -> BodyLimit:
        """The largest message (body and attributes, UTF-8 bytes) ``queue`` takes.

        SQS reads the queue's ``MaximumMessageSize`` (once, cached with its URL); the embedded
        brokers answer their own limit. A missing queue answers the broker-wide limit.
        """
        ...

    def send(self, queue: str, message: OutgoingMessage) -> str:
        """Send one message; return its message id."""
        ...

    def send_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Send up to ten messages; return their ids in order."""
        ...

    def receive(
        self,
        queue: str,
        max_messages: int,
        wait_seconds: float,
        visibility_timeout: int | None = None,
        *,
        metadata: bool = True,
    ) -> list[ReceivedMessage]:
        """Receive up to ``max_messages`` (1..10), waiting up to ``wait_seconds`` for one.

        ``metadata=False`` lets a broker skip fetching message attributes other than
        :data:`WORKER_ATTRIBUTES`, and the sent time (the worker loop needs none of them, and on
        SQS they cost about 5 % of a no-op task's CPU); brokers that have them for free may
        return them anyway. The group, deduplication id and receive count always come back.

        A FIFO queue hands out a message group only while none of its messages is in flight,
        and a group's messages in order.
        """
        ...

    def ack(self, messages: Sequence[ReceivedMessage]) -> dict[str, str]:
        """Delete messages by receipt. Returns ``{message_id: reason}`` for those that failed."""
        ...

    def change_visibility(
        self, messages: Sequence[ReceivedMessage], timeout: int
    ) -> dict[str, str]:
        """Set the visibility of received messages (0 releases them at once).

        Returns ``{message_id: reason}`` for the entries that failed.
        """
        ...

    def ensure_queue(self, queue: str, settings: QueueSettings | None = None) -> None:
        """Create the queue (and its dead-letter queue and redrive policy) if missing."""
        ...

    def list_queues(self, prefix: str = "") -> list[str]:
        """Names of the queues whose name starts with ``prefix``."""
        ...

    def stats(self, queue: str) -> QueueStats:
        """Approximate visible / in-flight / delayed counts."""
        ...

    def purge(self, queue: str) -> None:
        """Delete every message in the queue."""
        ...

    def delete_queue(self, queue: str) -> None:
        """Delete the queue itself (tests and `ebsqs queues delete`)."""
        ...

    def close(self) -> None:
        """Release clients, connections and file handles held by this process."""
        ...
