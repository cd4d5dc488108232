"""The Executor contract: where jobs run, how many at once, and how they are stopped."""

from __future__ import annotations

import queue
from typing import Protocol, runtime_checkable

from ebsqs.execution import Job, Outcome


@runtime_checkable
class Executor(Protocol):
    """Runs jobs and hands back outcomes; never acks, retries or dead-letters.

    Constructed as ``Executor(concurrency=N, registry=registry)`` before the fork; ``start()``
    runs after it, in the process that runs the worker loop.
    """

    #: How many jobs may run at once.
    concurrency: int

    # Optional class attributes the worker reads with getattr (default False):
    # ``stops_overdue``: stop_overdue() really stops jobs past their hard limit (process,
    # asyncio); otherwise the worker settles an overrun job itself and replaces its process.
    # ``runs_in_loop_thread``: jobs run in the worker loop's own thread (inline).

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

        ``now`` is ``time.monotonic()``. Executors that cannot stop a job (inline, thread)
        return nothing: the supervisor replaces their process instead.
        """
        ...

    def shutdown(self, deadline: float) -> list[Outcome]:
        """Let running jobs finish until ``deadline`` (monotonic), then stop the rest.

        Returns the outcomes not yet collected; stopped jobs come back as INTERRUPTED.
        """
        ...


def take_outcomes(outcomes: queue.SimpleQueue[Outcome], timeout: float) -> list[Outcome]:
    """Every outcome waiting in ``outcomes``, waiting up to ``timeout`` s for the first one.

    The ``collect`` of executors whose jobs finish on other threads.
    """
    done: list[Outcome] = []
    if timeout > 0:
        try:
            done.append(outcomes.get(timeout=timeout))
        except queue.Empty:
            return done
    while True:
        try:
            done.append(outcomes.get_nowait())
        except queue.Empty:
            return done
