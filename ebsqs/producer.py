"""Sending: from a task call to broker messages.

Everything here runs at ``.delay()`` time: settings are read then, the broker is looked up then
(one per URL and process), and every check that can fail (JSON, size) runs before anything is
sent, so a failed call sends nothing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from ebsqs.brokers import MAX_BATCH, MAX_DELAY_SECONDS, Broker, OutgoingMessage, from_url
from ebsqs.brokers.base import QueueSettings
from ebsqs.brokers.checks import utf8_size
from ebsqs.config import Settings, load_settings
from ebsqs.envelope import Envelope, encode
from ebsqs.errors import MessageTooLargeError, QueueDoesNotExist

if TYPE_CHECKING:
    from ebsqs.task import Call, SendOptions, Task

log = structlog.get_logger(__name__)


@functools.cache
def broker_for(url: str) -> Broker:
    """The broker of a URL, one object per process and URL (clients inside are per process)."""
    return from_url(url)


def send_calls(task: Task[Any, Any], calls: Sequence[Call], options: SendOptions) -> list[str]:
    """Encode and send calls of a task; return their task ids."""
    from ebsqs.task import due_time, new_envelope

    settings = load_settings()
    now = time.time()
    max_retries = _first(options.max_retries, task.max_retries, settings.default_max_retries)
    due = due_time(options, _first(task.default_delay, settings.default_delay), now)
    envelopes = [new_envelope(task, call, max_retries, now) for call in calls]
    if settings.eager or options.execute_inline:
        from ebsqs.eager import run_eagerly

        return [run_eagerly(envelope, settings) for envelope in envelopes]
    logical = _first(options.queue_name, task.queue_name, settings.default_queue)
    broker = broker_for(settings.broker_url)
    messages = [
        outgoing(envelope, due, settings, broker.max_body_bytes, options, logical)
        for envelope in envelopes
    ]
    send_messages(broker, settings, settings.physical_queue(logical), messages)
    return [envelope.id for envelope in envelopes]


def outgoing(
    envelope: Envelope,
    due: float,
    settings: Settings,
    limit: int,
    options: SendOptions | None = None,
    queue: str | None = None,
) -> OutgoingMessage:
    """The broker message for an envelope due at ``due``, size-checked.

    ``queue`` is the logical queue, written into django-eb-sqs bodies (``legacy_producer``).

    Delays past SQS's 15 minutes put the due time in the body and the longest delay SQS allows
    on the message; the worker sends it on again until it is due.
    """
    remaining = due - time.time()
    if remaining > MAX_DELAY_SECONDS:
        envelope = envelope.with_due(due)
    body = encode(
        envelope, signing_key=settings.signing_key, legacy=settings.legacy_producer, queue=queue
    )
    size = utf8_size(body)
    if size > limit:
        raise MessageTooLargeError(size, limit, envelope.task)
    return OutgoingMessage(
        body=body,
        delay=min(max(round(remaining), 0), MAX_DELAY_SECONDS),
        group_id=options.group_id if options else None,
        dedup_id=options.dedup_id if options else None,
    )


def send_messages(
    broker: Broker, settings: Settings, queue: str, messages: Sequence[OutgoingMessage]
) -> list[str]:
    """Send in batches of ten, creating the queue first if it is missing and allowed."""
    ids: list[str] = []
    for start in range(0, len(messages), MAX_BATCH):
        batch = messages[start : start + MAX_BATCH]
        try:
            ids += broker.send_batch(queue, batch)
        except QueueDoesNotExist:
            if not settings.auto_create_queues:
                raise
            ensure_queue(broker, settings, queue)
            ids += broker.send_batch(queue, batch)
    return ids


def ensure_queue(broker: Broker, settings: Settings, queue: str) -> None:
    """Create a (physical) queue with its dead-letter queue and redrive policy."""
    dead_letter = settings.dead_letter_queue_of_physical(queue)
    broker.ensure_queue(
        queue,
        QueueSettings(
            visibility_timeout=settings.visibility_timeout,
            dead_letter_queue=dead_letter,
            max_receive_count=settings.max_receive_count,
            fifo=queue.endswith(".fifo"),
        ),
    )
    log.info("queue_ensured", queue=queue, dead_letter_queue=dead_letter)


def _first(*values: Any) -> Any:
    return next(value for value in values if value is not None)
