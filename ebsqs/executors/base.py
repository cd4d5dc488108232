"""The Executor contract: where jobs run, how many at once, and how they are stopped."""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ebsqs.executors.execution import Job, Outcome


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an executor can enforce on the jobs it runs, for sync and for ``async def`` tasks.

    The worker reads these instead of guessing: a hard limit the executor cannot enforce for a
    job is enforced by the worker itself (its keeper settles the overrun message as timed out
    and the process is replaced), so no overrun message is left to come back and run twice.

    Attributes:
        soft_limit_sync: the soft limit interrupts a running sync task.
        soft_limit_async: the soft limit interrupts a running coroutine task.
        hard_limit_sync: :meth:`Executor.stop_overdue` stops a sync task past its hard limit.
        hard_limit_async: :meth:`Executor.stop_overdue` stops a coroutine past its hard limit.
        runs_in_loop_thread: jobs run in the worker loop's own thread (the loop is blocked
            while one runs).
    """

    soft_limit_sync: bool = False
    soft_limit_async: bool = False
    hard_limit_sync: bool = False
    hard_limit_async: bool = False
    runs_in_loop_thread: bool = False

    def stops_overdue(self, job: Job) -> bool:
        """Whether this executor stops ``job`` itself once it overruns its hard limit."""
        return self.hard_limit_async if job.is_async else self.hard_limit_sync


@runtime_checkable
class Executor(Protocol):
    """Runs jobs and hands back outcomes; never acks, retries or dead-letters.

    Constructed as ``Executor(concurrency=N, registry=registry)`` before the fork; ``start()``
    runs after it, in the process that runs the worker loop.

    An executor may also have ``wake()``: callable from any thread, it makes a ``collect`` that
    waits (now or next) return at once. The worker's receivers call it when messages come, so
    the loop starts them without waiting for a running job to finish; without it they wait for
    ``collect`` to time out (at most a second). Every built-in executor has it.
    """

    #: How many jobs may run at once.
    concurrency: int
    #: What it can enforce (see :class:`Capabilities`).
    capabilities: Capabilities

    def start(self) -> None:
        """Create pools and threads (in the worker's own process, after any fork)."""
        ...

    def submit(self, job: Job) -> None:
        """Start a job. Only called while ``free_slots() > 0``."""
        ...

    def free_slots(self) -> int:
        """How many more jobs could start now."""
        ...

    def collect(self, timeout: float) -> list[Outcome]:
        """Outcomes of finished jobs, waiting up to ``timeout`` seconds for the first one."""
        ...

    def running(self) -> int:
        """How many jobs are running."""
        ...

    def stop_overdue(self, now: float) -> list[Outcome]:
        """Stop jobs past their hard time limit, where this executor can; their outcomes.

        ``now`` is ``time.monotonic()``. Jobs it cannot stop (see :attr:`capabilities`) are
        left alone: the worker settles them and its process is replaced.
        """
        ...

    def shutdown(self, deadline: float) -> list[Outcome]:
        """Let running jobs finish until ``deadline`` (monotonic), then stop the rest.

        Returns the outcomes not yet collected; stopped jobs come back as INTERRUPTED.
        """
        ...


#: Put in an outcome queue by ``wake()``: ends a wait in :func:`take_outcomes`, is no outcome.
WAKE = None


def take_outcomes(outcomes: queue.SimpleQueue[Outcome | None], timeout: float) -> list[Outcome]:
    """Every outcome waiting in ``outcomes``, waiting up to ``timeout`` s for the first one
    (or for a :data:`WAKE`).

    The ``collect`` of executors whose jobs finish on other threads.
    """
    done: list[Outcome] = []
    if timeout > 0:
        try:
            first = outcomes.get(timeout=timeout)
        except queue.Empty:
            return done
        if first is not WAKE:
            done.append(first)
    while True:
        try:
            item = outcomes.get_nowait()
        except queue.Empty:
            return done
        if item is not WAKE:
            done.append(item)
