"""Deciding what becomes of a message once its task has an outcome: ack, retry or dead-letter.

The order is the guarantee: the retry or the dead-letter copy is sent *before* the original is
deleted, so a crash between the two repeats work instead of losing it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import TYPE_CHECKING

from ebsqs.backoff import Backoff
from ebsqs.brokers import (
    MAX_BATCH,
    MAX_VISIBILITY_SECONDS,
    Broker,
    OutgoingMessage,
    ReceivedMessage,
)
from ebsqs.brokers.base import BodyLimit, carried_attributes, is_fifo
from ebsqs.brokers.checks import message_bytes
from ebsqs.config import Settings
from ebsqs.counters import REJECTED, Counters
from ebsqs.envelope import Envelope
from ebsqs.errors import EbsqsError, EnvelopeError
from ebsqs.executors.execution import Outcome, OutcomeKind
from ebsqs.log import get_logger
from ebsqs.payload import ObjectRef, Payloads
from ebsqs.producer import outgoing, send_messages
from ebsqs.producer import payloads as producer_payloads
from ebsqs.worker.sender import Sender

if TYPE_CHECKING:
    from ebsqs.worker.held import Held

log = get_logger(__name__)

#: Seconds a finished message's delete may wait for nine others (``ack_wait``).
DEFAULT_ACK_WAIT = 0.1

#: Dead-letter copies carry why they are there in these message attributes.
REASON, ERROR_TYPE, ERROR, ATTEMPTS, SOURCE, TASK, TRACEBACK = (
    "ebsqs-reason",
    "ebsqs-error-type",
    "ebsqs-error",
    "ebsqs-attempts",
    "ebsqs-source-queue",
    "ebsqs-task",
    "ebsqs-traceback",
)
#: Characters of each dead-letter attribute kept (the traceback's last ones, where it failed).
ATTRIBUTE_CHARS = 1000
TRACEBACK_CHARS = 4000
#: Characters of the last error a worker reports in its heartbeats.
ERROR_NOTE_CHARS = 200


class Settler:
    """Acts on outcomes for one worker; owns every write the worker makes to the broker."""

    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        backoff: Backoff,
        counters: Counters,
        io: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
        ack_wait: float = DEFAULT_ACK_WAIT,
        payloads: Payloads | None = None,
    ) -> None:
        """
        Args:
            broker: where messages go.
            settings: dead-letter queue names, signing, limits.
            backoff: the default delays between retries.
            counters: the worker's counters.
            io: wraps every broker call (the worker's pulse: waiting on the network is not a
                stalled loop).
            ack_wait: the longest a finished message's delete waits for a full batch.
            payloads: deletes the S3 objects of offloaded messages once they are deleted.
        """
        self.io = io
        self.broker = broker
        self.settings = settings
        self.backoff = backoff
        self.counters = counters
        # Deletes wait here to go out ten per request. They go when ten are waiting, when the
        # oldest has waited ack_wait (checked as each is added, and by the keeper), and
        # whenever the loop would block or has nothing left to start. A crash repeats at most
        # the work finished in the last ack_wait (SQS is at-least-once anyway), while a batch
        # of quick tasks still costs one delete request.
        self.ack_wait = ack_wait
        self._acks: list[ReceivedMessage] = []
        # The deletes go out from threads of their own (see :mod:`.sender`).
        self._sender = Sender()
        #: Send deletes from the thread that flushes them, not the sender's (set by the loop
        #: for a broker whose round trip is shorter than a thread hand-off is worth).
        self.deletes_here = False
        self._oldest_ack = 0.0
        self._ack_lock = threading.Lock()
        self.payloads = payloads or producer_payloads(settings)
        #: The S3 object of each held offloaded message, by message id (set by the loop). Its
        #: object goes when the message is deleted; a dead letter (which points to it) or a
        #: released message keeps it.
        self.stored: dict[str, ObjectRef] = {}
        #: What last went wrong (a task's error type and text, a rejection, a failed receive),
        #: for heartbeats and ``ebsqs status``; the full story is in the log lines.
        self.last_error: str | None = None
        #: Log a line per success. Set from the configured level when the worker starts: at
        #: warning level, building the line's fields is most of the cost of a no-op task.
        self.log_successes = True

    def settle(self, finished: Sequence[tuple[Held, Outcome]]) -> list[Held]:
        """Ack, retry or dead-letter each finished message; ack in batches of ten.

        Returns:
            The messages that stay in their queue (released, or kept invisible for a FIFO
            retry): on a FIFO queue, the rest of their group must wait behind them.
        """
        acks: list[ReceivedMessage] = []
        kept: list[Held] = []
        for held, outcome in finished:
            if outcome.kind is OutcomeKind.INTERRUPTED:
                self.release([held.message], "interrupted", timeout=1)
                kept.append(held)
            elif outcome.kind is OutcomeKind.CRASHED:
                self._crashed(held, outcome)
                kept.append(held)
            elif outcome.redeliver and outcome.kind is not OutcomeKind.SUCCEEDED:
                if self._redeliver(held, outcome):
                    acks.append(held.message)
                else:
                    kept.append(held)
            elif self._decide(held, outcome):
                acks.append(held.message)
            else:
                kept.append(held)
        self.ack(acks)
        return kept

    def _crashed(self, held: Held, outcome: Outcome) -> None:
        """The task's process died: redeliver the message, as after any crash."""
        assert held.envelope is not None
        self.counters.task(held.envelope.task).crashed += 1
        self._note(outcome.error_type or "crashed", outcome.error)
        log.error(
            "task_crashed",
            error=outcome.error,
            **self._fields(held, held.envelope, outcome),
        )
        if self._out_of_receives(held, "crashed", outcome):
            self.ack([held.message])
            return
        self.release([held.message], "its process died", timeout=1)

    def _redeliver(self, held: Held, outcome: Outcome) -> bool:
        """The environment failed the task (a middleware said so): give the message back after a
        backoff, no attempt used. True when it was dead-lettered instead (may be deleted)."""
        envelope = held.envelope
        assert envelope is not None
        self.counters.task(envelope.task).redelivered += 1
        receives = held.message.receive_count
        delay = _visibility_seconds(self.backoff.delay(receives))
        log.warning(
            "task_redelivered",
            retry_in=delay,
            error_type=outcome.error_type,
            error=outcome.error,
            **self._fields(held, envelope, outcome),
        )
        if self._out_of_receives(held, "redelivered", outcome):
            return True
        self.release([held.message], "its environment failed", timeout=delay)
        return False

    def _out_of_receives(self, held: Held, what: str, outcome: Outcome) -> bool:
        """On the last receive the queue's redrive policy allows, dead-letter the message here,
        with its reason, rather than leave SQS to move it without one. True once copied."""
        receives = held.message.receive_count
        if receives < self.settings.max_receive_count:
            return False
        assert held.envelope is not None
        reason = f"{what} on each of its {receives} deliveries"
        return self._failed(held, held.envelope, outcome, reason, "task_failed")

    def _failed(
        self, held: Held, envelope: Envelope, outcome: Outcome, reason: str, event: str
    ) -> bool:
        """A task failed for good: count it, log it once (the line Sentry reports), and
        dead-letter its message; True once the copy is sent."""
        self.counters.task(envelope.task).failed += 1
        self._note(outcome.error_type or outcome.kind.value, outcome.error)
        log.error(
            event,
            reason=reason,
            error_type=outcome.error_type,
            error=outcome.error,
            traceback=outcome.traceback,
            **self._fields(held, envelope, outcome),
        )
        return self.dead_letter(held.message, reason, _failure_details(envelope, outcome))

    def _decide(self, held: Held, outcome: Outcome) -> bool:
        """Act on one outcome; True when the original message may now be deleted."""
        envelope = held.envelope
        assert envelope is not None
        stats = self.counters.task(envelope.task)
        stats.observe(outcome.duration)
        if outcome.kind is OutcomeKind.SUCCEEDED:
            stats.succeeded += 1
            if self.log_successes:
                log.info("task_succeeded", **self._fields(held, envelope, outcome))
            return True
        timed_out = outcome.kind is OutcomeKind.TIMED_OUT
        stats.timed_out += timed_out
        wants_retry = timed_out or outcome.retryable or outcome.kind is OutcomeKind.RETRY
        if wants_retry and envelope.retries_left > 0 and not self._last_receive(held):
            return self._retry(held, envelope, outcome, self._fields(held, envelope, outcome))
        reason = "retries exhausted" if wants_retry else "failed"
        event = "task_timed_out" if timed_out else "task_failed"
        return self._failed(held, envelope, outcome, reason, event)

    def _note(self, kind: str, error: str | None) -> None:
        """Remember what went wrong last (the first line of the error, shortened)."""
        kind = kind.removeprefix("builtins.")
        text = error.strip().splitlines()[0] if error and error.strip() else ""
        self.last_error = f"{kind}: {text}"[:ERROR_NOTE_CHARS] if text else kind

    def _fields(self, held: Held, envelope: Envelope, outcome: Outcome) -> dict[str, object]:
        return _log_fields(held, envelope, outcome, self.settings.log_arguments)

    def _last_receive(self, held: Held) -> bool:
        """A FIFO retry keeps the message, so its receive count grows with each attempt: on
        the receive SQS's redrive policy allows last, dead-letter it here, with its reason."""
        return held.fifo and held.message.receive_count >= self.settings.max_receive_count

    def _retry(
        self, held: Held, envelope: Envelope, outcome: Outcome, fields: dict[str, object]
    ) -> bool:
        """Schedule the next attempt; True when the original may be deleted."""
        delay = outcome.retry_delay
        if delay is None:
            delay = (held.backoff or self.backoff).delay(envelope.attempt)
        if held.fifo:
            # The retry keeps its place at the head of its group: the same message comes back
            # after the delay (the attempt is then counted from its receive count).
            seconds = self.hold_invisible(held, delay, "retry")
            self.counters.task(envelope.task).retried += 1
            self._note(outcome.error_type or outcome.kind.value, outcome.error)
            log.warning(
                "task_retried",
                retry_in=seconds,
                error_type=outcome.error_type,
                error=outcome.error,
                **fields,
            )
            return False
        try:
            self._send(held, envelope.next_attempt(None), time.time() + delay)
        except EbsqsError as exc:
            log.error("retry_send_failed", error=str(exc), **fields)
            return False  # keep the message: it comes back after its visibility timeout
        self.counters.task(envelope.task).retried += 1
        self._note(outcome.error_type or outcome.kind.value, outcome.error)
        log.warning(
            "task_retried",
            retry_in=round(delay, 3),
            error_type=outcome.error_type,
            error=outcome.error,
            **fields,
        )
        return True

    def hold_invisible(self, held: Held, delay: float, reason: str) -> int:
        """Keep a received message invisible for ``delay`` seconds (at most SQS's 12 hours a
        receive); return the seconds set."""
        seconds = _visibility_seconds(delay)
        self.release([held.message], reason, timeout=seconds)
        return seconds

    def hop(self, held: Held, envelope: Envelope) -> None:
        """Keep a not-yet-due message waiting until it is due, at the fewest requests.

        It is *parked*, kept invisible up to SQS's 12 hours a receive (one visibility change, where
        a hop of SQS's longest delay, 15 minutes, costs a send, a receive and a delete). Each
        park uses one of the message's receives, which the queue's redrive policy counts; so on a
        standard queue a message is parked only while at least half of ``max_receive_count`` is
        left, and is otherwise sent on anew (its count starts again) with the rest of its delay.
        A FIFO queue takes no per-message delay, so there the message is always parked: it keeps
        its place (and holds its group) as long.
        """
        assert envelope.due is not None
        if held.fifo or self._may_park(held):
            seconds = self.hold_invisible(held, envelope.due - time.time(), "not yet due")
            log.debug("task_parked", task_id=envelope.id, due=envelope.due, seconds=seconds)
            return
        try:
            self._send(held, envelope, envelope.due)
        except EbsqsError as exc:
            log.error("delay_hop_failed", task_id=envelope.id, error=str(exc))
            return
        log.debug("task_delay_hopped", task_id=envelope.id, due=envelope.due)
        self.ack([held.message])

    def _may_park(self, held: Held) -> bool:
        """Whether parking leaves the message at least half its receives (standard queues)."""
        if not self.settings.park_delays:
            return False
        return held.message.receive_count < max(self.settings.max_receive_count // 2, 1)

    def _send(self, held: Held, envelope: Envelope, due: float) -> None:
        """Send ``envelope`` back to the standard queue ``held`` came from (retries, delay
        hops), in the message's group (its fair-queue tenant)."""
        queue = held.message.queue
        with self.io():
            message = outgoing(
                envelope,
                due,
                self.settings,
                self.broker.body_limit(queue),
                target=queue,
                queue=held.queue,
                group_id=held.message.group_id,
            )
            send_messages(self.broker, self.settings, queue, [message])

    def reject(self, held: Held, exc: EnvelopeError, reason: str = "rejected") -> None:
        """Dead-letter a message that must not run (undecodable, unknown task, bad signature,
        or refused by a middleware).

        It is counted as dead-lettered once, by :meth:`dead_letter`, when the copy is sent.
        """
        log.error(
            "message_rejected",
            queue=held.queue,
            message_id=held.message.message_id,
            error_type=type(exc).__name__,
            reason=str(exc),
        )
        self._note(f"rejected {type(exc).__name__}", str(exc))
        details = {ERROR_TYPE: type(exc).__name__, ERROR: str(exc)}
        if held.envelope is not None:
            details[TASK] = held.envelope.task
        if self.dead_letter(held.message, reason, details):
            self.ack([held.message])

    def defer(self, held: Held, delay: float, reason: str) -> None:
        """Put a message back for ``delay`` seconds because a middleware said not yet: no
        failure is counted and its envelope is unchanged (its attempt is not used up).

        Each release uses one of the message's receives, which the queue's redrive policy
        counts; so a message deferred again and again (a full concurrency limit) is, once half
        of ``max_receive_count`` is used, sent anew instead: the same envelope (task id,
        attempt) in a new message whose count starts again, and the old one deleted. Sent
        before the delete, as a retry: a crash between the two repeats, never loses. A FIFO
        message keeps its place (and its group's order) and is always released.
        """
        seconds = _visibility_seconds(delay)
        envelope = held.envelope
        assert envelope is not None
        self.counters.task(envelope.task).deferred += 1
        log.info(
            "task_deferred",
            task=envelope.task,
            task_id=envelope.id,
            message_id=held.key,
            delay=seconds,
            reason=reason,
        )
        if held.fifo or held.message.receive_count < max(self.settings.max_receive_count // 2, 1):
            self.release([held.message], reason, timeout=seconds)
            return
        try:
            self._send(held, envelope, time.time() + seconds)
        except EbsqsError as exc:
            log.error("defer_send_failed", task_id=envelope.id, error=str(exc))
            self.release([held.message], reason, timeout=seconds)
            return
        log.debug("task_deferred_anew", task_id=envelope.id, receives=held.message.receive_count)
        self.ack([held.message])

    def skip(self, held: Held, reason: str) -> None:
        """Delete a message a middleware found already done (a duplicate delivery), unrun."""
        assert held.envelope is not None
        self.counters.task(held.envelope.task).skipped += 1
        log.info(
            "task_skipped",
            task=held.envelope.task,
            task_id=held.envelope.id,
            message_id=held.key,
            reason=reason,
        )
        self.ack([held.message])

    def dead_letter(
        self, message: ReceivedMessage, reason: str, details: Mapping[str, str]
    ) -> bool:
        """Copy a message to its queue's dead-letter queue; True once the copy is sent."""
        queue = self.settings.dead_letter_queue_of_physical(message.queue)
        attributes = {REASON: reason, SOURCE: message.queue, **details}
        attributes = {
            key: value if key == TRACEBACK else value[:ATTRIBUTE_CHARS]
            for key, value in attributes.items()
            if value
        }
        copy = OutgoingMessage(
            message.body,
            attributes={**carried_attributes(message), **attributes},
            group_id=message.group_id,
            # Fixed per received message: a crash after this send and before the delete sends
            # it again, and SQS drops that copy within its five minutes.
            dedup_id=f"{message.message_id}:dead" if is_fifo(queue) else None,
        )
        try:
            with self.io():
                copy = _fitted(copy, self.broker.body_limit(queue))
                send_messages(self.broker, self.settings, queue, [copy])
        except EbsqsError as exc:
            log.error(
                "dead_letter_failed", queue=queue, message_id=message.message_id, error=str(exc)
            )
            return False  # keep the original: the broker's redrive policy is the backstop
        self.stored.pop(message.message_id, None)  # the dead letter points to the object
        self.counters.task(details.get(TASK, REJECTED)).dead_lettered += 1
        log.warning(
            "message_dead_lettered",
            dead_letter_queue=queue,
            message_id=message.message_id,
            reason=reason,
        )
        return True

    def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        """Queue messages for deletion; a full batch of ten goes out at once."""
        if not messages:
            return
        now = time.monotonic()
        with self._ack_lock:
            if not self._acks:
                self._oldest_ack = now
            self._acks.extend(messages)
            due = len(self._acks) >= MAX_BATCH or now - self._oldest_ack >= self.ack_wait
        if due:
            self.flush_acks()

    def ack_due_in(self) -> float | None:
        """Seconds until the oldest waiting delete must go, or None when none waits."""
        with self._ack_lock:
            if not self._acks:
                return None
            return max(self._oldest_ack + self.ack_wait - time.monotonic(), 0.0)

    def flush_acks_of(self, group: tuple[str, str]) -> None:
        """Delete every queued message if one of them is of this FIFO group (queue, group),
        and wait until the deletes under way are done: the group's next message may start."""
        queue, group_id = group
        with self._ack_lock:
            waiting = any(m.group_id == group_id and m.queue == queue for m in self._acks)
        if waiting:
            self.flush_acks()
        self.wait_acks()

    def flush_acks(self, older_than: float = 0.0) -> None:
        """Send every queued delete now (or only if the oldest waited ``older_than`` s), from
        the sender's threads: this returns before they are done (see :meth:`wait_acks`).
        With :attr:`deletes_here`, from this thread, done when this returns."""
        with self._ack_lock:
            if not self._acks or time.monotonic() - self._oldest_ack < older_than:
                return
            messages, self._acks = self._acks, []
        for start in range(0, len(messages), MAX_BATCH):
            batch = messages[start : start + MAX_BATCH]
            with self.io():  # waits only while the sender is MAX_PENDING batches behind
                self._sender.submit(functools.partial(self._delete, batch), self.deletes_here)

    def wait_acks(self, timeout: float | None = None) -> bool:
        """Wait until every delete sent so far is done; False if ``timeout`` passed first."""
        with self.io():
            return self._sender.join(timeout)

    def finish_acks(self, timeout: float | None = None) -> None:
        """Send every queued delete, wait for them all, and end the sender's threads."""
        self.flush_acks()
        self.wait_acks(timeout)
        self._sender.close()

    def _delete(self, batch: Sequence[ReceivedMessage]) -> None:
        """Delete one batch (on a sender thread), then the S3 objects of offloaded ones."""
        try:
            failed = self.broker.ack(batch)
        except EbsqsError as exc:
            failed = {m.message_id: str(exc) for m in batch}
        self.counters.ack_errors += len(failed)
        for message_id, why in failed.items():
            log.warning("ack_failed", message_id=message_id, reason=why)
        if self.stored:
            self._discard_payloads(batch, failed)

    def _discard_payloads(
        self, deleted: Sequence[ReceivedMessage], failed: Mapping[str, str]
    ) -> None:
        """Delete the S3 objects of offloaded messages that were just deleted."""
        for message in deleted:
            if message.message_id in failed:
                continue
            ref = self.stored.pop(message.message_id, None)
            if ref is not None:
                self.payloads.discard(ref)

    def release(self, messages: Sequence[ReceivedMessage], reason: str, timeout: int = 0) -> None:
        """Make messages visible again after ``timeout`` seconds (0: at once)."""
        for message in messages:
            self.stored.pop(message.message_id, None)  # its next receiver owns the object
        for start in range(0, len(messages), MAX_BATCH):
            batch = messages[start : start + MAX_BATCH]
            try:
                with self.io():
                    failed = self.broker.change_visibility(batch, timeout)
            except EbsqsError as exc:
                failed = {m.message_id: str(exc) for m in batch}
            log.info("messages_released", count=len(batch) - len(failed), reason=reason)
            for message_id, why in failed.items():
                log.warning("release_failed", message_id=message_id, reason=why)

    def _extension_failed(self, item: Held, reason: str) -> None:
        if any(marker in reason for marker in DEAD_RECEIPT):
            # Retrying would fail forever: the message is back in the queue (its task may still
            # finish here; its delete will then fail and it runs again, at-least-once).
            item.lost = True
            log.warning("message_visibility_lost", message_id=item.key, reason=reason)
        else:
            log.warning("visibility_extension_failed", message_id=item.key, reason=reason)

    def extend(self, held: Sequence[Held], timeout: int, now: float) -> None:
        """Push back the visibility of held messages, never past a task's hard limit."""
        by_timeout: dict[int, list[Held]] = {}
        for item in held:
            limit = min(item.first_received + MAX_VISIBILITY_SECONDS, item.deadline or float("inf"))
            # Past the hard limit (plus a margin for the kill), let the message come back.
            extension = int(min(timeout, max(limit + 5 - now, 0)))
            if extension > 0:
                by_timeout.setdefault(extension, []).append(item)
        for extension, items in by_timeout.items():
            for start in range(0, len(items), MAX_BATCH):
                batch = items[start : start + MAX_BATCH]
                try:
                    with self.io():
                        failed = self.broker.change_visibility(
                            [h.message for h in batch], extension
                        )
                except EbsqsError as exc:
                    failed = {h.message.message_id: str(exc) for h in batch}
                for item in batch:
                    if item.message.message_id in failed:
                        self._extension_failed(item, failed[item.message.message_id])
                    else:
                        item.visible_until = now + extension
                        self.counters.extended += 1


def _visibility_seconds(delay: float) -> int:
    """``delay`` as the whole seconds a received message may be kept invisible (0 to 12 h)."""
    return int(min(max(round(delay), 0), MAX_VISIBILITY_SECONDS))


def _failure_details(envelope: Envelope, outcome: Outcome) -> dict[str, str]:
    """The dead-letter attributes of a task that failed: what, where, how often."""
    return {
        ERROR_TYPE: outcome.error_type or outcome.kind.value,
        ERROR: outcome.error or "",
        ATTEMPTS: str(envelope.attempt),
        TASK: envelope.task,
        TRACEBACK: (outcome.traceback or "")[-TRACEBACK_CHARS:],
    }


def _fitted(copy: OutgoingMessage, limit: BodyLimit) -> OutgoingMessage:
    """A dead-letter copy within the dead-letter queue's limit: the body SQS already took is
    kept whole; the longest explanations give way first (traceback, then the error text)."""
    for name in (TRACEBACK, ERROR):
        if message_bytes(copy) <= limit.bytes:
            break
        attributes = {**copy.attributes, name: "(left out: the message is at its size limit)"}
        copy = replace(copy, attributes=attributes)
    return copy  # still too large: the send names the size and the limit


#: What brokers say of a receipt that can never work again (the message was received anew, or
#: is no longer in flight): SQS's error codes, and the embedded brokers' wording.
DEAD_RECEIPT = (
    "ReceiptHandleIsInvalid",
    "MessageNotInflight",
    "receipt handle has expired",
    "receipt handle is no longer valid",
)


def _log_fields(
    held: Held, envelope: Envelope, outcome: Outcome, with_arguments: bool
) -> dict[str, object]:
    """What every task outcome line carries (arguments only when asked for)."""
    fields: dict[str, object] = {
        "task": envelope.task,
        "task_id": envelope.id,
        "message_id": held.message.message_id,
        "queue": held.queue,
        "attempt": envelope.attempt,
        "duration": round(outcome.duration, 4),
    }
    if with_arguments:
        fields["args"] = envelope.args
        fields["kwargs"] = dict(envelope.kwargs)
    return fields
