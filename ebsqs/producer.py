"""Sending: from a task call to broker messages.

Everything here runs at ``.delay()`` time: settings are read then, the broker is looked up then
(one per URL and process), and every check that can fail (JSON, size) runs before anything is
sent, so a failed call sends nothing. A middleware may have a send run later (after a database
transaction commits, :meth:`~ebsqs.middleware.Middleware.send_later`); the task ids are fixed and
the arguments checked before it is handed over.

This module knows tasks only as :class:`Sendable`: :mod:`ebsqs.task` imports it, never the
reverse.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ebsqs import middleware
from ebsqs.brokers import MAX_DELAY_SECONDS, Broker, OutgoingMessage, from_url
from ebsqs.brokers.base import BodyLimit, QueueSettings, is_fifo
from ebsqs.brokers.checks import batch_ranges, utf8_size
from ebsqs.config import Settings, load_settings
from ebsqs.eager import run_eagerly
from ebsqs.envelope import Envelope, encode, new_id
from ebsqs.errors import (
    BrokerError,
    MessageGroupError,
    PartialBatchError,
    QueueDoesNotExist,
)
from ebsqs.flow.spec import FlowSpec
from ebsqs.payload import Payloads

#: The message group of a FIFO message whose task and call name none: the queue is then one
#: line, in send order.
DEFAULT_FIFO_GROUP = "default"
#: SQS's rule for message groups and deduplication ids.
_SQS_ID = re.compile(r"[!-~]{1,128}")


@dataclass(frozen=True, slots=True)
class SendOptions:
    """Per-call options. ``None`` means "the task's default".

    Attributes:
        queue_name: the logical queue to send to.
        delay: seconds before the task may run; any length (past 15 minutes it hops).
        eta: an aware or UTC-naive datetime before which it must not run.
        max_retries: override the task's retries for this call.
        group_id: the message group: on a FIFO queue the group kept in order (django-eb-sqs's
            option), on a standard queue the tenant SQS's fair queues balance.
        tenant: the same field by its fair-queue name; ``group_id`` wins when both are set.
        deduplication_id: FIFO deduplication id: SQS drops another send with the same id
            within five minutes. Defaults to the task id.
        execute_inline: run now in this process (django-eb-sqs's option).
    """

    queue_name: str | None = None
    delay: float | None = None
    eta: dt.datetime | None = None
    max_retries: int | None = None
    group_id: str | None = None
    tenant: str | None = None
    deduplication_id: str | None = None
    execute_inline: bool | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One invocation, for :meth:`Task.delay_many`. Build it with :meth:`Task.call`."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    task_id: str | None = None  # chosen up front when the send waits for a commit


class Sendable(Protocol):
    """What the producer needs of a task (:class:`ebsqs.task.Task` is one)."""

    @property
    def name(self) -> str:
        """The registered name."""
        ...

    @property
    def queue_name(self) -> str | None:
        """The default logical queue, or None."""
        ...

    @property
    def max_retries(self) -> int | None:
        """The default retries, or None."""
        ...

    @property
    def default_delay(self) -> float | None:
        """The default delay in seconds, or None."""
        ...

    def group_for(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        """The message group (FIFO group or fair-queue tenant) of one call, or None."""
        ...


@dataclass(frozen=True, slots=True)
class NamedTask:
    """A task known only by its name (``ebsqs send`` of a task this process did not import):
    sent with the defaults of the settings."""

    name: str
    queue_name: str | None = None
    max_retries: int | None = None
    default_delay: float | None = None

    def group_for(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        """No group of its own: the call's, or a FIFO queue's default."""
        return None


def due_time(options: SendOptions, default_delay: float, now: float) -> float:
    """Epoch seconds at which an invocation sent now with ``options`` becomes due."""
    if options.eta is not None:
        eta = options.eta
        if eta.tzinfo is None:
            eta = eta.replace(tzinfo=dt.UTC)
        return eta.timestamp()
    delay = options.delay if options.delay is not None else default_delay
    return now + max(delay, 0)


def new_envelope(task: Sendable, call: Call, max_retries: int, now: float) -> Envelope:
    """The first attempt's envelope of one call."""
    return Envelope(
        task=task.name,
        args=tuple(call.args),
        kwargs=dict(call.kwargs),
        id=call.task_id or new_id(),
        max_retries=max_retries,
        enqueued_at=now,
    )


@functools.cache
def broker_for(url: str) -> Broker:
    """The broker of a URL, one object per process and URL (clients inside are per process)."""
    return from_url(url)


def send(
    task: Sendable,
    calls: Sequence[Call],
    options: SendOptions,
    *,
    on_commit: bool = False,
    settings: Settings | None = None,
) -> list[str]:
    """Send calls of a task (now, or once a middleware's transaction commits); their task ids.

    Args:
        task: what is called.
        calls: its invocations.
        options: how to send them.
        on_commit: ``.delay_on_commit()``: send once the open transaction commits, where a
            middleware knows transactions (Django's); else at once.
        settings: the settings to send with (``ebsqs send --broker ...``); read from every
            source when the send happens if None.
    """
    later = middleware.send_later(on_commit=on_commit)
    if later is None:
        return send_now(task, calls, options, settings=settings)
    # Fix the task ids and check the arguments and groups now; the messages are sent later.
    calls = [replace(call, task_id=call.task_id or new_id()) for call in calls]
    for call in calls:
        encode(new_envelope(task, call, 0, 0.0))  # raises SerializationError, naming the argument
        message_group(task, call, options, fifo=False)
    _check_flow_keys(task, calls)
    # The send runs in a copy of this call's context, so what middleware reads there at send
    # time (the current trace span, for one) is what was current at .delay(), not at commit.
    context = contextvars.copy_context()
    later(functools.partial(context.run, send_now, task, calls, options, settings=settings))
    return [call.task_id for call in calls if call.task_id]


def send_now(
    task: Sendable,
    calls: Sequence[Call],
    options: SendOptions,
    *,
    settings: Settings | None = None,
) -> list[str]:
    """Encode and send calls of a task at once; return their task ids.

    Args:
        task: what is called.
        calls: its invocations.
        options: how to send them.
        settings: the settings to send with; read from every source now if None.
    """
    if settings is None:
        settings = load_settings()
    _check_flow_keys(task, calls)
    now = time.time()
    max_retries = _first(options.max_retries, task.max_retries, settings.default_max_retries)
    due = due_time(options, _first(task.default_delay, settings.default_delay), now)
    envelopes = [new_envelope(task, call, max_retries, now) for call in calls]
    spec = flow_of(task)
    if settings.eager or options.execute_inline:
        return [run_eagerly(envelope, settings) for envelope in envelopes]
    logical = _first(options.queue_name, task.queue_name, settings.default_queue)
    physical = settings.physical_queue(logical)
    envelopes = [middleware.before_send(envelope, logical) for envelope in envelopes]
    broker = broker_for(settings.broker_url)
    keep = middleware.keeper(physical)
    if keep is None:
        limit = broker.body_limit(physical)
    else:  # sent later: no word with the queue now (an outbox writes rows while SQS is down)
        limit = BodyLimit(broker.max_body_bytes, "the broker's limit (the send is kept for later)")
    fifo = is_fifo(physical)
    firsts, claimed = _claim_unique(spec, calls, envelopes, settings)
    sending = [
        (call, envelope)
        for call, envelope, first in zip(calls, envelopes, firsts, strict=True)
        if first is None
    ]
    task_ids = [envelope.id for _, envelope in sending]
    try:
        messages = [
            outgoing(
                envelope,
                due,
                settings,
                limit,
                target=physical,
                queue=logical,
                group_id=message_group(task, call, options, fifo=fifo),
                dedup_id=_dedup_id(_fifo_dedup(options, spec, call, envelope)) if fifo else None,
            )
            for call, envelope in sending
        ]
        if messages and keep is not None:
            keep(messages, task_ids)
        elif messages:
            send_messages(broker, settings, physical, messages, task_ids=task_ids)
    except PartialBatchError as exc:
        # What was sent keeps its claim; what was not may be sent again.
        unsent = {task_ids[i] for i in exc.failed}
        _unclaim([claim for claim in claimed if claim[1] in unsent], settings)
        raise
    except BaseException:
        _unclaim(claimed, settings)  # nothing was sent (too large, no queue): call again
        raise
    return [first or envelope.id for envelope, first in zip(envelopes, firsts, strict=True)]


def flow_of(task: Sendable) -> FlowSpec | None:
    """A task's flow control (``@task(rate_limit=...)``), or None."""
    spec = getattr(task, "flow", None)
    return spec if isinstance(spec, FlowSpec) else None


def _check_flow_keys(task: Sendable, calls: Sequence[Call]) -> None:
    """Run the task's limit and unique key functions on each call, so that arguments they
    cannot take fail at ``.delay()`` (:class:`~ebsqs.flow.spec.FlowKeyError`), not on a worker."""
    spec = flow_of(task)
    if spec is not None:
        for call in calls:
            spec.check_keys(tuple(call.args), call.kwargs)


def _claim_unique(
    spec: FlowSpec | None, calls: Sequence[Call], envelopes: Sequence[Envelope], settings: Settings
) -> tuple[list[str | None], list[tuple[str, str]]]:
    """Per call, the task id of an earlier send of the same unique task (this one is then
    dropped) or None; and the claims made (see :func:`ebsqs.flow.unique.claim_sends`)."""
    if spec is None or spec.unique_for is None:
        return [None] * len(calls), []
    # Imported here: only a unique task's send needs a store (SQLite, Redis or Django).
    from ebsqs.flow import unique

    return unique.claim_sends(
        spec,
        [(tuple(call.args), call.kwargs) for call in calls],
        [envelope.id for envelope in envelopes],
        settings.flow_store,
        settings.flow_host_store,
    )


def _unclaim(claimed: Sequence[tuple[str, str]], settings: Settings) -> None:
    if not claimed:
        return
    from ebsqs.flow import unique  # loaded already: the claims were made with it

    unique.unclaim(claimed, settings.flow_store, settings.flow_host_store)


def _fifo_dedup(options: SendOptions, spec: FlowSpec | None, call: Call, envelope: Envelope) -> str:
    """A FIFO message's deduplication id: the call's, else a unique task's key digest (when
    its window covers SQS's five minutes), else the task id."""
    if options.deduplication_id:
        return options.deduplication_id
    if spec is not None and spec.unique_for is not None:
        from ebsqs.flow import unique  # loaded already by the claim

        derived = unique.fifo_dedup_id(spec, tuple(call.args), call.kwargs)
        if derived is not None:
            return derived
    return envelope.id


def message_group(task: Sendable, call: Call, options: SendOptions, *, fifo: bool) -> str | None:
    """The message group of one call: the call's ``group_id`` or ``tenant``, else the task's
    (``fifo_group``, ``group_by``, ``tenant``); on a FIFO queue :data:`DEFAULT_FIFO_GROUP` when
    none is named.

    Raises:
        MessageGroupError: the group is not 1-128 printable ASCII characters (SQS's rule).
    """
    group = options.group_id or options.tenant
    if group is None:
        group = task.group_for(tuple(call.args), call.kwargs)
    if group is None:
        return DEFAULT_FIFO_GROUP if fifo else None
    if not isinstance(group, str) or not _SQS_ID.fullmatch(group):
        raise MessageGroupError(
            f"task {task.name!r}: message group {group!r} must be a string of 1 to 128 "
            "printable ASCII characters (letters, digits, punctuation; no spaces)"
        )
    return group


def _dedup_id(value: str) -> str:
    if not _SQS_ID.fullmatch(value):
        raise MessageGroupError(
            f"deduplication id {value!r} must be 1 to 128 printable ASCII characters "
            "(letters, digits, punctuation; no spaces)"
        )
    return value


def outgoing(
    envelope: Envelope,
    due: float,
    settings: Settings,
    limit: BodyLimit,
    *,
    target: str,
    queue: str | None = None,
    group_id: str | None = None,
    dedup_id: str | None = None,
) -> OutgoingMessage:
    """The broker message for an envelope due at ``due``, packed to fit ``limit``.

    Args:
        envelope: what to send.
        due: epoch seconds before which it must not run.
        settings: signing, the legacy format, compression and the claim-check bucket.
        limit: the target queue's largest message.
        target: the physical queue it goes to (FIFO or not; the claim-check's key folder).
        queue: the logical queue, written into django-eb-sqs bodies (``legacy_producer``).
        group_id: its message group.
        dedup_id: its FIFO deduplication id.

    Delays past SQS's 15 minutes put the due time in the body and the longest delay SQS allows
    on the message; the worker sends it on again until it is due. A FIFO queue takes no
    per-message delay at all: the due time goes in the body and the worker that receives the
    message early keeps it invisible (and its group waiting) until then.

    Raises:
        MessageTooLargeError: over the queue's limit, with no claim-check bucket to take it.
        PayloadUnavailable: the claim-check bucket could not be written; nothing was sent.
    """
    fifo = is_fifo(target)
    remaining = due - time.time()
    if remaining > (1 if fifo else MAX_DELAY_SECONDS):
        envelope = envelope.with_due(due)
    body = encode(
        envelope, signing_key=settings.signing_keys, legacy=settings.legacy_producer, queue=queue
    )
    delay = 0 if fifo else min(max(round(remaining), 0), MAX_DELAY_SECONDS)
    if _plain_fits(body, limit, settings):  # nearly every body: no packing to do
        return OutgoingMessage(body=body, delay=delay, group_id=group_id, dedup_id=dedup_id)
    packed = payloads(settings).pack(body, limit, task=envelope.task, queue=target)
    return OutgoingMessage(
        body=packed.body,
        delay=delay,
        attributes=packed.attributes,
        group_id=group_id,
        dedup_id=dedup_id,
    )


def _plain_fits(body: str, limit: BodyLimit, settings: Settings) -> bool:
    """Whether ``body`` goes as it is: within the queue's limit, with no compression asked for
    and no lower claim-check threshold (what :meth:`Payloads.pack` would conclude, cheaply)."""
    if settings.compress_over is not None:
        return False
    if settings.large_payload_bucket is not None and settings.large_payload_over is not None:
        return False
    return utf8_size(body) <= limit.bytes


@functools.cache
def payloads(settings: Settings) -> Payloads:
    """The claim-check and compression of these settings, one per process and settings (its S3
    client is made only when a body needs it)."""
    return Payloads(settings)


def send_messages(
    broker: Broker,
    settings: Settings,
    queue: str,
    messages: Sequence[OutgoingMessage],
    *,
    task_ids: Sequence[str] | None = None,
) -> list[str]:
    """Send messages in batches SQS accepts; return their message ids in order.

    A batch ends at ten entries or at SQS's 1 MiB per request. The queue is created first if it
    is missing and that is allowed. Entries that fail for good do not stop later batches, and
    nothing sent is ever sent again, so the error below says exactly what to send again.

    Args:
        broker: where to send.
        settings: whether a missing queue may be created, and how.
        queue: the physical queue.
        messages: what to send.
        task_ids: the task id of each message, named in failures.

    Raises:
        PartialBatchError: some messages were not sent. ``failed`` and ``succeeded`` are keyed
            by the index in ``messages``; each reason names the task id when given.
        BrokerError: nothing was sent (the queue is missing, access is denied, ...).
    """
    sent: dict[int, str] = {}
    failed: dict[int, str] = {}
    for span in batch_ranges(messages):
        try:
            ids = _send_batch(broker, settings, queue, messages[span.start : span.stop])
        except PartialBatchError as exc:
            sent.update({span.start + i: message_id for i, message_id in exc.succeeded.items()})
            failed.update({span.start + i: why for i, why in exc.failed.items()})
        except BrokerError as exc:
            if not sent and not failed:
                raise
            # The call failed whole; what came before was sent and must not be sent again.
            failed.update(dict.fromkeys(range(span.start, len(messages)), f"not sent: {exc}"))
            raise _send_failed(queue, failed, sent, task_ids) from exc
        else:
            sent.update(zip(span, ids, strict=True))
    if failed:
        raise _send_failed(queue, failed, sent, task_ids)
    return [sent[i] for i in range(len(messages))]


def _send_batch(
    broker: Broker, settings: Settings, queue: str, batch: Sequence[OutgoingMessage]
) -> list[str]:
    try:
        return broker.send_batch(queue, batch)
    except QueueDoesNotExist:
        if not settings.auto_create_queues:
            raise
        ensure_queue(broker, settings, queue)
        return broker.send_batch(queue, batch)


def _send_failed(
    queue: str, failed: dict[int, str], sent: dict[int, str], task_ids: Sequence[str] | None
) -> PartialBatchError:
    if task_ids is not None:
        failed = {i: f"task {task_ids[i]}: {why}" for i, why in failed.items()}
    return PartialBatchError(f"send to {queue!r}", failed=failed, succeeded=sent)


def ensure_queue(broker: Broker, settings: Settings, queue: str) -> None:
    """Create a (physical) queue with its dead-letter queue and redrive policy.

    A dead-letter queue itself (``q-dlq``, created when a dead letter is first sent) gets none:
    dead letters wait there for a person, and ``q-dlq-dlq`` would only hide them one level down.
    """
    dead_letter = (
        None
        if settings.is_dead_letter_queue(queue)
        else settings.dead_letter_queue_of_physical(queue)
    )
    broker.ensure_queue(
        queue,
        QueueSettings(
            visibility_timeout=settings.visibility_timeout,
            dead_letter_queue=dead_letter,
            max_receive_count=settings.max_receive_count,
            fifo=is_fifo(queue),
        ),
    )
    # ebsqs.log is imported here, not at the top: `import ebsqs` (a web process that only calls
    # .delay()) loads no logging library, and queues are created rarely.
    from ebsqs.log import get_logger

    get_logger(__name__).info("queue_ensured", queue=queue, dead_letter_queue=dead_letter)


def _first(*values: Any) -> Any:
    return next(value for value in values if value is not None)
