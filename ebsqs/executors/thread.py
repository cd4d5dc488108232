"""The thread executor: a bounded pool of N threads in the worker's own process.

For I/O-bound tasks. Jobs are handed over one by one, and the worker loop submits only while
``free_slots() > 0``, so nothing queues inside the executor (unlike ``concurrent.futures``,
whose queue is unbounded): a message is either running or still in the loop's hands.

Tasks share the process's broker objects (``.delay()`` from a task uses the same per-process
boto3 client, which is thread-safe) and its Django connections (one per thread, as Django does).

Limits of threads, by design:
    * Soft time limits are **not enforced**: Python can deliver a signal only to the main
      thread, and injecting an exception into another thread cannot interrupt a blocking call
      and may land outside the task. Tasks that need one can read ``context.current().deadline``
      (the hard deadline) and stop cooperatively. A warning is logged once per task name.
    * Hard limits: a thread cannot be killed. Past a task's hard limit the worker's keeper
      settles its message as timed out (retried or dead-lettered by the task's policy) and the
      process drains and exits, to be replaced; the runaway thread ends with it.
    * Drain: :meth:`ThreadExecutor.shutdown` waits for running tasks until the deadline, then
      reports the rest INTERRUPTED (their messages come back soon) and leaves their threads
      behind; they are daemon threads and end with the process, which must exit next.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from ebsqs.executors.base import WAKE, Capabilities, take_outcomes
from ebsqs.executors.execution import Job, Outcome, OutcomeKind, failure, run_job
from ebsqs.log import get_logger
from ebsqs.registry import TaskRegistry, registry

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Started:
    job: Job
    at: float  # monotonic


class ThreadExecutor:
    """Runs up to ``concurrency`` jobs at once, each in a pool thread."""

    capabilities = Capabilities()  # a thread can be neither interrupted nor killed

    def __init__(self, concurrency: int = 1, registry: TaskRegistry = registry) -> None:
        self.concurrency = concurrency
        self._registry = registry
        # Loop thread -> pool threads: at most `concurrency` jobs wait here, by the contract of
        # submit(); None tells one thread to exit.
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # Pool threads -> loop thread.
        self._outcomes: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._running: dict[str, _Started] = {}  # guarded by _lock
        self._threads: list[threading.Thread] = []
        self._warned: set[str] = set()
        self._closed = False

    def start(self) -> None:
        """Start the pool threads (in the worker's process, after any fork)."""
        for number in range(self.concurrency):
            thread = threading.Thread(target=self._serve, name=f"ebsqs-task-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, job: Job) -> None:
        """Hand a job to an idle thread. Only called while ``free_slots() > 0``."""
        if self._closed:
            raise RuntimeError("the thread executor is shut down")
        if job.soft_time_limit and job.envelope.task not in self._warned:
            self._warned.add(job.envelope.task)
            log.warning("soft_time_limit_not_enforced", task=job.envelope.task, executor="thread")
        with self._lock:
            if len(self._running) >= self.concurrency:
                raise RuntimeError("submit() called with no free slot")
            self._running[job.key] = _Started(job, time.monotonic())
        self._jobs.put(job)

    def free_slots(self) -> int:
        """Threads not running a job (finished jobs free their thread before they are collected)."""
        with self._lock:
            return self.concurrency - len(self._running)

    def running(self) -> int:
        """Jobs submitted and not finished."""
        with self._lock:
            return len(self._running)

    def collect(self, timeout: float) -> list[Outcome]:
        """Finished outcomes, waiting up to ``timeout`` seconds for the first one."""
        return take_outcomes(self._outcomes, timeout)

    def wake(self) -> None:
        """End a ``collect`` that waits."""
        self._outcomes.put(WAKE)

    def stop_overdue(self, now: float) -> list[Outcome]:
        """Threads cannot be stopped: the supervisor replaces the process past a deadline."""
        return []

    def shutdown(self, deadline: float) -> list[Outcome]:
        """Wait for running jobs until ``deadline`` (monotonic); report the rest INTERRUPTED."""
        self._closed = True
        with self._lock:
            self._lock.wait_for(
                lambda: not self._running, timeout=max(deadline - time.monotonic(), 0)
            )
            abandoned = list(self._running.values())
            # Forget them: should one finish later, its outcome is not reported twice.
            self._running.clear()
        done = self.collect(0)
        for _ in self._threads:
            self._jobs.put(None)  # idle threads exit; busy ones take theirs after their job
        now = time.monotonic()
        for started in abandoned:
            done.append(Outcome(started.job.key, OutcomeKind.INTERRUPTED, now - started.at))
        if abandoned:
            log.warning(
                "task_threads_abandoned",
                count=len(abandoned),
                tasks=sorted({s.job.envelope.task for s in abandoned}),
                reason="threads cannot be killed; they end when the process exits",
            )
        return done

    def _serve(self) -> None:
        """A pool thread: run jobs until told to stop."""
        while (job := self._jobs.get()) is not None:
            outcome = self._run(job)
            with self._lock:
                # A job abandoned by shutdown() is no longer tracked; its outcome is dropped.
                if self._running.pop(job.key, None) is None:
                    continue
                self._outcomes.put(outcome)
                self._lock.notify_all()

    def _run(self, job: Job) -> Outcome:
        started = time.monotonic()
        deadline = time.time() + job.time_limit if job.time_limit else None
        try:
            return run_job(job, self._registry, deadline)
        except Exception as exc:  # noqa: BLE001 - a failing hook must not cost the pool a thread
            log.error("task_runner_failed", task=job.envelope.task, error=repr(exc))
            return failure(job.key, exc, time.monotonic() - started)
