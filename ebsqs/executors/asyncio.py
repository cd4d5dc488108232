"""The asyncio executor: ``async def`` tasks share one event loop, N at a time.

For I/O-bound tasks written as coroutines (``aiohttp``, ``asyncpg``...): one thread runs an event
loop beside the worker loop, and every submitted coroutine task becomes an asyncio task on it, so
``--concurrency 100`` costs a hundred coroutines, not a hundred threads. Plain (sync) tasks sent
to the same queue still work: they run in the loop's default thread pool.

The other executors run ``async def`` tasks too, each in its own short-lived event loop
(``asyncio.run``); this one is for running many of them at once.

Time limits:
    * soft: the coroutine is cancelled (it sees ``CancelledError`` at the ``await`` it waits in,
      and may clean up, or swallow it and finish); an attempt that ends that way is reported as
      :class:`~ebsqs.errors.SoftTimeLimitExceeded` (TIMED_OUT, so the retry policy applies).
      Not enforced for sync tasks, which run in threads.
    * hard: :meth:`AsyncioExecutor.stop_overdue` cancels the coroutine; its TIMED_OUT outcome
      arrives through :meth:`collect` once the cancellation has unwound it. A sync task (in a
      thread) cannot be stopped: as under the thread executor, the worker's keeper settles its
      message as timed out and the process is replaced. A coroutine that blocks the loop or
      ignores cancellation is left to the supervisor, which kills the child past the deadline
      its heartbeat reports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import queue
import threading
import time
from dataclasses import dataclass, field

from ebsqs.executors.base import WAKE, Capabilities, take_outcomes
from ebsqs.executors.execution import Job, Outcome, OutcomeKind, failure, run_job, run_job_async
from ebsqs.log import get_logger
from ebsqs.registry import TaskRegistry, registry

log = get_logger(__name__)

#: Seconds shutdown waits for cancelled coroutines to unwind before reporting them anyway.
CANCEL_GRACE = 1.0


@dataclass
class _Running:
    job: Job
    started: float  # monotonic
    deadline: float | None  # monotonic hard limit
    cancellable: bool  # a coroutine (a sync task in a thread cannot be cancelled)
    future: concurrent.futures.Future[None] | None = None
    stopped_as: OutcomeKind | None = field(default=None)


class AsyncioExecutor:
    """Runs up to ``concurrency`` jobs at once on one event loop in a dedicated thread."""

    capabilities = Capabilities(soft_limit_async=True, hard_limit_async=True)

    def __init__(self, concurrency: int = 1, registry: TaskRegistry = registry) -> None:
        self.concurrency = concurrency
        self._registry = registry
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._running: dict[str, _Running] = {}  # guarded by _lock
        self._outcomes: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()

    def start(self) -> None:
        """Start the event loop's thread (in the worker's process, after any fork)."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="ebsqs-asyncio", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Schedule a job on the loop. Only called while ``free_slots() > 0``."""
        if self._loop is None or self._loop.is_closed():
            raise RuntimeError("the asyncio executor is not running")
        task = self._registry.get(job.envelope.task)
        now = time.monotonic()
        running = _Running(
            job,
            now,
            now + job.time_limit if job.time_limit else None,
            cancellable=inspect.iscoroutinefunction(inspect.unwrap(task.fn)),
        )
        if job.soft_time_limit and not running.cancellable:
            log.warning("soft_time_limit_not_enforced", task=job.envelope.task, executor="asyncio")
        with self._lock:
            if len(self._running) >= self.concurrency:
                raise RuntimeError("submit() called with no free slot")
            self._running[job.key] = running
        running.future = asyncio.run_coroutine_threadsafe(self._run(running), self._loop)

    def free_slots(self) -> int:
        """Jobs that could start now."""
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
        """Cancel coroutines past their hard limit; their TIMED_OUT outcomes come via collect."""
        with self._lock:
            overdue = [
                r
                for r in self._running.values()
                if r.deadline is not None and r.deadline <= now and r.stopped_as is None
            ]
        for running in overdue:
            if self._stop(running, OutcomeKind.TIMED_OUT):
                log.warning(
                    "task_cancelled",
                    task=running.job.envelope.task,
                    task_id=running.job.envelope.id,
                    duration=round(now - running.started, 3),
                    time_limit=running.job.time_limit,
                )
        return []

    def shutdown(self, deadline: float) -> list[Outcome]:
        """Wait for running jobs until ``deadline``; cancel the rest (INTERRUPTED)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return self.collect(0)
        while self.running() and time.monotonic() < deadline:
            with self._lock:
                self._lock.wait(max(min(deadline - time.monotonic(), 0.1), 0))
            self.stop_overdue(time.monotonic())  # hard limits hold while draining
        with self._lock:
            for running in self._running.values():
                running.stopped_as = running.stopped_as or OutcomeKind.INTERRUPTED
        # Cancel every job on the loop and give them a moment to unwind (and report).
        with contextlib.suppress(concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(CANCEL_GRACE + 1)
        with self._lock:
            # Still here: coroutines that ignore cancellation. Report them now; should they
            # finish later, their outcome is dropped.
            stuck, self._running = list(self._running.values()), {}
        done = self.collect(0)
        now = time.monotonic()
        done += [Outcome(r.job.key, OutcomeKind.INTERRUPTED, now - r.started) for r in stuck]
        self._stop_loop()
        return done

    def _stop(self, running: _Running, kind: OutcomeKind) -> bool:
        """Cancel a coroutine job from the worker's thread; False if it cannot be cancelled."""
        if not running.cancellable or running.future is None:
            return False
        running.stopped_as = kind
        running.future.cancel()  # thread-safe: cancels the asyncio task on the loop
        return True

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CANCEL_GRACE)
        if not thread.is_alive():
            loop.close()

    async def _run(self, running: _Running) -> None:
        """Run one job on the loop (in the loop's thread) and report its outcome."""
        job = running.job
        deadline = time.time() + job.time_limit if job.time_limit else None
        try:
            if running.cancellable:
                outcome = await run_job_async(job, self._registry, deadline)
            else:
                outcome = await self._in_thread(job, deadline)
        except asyncio.CancelledError:
            kind = running.stopped_as or OutcomeKind.INTERRUPTED
            outcome = Outcome(
                job.key, kind, time.monotonic() - running.started, error=_why(job, kind)
            )
        except Exception as exc:  # noqa: BLE001 - a failing hook must not lose the outcome
            outcome = failure(job.key, exc, time.monotonic() - running.started)
        with self._lock:
            if self._running.pop(job.key, None) is not None:
                self._outcomes.put(outcome)
            self._lock.notify_all()

    async def _in_thread(self, job: Job, deadline: float | None) -> Outcome:
        """Run a sync task in a thread of its own, without blocking the loop.

        A daemon thread, not the loop's default pool: pool threads are joined when the
        interpreter exits, so one stuck task would keep a drained worker from exiting.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()

        def work() -> None:
            # Runs in the job's own thread.
            started = time.monotonic()
            try:
                outcome = run_job(job, self._registry, deadline)
            except Exception as exc:  # noqa: BLE001 - a failing hook must not lose the outcome
                outcome = failure(job.key, exc, time.monotonic() - started)
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, future, outcome)

        threading.Thread(target=work, name="ebsqs-asyncio-sync", daemon=True).start()
        return await future


async def _cancel_all() -> None:
    """Cancel every other task on this loop; wait a moment for them to unwind."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=CANCEL_GRACE)


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _why(job: Job, kind: OutcomeKind) -> str:
    if kind is OutcomeKind.TIMED_OUT:
        return f"hard time limit of {job.time_limit:g} s exceeded; the coroutine was cancelled"
    return "cancelled by shutdown"
