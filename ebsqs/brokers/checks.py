"""Argument checks every broker applies, so a mistake fails the same way on each of them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ebsqs.brokers.base import (
    MAX_BATCH,
    MAX_DELAY_SECONDS,
    MAX_VISIBILITY_SECONDS,
    MAX_WAIT_SECONDS,
    OutgoingMessage,
)
from ebsqs.errors import BrokerError, MessageTooLargeError

#: SQS's limit on one SendMessageBatch: the bodies and attributes of its entries, in all.
MAX_BATCH_BYTES = 1024 * 1024
#: What SQS counts for each string attribute besides its name and value: its data type.
_STRING_TYPE_BYTES = len("String")


def check_batch(entries: Sequence[object]) -> None:
    """A batch holds 1..10 entries, as on SQS."""
    if not 1 <= len(entries) <= MAX_BATCH:
        raise BrokerError(f"a batch holds 1 to {MAX_BATCH} entries, got {len(entries)}")


def check_message(message: OutgoingMessage, max_body_bytes: int) -> None:
    """Delay within 0..900 s and a body within the broker's size limit."""
    if not 0 <= message.delay <= MAX_DELAY_SECONDS:
        raise BrokerError(f"delay must be 0..{MAX_DELAY_SECONDS} seconds, got {message.delay}")
    size = utf8_size(message.body)
    if size > max_body_bytes:
        raise MessageTooLargeError(size, max_body_bytes, "(raw message)")


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (every ebsqs body)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def message_bytes(message: OutgoingMessage) -> int:
    """The bytes SQS counts for a message: its body, and each attribute's name, type and value."""
    size = utf8_size(message.body)
    for name, value in message.attributes.items():
        size += utf8_size(name) + _STRING_TYPE_BYTES + utf8_size(value)
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
