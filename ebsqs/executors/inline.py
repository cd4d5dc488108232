"""The inline executor: the task runs in the worker loop's own thread, one at a time."""

from __future__ import annotations

import time

from ebsqs.executors.base import Capabilities
from ebsqs.executors.execution import Job, Outcome, run_job
from ebsqs.registry import TaskRegistry, registry


class InlineExecutor:
    """Concurrency 1; ``submit`` returns when the task has finished.

    Soft limits are enforced with ``SIGALRM`` when the loop runs in the main thread (as it does
    in ``ebsqs worker`` and in the supervisor's children): the task gets
    :class:`~ebsqs.errors.SoftTimeLimitExceeded` and may catch it. A task that overruns its hard
    limit cannot be stopped from inside: the worker's keeper thread settles its message as timed
    out and ends the process, which the supervisor replaces (its heartbeat carries the deadline,
    so the master kills the child should even that fail).
    """

    capabilities = Capabilities(
        soft_limit_sync=True, soft_limit_async=True, runs_in_loop_thread=True
    )

    def __init__(self, concurrency: int = 1, registry: TaskRegistry = registry) -> None:
        self.concurrency = 1
        self._registry = registry
        self._done: list[Outcome] = []

    def start(self) -> None:
        """Nothing to create."""

    def submit(self, job: Job) -> None:
        deadline = time.time() + job.time_limit if job.time_limit else None
        self._done.append(run_job(job, self._registry, deadline, soft_limit=True))

    def free_slots(self) -> int:
        return 1

    def collect(self, timeout: float) -> list[Outcome]:
        done, self._done = self._done, []
        return done

    def running(self) -> int:
        return 0

    def wake(self) -> None:
        """Nothing waits: ``collect`` never blocks."""

    def stop_overdue(self, now: float) -> list[Outcome]:
        return []

    def shutdown(self, deadline: float) -> list[Outcome]:
        return self.collect(0)
