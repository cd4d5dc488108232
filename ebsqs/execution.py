"""Running one job and describing what happened, the same way in every executor.

An executor decides *where* a job runs (this thread, a pool thread, a subprocess); this module
decides *how*: context, hooks, and turning exceptions into an :class:`Outcome`. Outcomes only
describe; the worker loop alone decides to ack, retry or dead-letter.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import time
import traceback
from dataclasses import dataclass

from ebsqs import hooks
from ebsqs.context import TaskContext, activated
from ebsqs.envelope import Envelope
from ebsqs.errors import MaxRetriesReachedException, Retry
from ebsqs.registry import TaskRegistry

#: Tracebacks travel in outcomes and dead-letter attributes; keep them bounded.
MAX_TRACEBACK_CHARS = 4000


class OutcomeKind(enum.StrEnum):
    """What became of one job."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY = "retry"  # the task called .retry()
    TIMED_OUT = "timed_out"  # stopped at its hard time limit
    INTERRUPTED = "interrupted"  # stopped by a shutdown before it finished


@dataclass(frozen=True, slots=True)
class Job:
    """One message's task, ready to run (picklable, for the process executor).

    Attributes:
        key: unique within the worker: the broker's message id.
        envelope: the decoded envelope.
        queue: the logical queue it came from.
        time_limit: hard limit in seconds, or None.
        soft_time_limit: soft limit in seconds, or None.
    """

    key: str
    envelope: Envelope
    queue: str
    time_limit: float | None = None
    soft_time_limit: float | None = None


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
    """

    key: str
    kind: OutcomeKind
    duration: float = 0.0
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    retryable: bool = False
    retry_delay: float | None = None


def run_job(job: Job, registry: TaskRegistry, deadline: float | None = None) -> Outcome:
    """Run a job here, in this thread, and describe the result. Never raises for task errors."""
    envelope = job.envelope
    task = registry.get(envelope.task)
    ctx = TaskContext(
        task_name=envelope.task,
        task_id=envelope.id,
        message_id=job.key,
        queue=job.queue,
        attempt=envelope.attempt,
        max_retries=envelope.max_retries,
        deadline=deadline,
    )
    started = time.monotonic()
    hooks.fire("task_started", job)
    outcome = Outcome(job.key, OutcomeKind.FAILED)
    try:
        with activated(ctx):
            result = task.fn(*envelope.args, **envelope.kwargs)
            if inspect.isawaitable(result):
                asyncio.run(_awaited(result))
        outcome = Outcome(job.key, OutcomeKind.SUCCEEDED, time.monotonic() - started)
    except Retry as retry:
        outcome = Outcome(
            job.key,
            OutcomeKind.RETRY,
            time.monotonic() - started,
            error=retry.reason,
            retry_delay=retry.delay,
        )
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a task's failure is data here
        retryable = isinstance(exc, task.retry_on) and not isinstance(
            exc, MaxRetriesReachedException
        )
        outcome = failure(job.key, exc, time.monotonic() - started, retryable)
    finally:
        hooks.fire("task_finished", job, outcome)
    return outcome


async def _awaited(awaitable: object) -> None:
    await awaitable  # type: ignore[misc]


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
