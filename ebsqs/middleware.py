"""Middleware: typed hooks around each message, each send and each fork.

A middleware subclasses :class:`Middleware` and overrides what it needs; every method is a
no-op by default and its docstring says in which process and thread it runs. Integrations
register theirs once (Django's ``AppConfig.ready()``); the list is a registry like the task
registry, which tests may replace.

Around one message, in order:

1. :meth:`Middleware.before_start`, in the worker loop's thread, just before the job would go to
   the executor: return :data:`RUN`, :func:`defer` (the message is released with a delay and
   comes back later; not a failure), :func:`reject` (dead-lettered with the reason, never run)
   or :func:`skip` (acked without running: a duplicate of work already done).
   The first middleware that does not say RUN decides.
2. :meth:`Middleware.task_started` and :meth:`Middleware.task_finished`, in the thread or process
   that runs the task (a pool thread, a process executor's child).
3. :meth:`Middleware.classify`, back in the loop's thread: a middleware may describe the outcome
   better (a failure a retry can fix is ``retryable``); it describes, the worker alone acks,
   retries or dead-letters.
4. :meth:`Middleware.after_outcome`, in the loop's thread, before the worker acks, retries or
   dead-letters the message.

Around each send: :meth:`Middleware.send_later` (wait for a commit), :meth:`Middleware.before_send`
(the envelope) and :meth:`Middleware.keeper` (keep the encoded messages, as an outbox does).

Flow control (rate and concurrency limits, unique tasks) is built as middleware on this seam.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ebsqs.brokers import OutgoingMessage
    from ebsqs.envelope import Envelope
    from ebsqs.executors.execution import Job, Outcome


#: Keeps encoded messages to send later (see :meth:`Middleware.keeper`): messages, task ids.
Keeper = Callable[[Sequence["OutgoingMessage"], Sequence[str]], None]


class Action(enum.StrEnum):
    """What becomes of a received message before it starts."""

    RUN = "run"
    DEFER = "defer"  # released with a delay: it comes back later, no failure counted
    REJECT = "reject"  # dead-lettered with the reason, never run
    SKIP = "skip"  # acked without running (a duplicate of a task that already completed)


@dataclass(frozen=True, slots=True)
class Decision:
    """A middleware's answer to :meth:`Middleware.before_start`.

    Attributes:
        action: see :class:`Action`.
        delay: seconds before a deferred message is visible again.
        reason: why (logged, and carried by a rejected message's dead letter).
    """

    action: Action = Action.RUN
    delay: float = 0.0
    reason: str = ""


#: Start the job now.
RUN = Decision()


def defer(delay: float, reason: str) -> Decision:
    """Put the message back for ``delay`` seconds (at least 0) without counting a failure."""
    return Decision(Action.DEFER, max(delay, 0.0), reason)


def reject(reason: str) -> Decision:
    """Dead-letter the message with ``reason``; it never runs."""
    return Decision(Action.REJECT, 0.0, reason)


def skip(reason: str) -> Decision:
    """Delete the message without running it (counted ``skipped``): its work is already done."""
    return Decision(Action.SKIP, 0.0, reason)


class Middleware:
    """No-op base class; override what you need."""

    # -- processes -------------------------------------------------------------------------

    def before_fork(self) -> None:
        """In a process about to fork (the supervisor's master, the process executor)."""

    def worker_started(self) -> None:
        """In the process that runs the worker loop, after any fork, before the first receive."""

    # -- sending (in the process that calls ``.delay()``) ----------------------------------

    def send_later(self, *, on_commit: bool) -> Callable[[Callable[[], object]], None] | None:
        """Whether to send later (once a transaction commits): a function that takes the send
        and runs it then, or None to send now.

        The producer fixes the task ids and checks the arguments before it hands the send over.

        Args:
            on_commit: the caller asked for ``.delay_on_commit()``; otherwise it is a plain
                ``.delay()``, which a middleware may defer by its own setting.
        """
        return None

    def before_send(self, envelope: Envelope, queue: str) -> Envelope:
        """Just before a new message is encoded for the logical ``queue``: the envelope to send.

        Runs in the process that sends, in the context of the ``.delay()`` call (a send a
        middleware deferred runs in a copy of that context); retries and hops are re-sends of
        an envelope and do not pass here. Return ``envelope`` itself or a copy
        (``dataclasses.replace``), e.g. with a ``trace`` context.
        """
        return envelope

    def keeper(self, queue: str) -> Keeper | None:
        """Whether to keep what is about to be sent to the physical ``queue`` and send it later
        itself: a function that takes the encoded messages and their task ids (a durable outbox
        writes them to its table in the open transaction), or None to let the producer send.

        Asked in the process that sends, before the messages are encoded: a send that is kept
        does not ask the queue for its size limit (the broker's own limit applies, and the
        queue's own when it is finally sent), so it needs no word with SQS. The function gets
        the messages after :meth:`before_send` and every check (sizes, groups), so what is
        kept is exactly what would have been sent.
        """
        return None

    # -- one message -----------------------------------------------------------------------

    def before_start(self, job: Job) -> Decision:
        """In the loop's thread, before ``job`` goes to the executor: run, defer or reject."""
        return RUN

    def task_started(self, job: Job) -> None:
        """In the thread or process that runs the task, just before it runs."""

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        """In the thread or process that ran the task, just after, whatever happened."""

    def classify(self, job: Job, outcome: Outcome) -> Outcome:
        """In the loop's thread, once ``job`` has an outcome: the outcome to settle.

        Return ``outcome`` itself, or a copy (``dataclasses.replace``) with the same key that
        describes it better, such as ``retryable=True`` for a failure a retry can fix.
        """
        return outcome

    def after_outcome(self, job: Job, outcome: Outcome) -> None:
        """In the loop's thread, once ``job`` has an outcome and before it is settled."""


#: Registered middleware, called in order.
MIDDLEWARE: list[Middleware] = []


def add(middleware: Middleware) -> None:
    """Register a middleware (once; adding the same object again does nothing)."""
    if middleware not in MIDDLEWARE:
        MIDDLEWARE.append(middleware)


def before_fork() -> None:
    """Tell every middleware that this process is about to fork."""
    for item in MIDDLEWARE:
        item.before_fork()


def worker_started() -> None:
    """Tell every middleware that this process's worker loop is about to start."""
    for item in MIDDLEWARE:
        item.worker_started()


def decide(job: Job) -> Decision:
    """The first answer that is not RUN, else RUN."""
    for item in MIDDLEWARE:
        decision = item.before_start(job)
        if decision.action is not Action.RUN:
            return decision
    return RUN


def task_started(job: Job) -> None:
    """Every middleware's :meth:`Middleware.task_started`."""
    for item in MIDDLEWARE:
        item.task_started(job)


def task_finished(job: Job, outcome: Outcome) -> None:
    """Every middleware's :meth:`Middleware.task_finished`, last registered first (so the
    outermost middleware wraps the others, as around a request)."""
    for item in reversed(MIDDLEWARE):
        item.task_finished(job, outcome)


def classify(job: Job, outcome: Outcome) -> Outcome:
    """The outcome after every middleware's :meth:`Middleware.classify`, in order."""
    for item in MIDDLEWARE:
        outcome = item.classify(job, outcome)
    return outcome


def after_outcome(job: Job, outcome: Outcome) -> None:
    """Every middleware's :meth:`Middleware.after_outcome`."""
    for item in MIDDLEWARE:
        item.after_outcome(job, outcome)


def before_send(envelope: Envelope, queue: str) -> Envelope:
    """The envelope after every middleware's :meth:`Middleware.before_send`, in order."""
    for item in MIDDLEWARE:
        envelope = item.before_send(envelope, queue)
    return envelope


def send_later(*, on_commit: bool) -> Callable[[Callable[[], object]], None] | None:
    """The first (last registered first) middleware's way to send later, or None."""
    for item in reversed(MIDDLEWARE):
        scheduler = item.send_later(on_commit=on_commit)
        if scheduler is not None:
            return scheduler
    return None


def keeper(queue: str) -> Keeper | None:
    """The first middleware's way to keep sends to ``queue`` (see :meth:`Middleware.keeper`)."""
    for item in MIDDLEWARE:
        keep = item.keeper(queue)
        if keep is not None:
            return keep
    return None
