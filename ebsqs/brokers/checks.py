"""Argument checks every broker applies, so a mistake fails the same way on each of them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

from ebsqs.brokers.base import (
    MAX_BATCH,
    MAX_DELAY_SECONDS,
    MAX_VISIBILITY_SECONDS,
    MAX_WAIT_SECONDS,
    BodyLimit,
    OutgoingMessage,
    QueueSettings,
)
from ebsqs.errors import BrokerError, ConfigurationError, MessageTooLargeError

#: SQS's limit on one SendMessageBatch: the bodies and attributes of its entries, in all.
MAX_BATCH_BYTES = 1024 * 1024
#: What SQS counts for each attribute besides its name and value: its data type.
_STRING_TYPE_BYTES = len("String")
_NUMBER_TYPE_BYTES = len("Number")


def check_batch(entries: Sequence[object]) -> None:
    """A batch holds 1..10 entries, as on SQS."""
    if not 1 <= len(entries) <= MAX_BATCH:
        raise BrokerError(f"a batch holds 1 to {MAX_BATCH} entries, got {len(entries)}")


def check_messages(
    queue: str, messages: Sequence[OutgoingMessage], limit: BodyLimit, *, fifo: bool
) -> None:
    """Every message of a send to ``queue``: :func:`check_message`, and on a FIFO queue
    :func:`check_fifo_message`."""
    for message in messages:
        check_message(message, limit)
        if fifo:
            check_fifo_message(queue, message)


def check_message(message: OutgoingMessage, limit: BodyLimit) -> None:
    """Delay within 0..900 s, attributes of ``str`` or ``int``, and the whole message (body
    and attributes, as SQS counts it) within the queue's limit.

    Raises:
        BrokerError: a delay or attribute SQS would refuse.
        MessageTooLargeError: the message is over ``limit``.
    """
    if not 0 <= message.delay <= MAX_DELAY_SECONDS:
        raise BrokerError(f"delay must be 0..{MAX_DELAY_SECONDS} seconds, got {message.delay}")
    for name, value in message.attributes.items():
        # bool is an int to Python, but "True" is no SQS Number.
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise BrokerError(
                f"message attribute {name!r} must be a str or an int, got {type(value).__name__}"
            )
    size = message_bytes(message)
    if size > limit.bytes:
        raise MessageTooLargeError(size, limit.bytes, "(raw message)", limit.source)


def check_fifo_message(queue: str, message: OutgoingMessage) -> None:
    """A FIFO send names its group and has no per-message delay (SQS refuses both mistakes).

    Raises:
        BrokerError: no ``group_id``, or a delay.
    """
    if message.group_id is None:
        raise BrokerError(f"messages sent to FIFO queue {queue!r} need a group_id")
    if message.delay:
        raise BrokerError(
            f"FIFO queues take no per-message delay: a message to {queue!r} asked for "
            f"{message.delay} s (delay by visibility instead)"
        )


def check_fifo_names(queue: str, settings: QueueSettings) -> None:
    """A FIFO queue, and its dead-letter queue, are named ``*.fifo``, and only FIFO queues are.

    Raises:
        ConfigurationError: a name that does not match ``settings.fifo``.
    """
    names = [queue, *([settings.dead_letter_queue] if settings.dead_letter_queue else [])]
    for name in names:
        if name.endswith(".fifo") != settings.fifo:
            raise ConfigurationError(
                f"queue {name!r}: FIFO queue names must end in '.fifo' and only FIFO queue "
                f"names may (settings.fifo={settings.fifo}); a FIFO queue's dead-letter queue "
                "must be FIFO too"
            )


def embedded_body_limit(
    queue: str, queue_bytes: int | None, broker_bytes: int, broker: str
) -> BodyLimit:
    """The limit of a queue of an embedded broker (SQLite, memory).

    Args:
        queue: the queue's name.
        queue_bytes: the limit the queue was created with, or None if there is no such queue.
        broker_bytes: the broker-wide limit, which caps every queue's.
        broker: the broker's name in the ``source`` ("SQLite", "memory").
    """
    if queue_bytes is None:
        return BodyLimit(
            broker_bytes, f"the {broker} broker's limit (queue {queue!r} does not exist)"
        )
    if broker_bytes < queue_bytes:
        return BodyLimit(broker_bytes, f"the {broker} broker's limit")
    return BodyLimit(queue_bytes, f"max_body_bytes of {broker} queue {queue!r}")


def content_dedup_id(body: str) -> str:
    """The deduplication id SQS derives from a body on a queue with content-based
    deduplication: the SHA-256 of the body, in hex."""
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (every ebsqs body)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def message_bytes(message: OutgoingMessage) -> int:
    """The bytes SQS counts for a message: its body, and each attribute's name, type and value
    (an ``int`` is a ``Number``, counted as its decimal text)."""
    size = utf8_size(message.body)
    for name, value in message.attributes.items():
        if isinstance(value, str):
            size += utf8_size(name) + _STRING_TYPE_BYTES + utf8_size(value)
        else:
            size += utf8_size(name) + _NUMBER_TYPE_BYTES + len(str(value))
    return size


def batch_ranges(
    messages: Sequence[OutgoingMessage], max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[range]:
    """Consecutive index ranges of ``messages``, each a batch SQS accepts in one request.

    A batch ends at :data:`MAX_BATCH` entries or before its bytes would pass ``max_bytes``. A
    message larger than ``max_bytes`` on its own goes alone, for the broker to refuse by name.
    """
    start, size = 0, 0
    for index, message in enumerate(messages):
        added = message_bytes(message)
        if index > start and (index - start == MAX_BATCH or size + added > max_bytes):
            yield range(start, index)
            start, size = index, 0
        size += added
    if start < len(messages):
        yield range(start, len(messages))


def check_receive(max_messages: int, wait_seconds: float, visibility: int | None) -> None:
    """Receive arguments within SQS's ranges."""
    if not 1 <= max_messages <= MAX_BATCH:
        raise BrokerError(f"receive takes 1..{MAX_BATCH} messages, got {max_messages}")
    if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
        raise BrokerError(f"wait must be 0..{MAX_WAIT_SECONDS} seconds, got {wait_seconds}")
    if visibility is not None and not 0 <= visibility <= MAX_VISIBILITY_SECONDS:
        raise BrokerError(f"visibility must be 0..{MAX_VISIBILITY_SECONDS} s, got {visibility}")
