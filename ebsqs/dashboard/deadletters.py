"""Dead letters: browse them, send them back to their queue, or delete them.

A dead letter carries why it is there in message attributes (see
:meth:`ebsqs.worker.settle.Settler.dead_letter`): reason, error type, error text, traceback,
attempts, task and source queue. Reading them means receiving them, and every receive counts
against the message (SQS's ``ApproximateReceiveCount``). So a view receives each message at
most once (batches of ten with a visibility timeout long enough for the whole view, so a later
batch cannot return an earlier one's messages) and releases them all at once
(visibility 0) when it has read them.

Acting on chosen messages (a selection's redrive or delete) receives the same way, acts on the
messages asked for and releases the rest at once. :func:`redrive` (everything, or the first N)
is what ``ebsqs dlq redrive`` runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ebsqs.brokers import MAX_BATCH, Broker, OutgoingMessage, ReceivedMessage
from ebsqs.brokers.base import carried_attributes, is_fifo
from ebsqs.envelope import decode
from ebsqs.errors import EbsqsError
from ebsqs.worker.settle import ATTEMPTS, ERROR, ERROR_TYPE, REASON, SOURCE, TASK, TRACEBACK

#: Most dead letters one view reads (five receives of ten).
BROWSE_LIMIT = 50
#: Seconds a browsed message stays hidden if the release fails (the view's upper bound).
BROWSE_VISIBILITY = 30
#: What stands in for arguments the viewer may not see.
REDACTED = "(hidden: you may not see task arguments)"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter as the page shows it.

    Attributes:
        message_id: the dead letter's own message id (what a selection names).
        reason: why it was dead-lettered (``failed``, ``unknown_task``...), or ``?``.
        error_type: the exception's type, if a task failed.
        error: its text.
        traceback: the end of its traceback.
        attempts: attempts made, as recorded.
        task: the task name, from the attributes or else from the body.
        source: the queue it came from.
        arguments: ``args`` and ``kwargs`` as JSON-like text, or :data:`REDACTED`.
        receive_count: receives of the dead letter so far (browsing counts one per view).
        sent_at: when it was dead-lettered (epoch seconds), if the broker says.
    """

    message_id: str
    reason: str
    error_type: str
    error: str
    traceback: str
    attempts: str
    task: str
    source: str
    arguments: str
    receive_count: int
    sent_at: float | None


def describe(message: ReceivedMessage, *, show_arguments: bool) -> DeadLetter:
    """A received dead letter as a :class:`DeadLetter`; arguments only if ``show_arguments``."""
    attributes = message.attributes
    task, arguments = _from_body(message.body, show_arguments)
    return DeadLetter(
        message_id=message.message_id,
        reason=attributes.get(REASON, "?"),
        error_type=attributes.get(ERROR_TYPE, ""),
        error=attributes.get(ERROR, ""),
        traceback=attributes.get(TRACEBACK, ""),
        attempts=attributes.get(ATTEMPTS, ""),
        task=attributes.get(TASK) or task,
        source=attributes.get(SOURCE, ""),
        arguments=arguments,
        receive_count=message.receive_count,
        sent_at=message.sent_at,
    )


def _from_body(body: str, show_arguments: bool) -> tuple[str, str]:
    """The task name and arguments a body carries; ``?`` for a body that does not decode.

    Decoding never runs anything (pickle stays refused), and a signed body decodes as well as
    an unsigned one: the page shows what is there, it does not judge it.
    """
    try:
        envelope = decode(body)
    except EbsqsError:
        return "?", REDACTED if not show_arguments else f"(undecodable body) {body[:500]}"
    if not show_arguments:
        return envelope.task, REDACTED
    return envelope.task, _arguments_text(envelope.args, envelope.kwargs)


def _arguments_text(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    parts = [repr(value) for value in args]
    parts += [f"{key}={value!r}" for key, value in kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= 2000 else text[:2000] + "…"


def browse(
    broker: Broker, queue: str, *, show_arguments: bool, limit: int = BROWSE_LIMIT
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of ``queue`` (a broker-side name), each received once and
    released before this returns."""
    received = _receive_all(broker, queue, limit)
    try:
        return [describe(message, show_arguments=show_arguments) for message in received]
    finally:
        release(broker, received)


def _receive_all(broker: Broker, queue: str, limit: int) -> list[ReceivedMessage]:
    """Receive up to ``limit`` messages in batches; each stays hidden while later batches are
    received, so none comes twice."""
    received: list[ReceivedMessage] = []
    try:
        while len(received) < limit:
            want = min(MAX_BATCH, limit - len(received))
            batch = broker.receive(
                queue, want, wait_seconds=0, visibility_timeout=BROWSE_VISIBILITY
            )
            if not batch:
                break
            received += batch
    except BaseException:
        release(broker, received)
        raise
    return received


def release(broker: Broker, messages: Sequence[ReceivedMessage]) -> None:
    """Make received messages visible again at once (in batches of ten)."""
    for start in range(0, len(messages), MAX_BATCH):
        with contextlib.suppress(EbsqsError):  # they come back at the visibility timeout
            broker.change_visibility(messages[start : start + MAX_BATCH], 0)


def redrive(broker: Broker, source: str, target: str, limit: int | None) -> int:
    """Move messages from ``source`` to ``target``: send first, then delete."""
    moved = 0
    while limit is None or moved < limit:
        want = MAX_BATCH if limit is None else min(MAX_BATCH, limit - moved)
        batch = broker.receive(source, want, wait_seconds=0, visibility_timeout=60)
        if not batch:
            break
        broker.send_batch(target, [redriven(m, fifo=is_fifo(target)) for m in batch])
        broker.ack(batch)
        moved += len(batch)
    return moved


def redriven(message: ReceivedMessage, *, fifo: bool) -> OutgoingMessage:
    """A dead letter sent back: its body, its group and its claim-check attributes, not the
    reasons. On FIFO its deduplication id is fixed per dead letter, so a redrive interrupted
    between the send and the delete does not run it twice."""
    return OutgoingMessage(
        message.body,
        attributes=carried_attributes(message),
        group_id=message.group_id,
        dedup_id=f"{message.message_id}:redrive" if fifo else None,
    )


def redrive_selected(broker: Broker, source: str, target: str, ids: Collection[str]) -> int:
    """Move the dead letters named by ``ids`` from ``source`` to ``target``; the others are
    released at once. Returns how many moved (a message another viewer holds is missed)."""
    chosen, others = _pick(broker, source, ids)
    try:
        for start in range(0, len(chosen), MAX_BATCH):
            batch = chosen[start : start + MAX_BATCH]
            broker.send_batch(target, [redriven(m, fifo=is_fifo(target)) for m in batch])
            broker.ack(batch)
    finally:
        release(broker, others)
    return len(chosen)


def delete_selected(broker: Broker, source: str, ids: Collection[str]) -> int:
    """Delete the dead letters named by ``ids``; the others are released at once."""
    chosen, others = _pick(broker, source, ids)
    try:
        for start in range(0, len(chosen), MAX_BATCH):
            broker.ack(chosen[start : start + MAX_BATCH])
    finally:
        release(broker, others)
    return len(chosen)


def delete_all(broker: Broker, source: str) -> int:
    """Delete every dead letter of ``source`` (receive and delete, batch by batch)."""
    deleted = 0
    while batch := broker.receive(source, MAX_BATCH, wait_seconds=0, visibility_timeout=60):
        broker.ack(batch)
        deleted += len(batch)
    return deleted


def _pick(
    broker: Broker, source: str, ids: Collection[str]
) -> tuple[list[ReceivedMessage], list[ReceivedMessage]]:
    wanted = set(ids)
    received = _receive_all(broker, source, max(BROWSE_LIMIT, len(wanted)))
    chosen = [m for m in received if m.message_id in wanted]
    return chosen, [m for m in received if m.message_id not in wanted]
