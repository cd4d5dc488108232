"""Running one job and describing what happened, the same way in every executor.

An executor decides *where* a job runs (this thread, a pool thread, a subprocess); this module
decides *how*: context, middleware, and turning exceptions into an :class:`Outcome`. Outcomes only
describe; the worker loop alone decides to ack, retry or dead-letter.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING, Any

from ebsqs import middleware
from ebsqs.context import TaskContext, activated, enter, leave
from ebsqs.envelope import Envelope
from ebsqs.errors import MaxRetriesReachedException, Retry, SoftTimeLimitExceeded
from ebsqs.registry import TaskRegistry

if TYPE_CHECKING:
    from ebsqs.task import Task

#: Tracebacks travel in outcomes and dead-letter attributes; keep them bounded.
MAX_TRACEBACK_CHARS = 4000


class OutcomeKind(enum.StrEnum):
    """What became of one job."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY = "retry"  # the task called .retry()
    TIMED_OUT = "timed_out"  # stopped at its hard time limit
    INTERRUPTED = "interrupted"  # stopped by a shutdown before it finished
    CRASHED = "crashed"  # the process running it died (a kill, OOM, a segfault): redelivered


@dataclass(frozen=True, slots=True)
class Job:
    """One message's task, ready to run (picklable, for the process executor).

    Attributes:
        key: unique within the worker: the broker's message id.
        envelope: the decoded envelope.
        queue: the logical queue it came from.
        time_limit: hard limit in seconds, or None.
        soft_time_limit: soft limit in seconds, or None.
        is_async: the task is a coroutine function (executors enforce limits differently).
    """

    key: str
    envelope: Envelope
    queue: str
    time_limit: float | None = None
    soft_time_limit: float | None = None
    is_async: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to a job.

    Attributes:
        key: the job's key.
        kind: see :class:`OutcomeKind`.
        duration: seconds the task ran.
        error_type: the exception's qualified type name, for failures.
        error: the exception's message.
        traceback: formatted traceback text (bounded).
        retryable: the exception is one of the task's ``retry_on`` types.
        retry_delay: the delay ``.retry(delay=...)`` asked for.
        redeliver: the failure was the environment's, not the task's (a middleware says so,
            e.g. a dropped database connection): the message is redelivered after a backoff
            without using an attempt, as after a crash, until the queue's ``max_receive_count``.
    """

    key: str
    kind: OutcomeKind
    duration: float = 0.0
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    retryable: bool = False
    retry_delay: float | None = None
    redeliver: bool = False


def run_job(
    job: Job, registry: TaskRegistry, deadline: float | None = None, *, soft_limit: bool = False
) -> Outcome:
    """Run a job here, in this thread, and describe the result. Never raises for task errors.

    Args:
        job: what to run.
        registry: where its task name is looked up.
        deadline: epoch seconds of its hard limit, for the task's context.
        soft_limit: enforce ``job.soft_time_limit`` with ``SIGALRM``. Only the main thread can
            take signals, so executors that run jobs there (inline, the process executor's
            subprocesses) pass True; elsewhere the limit is not armed.
    """
    envelope = job.envelope
    task = registry.get(envelope.task)
    started = time.monotonic()
    middleware.task_started(job)
    outcome = Outcome(job.key, OutcomeKind.FAILED)
    limit = job.soft_time_limit if soft_limit else None
    try:
        # enter/leave rather than context managers: this is the per-task hot path.
        token = enter(_context(job, deadline))
        try:
            if limit:
                with soft_time_limit(limit):
                    _call(task, envelope)
            else:
                _call(task, envelope)
        finally:
            leave(token)
        outcome = Outcome(job.key, OutcomeKind.SUCCEEDED, time.monotonic() - started)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a task's failure is data here
        outcome = describe(job.key, task, exc, time.monotonic() - started)
    finally:
        middleware.task_finished(job, outcome)
    return outcome


async def run_job_async(job: Job, registry: TaskRegistry, deadline: float | None = None) -> Outcome:
    """Run a coroutine task in the running event loop and describe the result.

    The asyncio executor's counterpart of :func:`run_job`. The soft limit is a cancellation: the
    task sees ``CancelledError`` at the ``await`` it is blocked in (it may clean up, or swallow
    it and finish), and an attempt that ends cancelled is described as
    :class:`~ebsqs.errors.SoftTimeLimitExceeded`. Never raises for task errors; a cancellation
    from outside (the executor stopping the job) propagates.
    """
    envelope = job.envelope
    task = registry.get(envelope.task)
    started = time.monotonic()
    middleware.task_started(job)
    outcome = Outcome(job.key, OutcomeKind.FAILED)
    limit = asyncio.timeout(job.soft_time_limit or None)
    try:
        with activated(_context(job, deadline)):
            async with limit:
                result = task.fn(*envelope.args, **envelope.kwargs)
                if inspect.isawaitable(result):
                    await result
        outcome = Outcome(job.key, OutcomeKind.SUCCEEDED, time.monotonic() - started)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a task's failure is data here
        if isinstance(exc, TimeoutError) and limit.expired():
            soft = SoftTimeLimitExceeded(f"soft time limit of {job.soft_time_limit:g} s exceeded")
            exc = soft.with_traceback(exc.__traceback__)
        outcome = describe(job.key, task, exc, time.monotonic() - started)
    finally:
        middleware.task_finished(job, outcome)
    return outcome


def _call(task: Task[Any, Any], envelope: Envelope) -> None:
    result = task.fn(*envelope.args, **envelope.kwargs)
    if inspect.isawaitable(result):
        asyncio.run(_awaited(result))


def _context(job: Job, deadline: float | None) -> TaskContext:
    envelope = job.envelope
    return TaskContext(
        task_name=envelope.task,
        task_id=envelope.id,
        message_id=job.key,
        queue=job.queue,
        attempt=envelope.attempt,
        max_retries=envelope.max_retries,
        deadline=deadline,
    )


async def _awaited(awaitable: object) -> None:
    await awaitable  # type: ignore[misc]


def describe(key: str, task: Task[Any, Any], exc: BaseException, duration: float) -> Outcome:
    """The outcome of an attempt of ``task`` that raised ``exc``."""
    if isinstance(exc, Retry):
        return Outcome(key, OutcomeKind.RETRY, duration, error=exc.reason, retry_delay=exc.delay)
    retryable = isinstance(exc, task.retry_on) and not isinstance(exc, MaxRetriesReachedException)
    outcome = failure(key, exc, duration, retryable)
    if isinstance(exc, SoftTimeLimitExceeded):
        # Uncaught, the soft limit ends the attempt as the hard one would: the message follows
        # the retry policy, whichever executor (and so whichever limit) stopped it.
        return replace(outcome, kind=OutcomeKind.TIMED_OUT)
    return outcome


def failure(key: str, exc: BaseException, duration: float, retryable: bool = False) -> Outcome:
    """A FAILED outcome describing ``exc``."""
    kind = type(exc)
    text = "".join(traceback.format_exception(exc))
    return Outcome(
        key,
        OutcomeKind.FAILED,
        duration,
        error_type=f"{kind.__module__}.{kind.__qualname__}",
        error=str(exc)[:1000],
        traceback=text[-MAX_TRACEBACK_CHARS:],
        retryable=retryable,
    )


@contextmanager
def soft_time_limit(seconds: float | None) -> Iterator[bool]:
    """Raise :class:`~ebsqs.errors.SoftTimeLimitExceeded` in this thread after ``seconds``.

    Uses ``SIGALRM``, so it works in the main thread only (the inline executor, the process
    executor's subprocesses); anywhere else, or with ``seconds`` None, it arms nothing. An alarm
    already set by someone else (pytest-timeout, a web server) is respected: if it would ring
    first, ours is not armed; otherwise it is set again, with its remaining time, afterwards.

    Yields:
        Whether the limit is armed.
    """
    if not seconds or not _can_alarm():
        yield False
        return
    outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer_delay and outer_delay <= seconds:
        yield False
        return
    armed = True

    def ring(signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of the task (or of this module, if the
        # task finished a moment ago: then the attempt still counts as over its limit).
        if armed:
            raise SoftTimeLimitExceeded(f"soft time limit of {seconds:g} s exceeded")

    previous = signal.signal(signal.SIGALRM, ring)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
        if outer_delay:
            left = max(outer_delay - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


def _can_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
