"""The receive-execute-ack loop of one process.

Per iteration (:meth:`Worker.loop_once`): receive what the executor can start (plus at most one
batch held back), decode and check each message, start what is due, collect outcomes, then ack,
retry or dead-letter. A keeper thread beside the loop extends the visibility of every held
message before it expires and reports a heartbeat every second, so a long task neither loses its
message nor makes a healthy process look hung.

Guarantees: at-least-once. A message is deleted only after its task succeeded, its retry was
sent, or its dead-letter copy was sent. Messages fetched but not started are released
(visibility 0) when the worker stops.
"""

from __future__ import annotations

import contextvars
import enum
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import cycle

import structlog

from ebsqs.backoff import Backoff
from ebsqs.brokers import MAX_BATCH, Broker, ReceivedMessage
from ebsqs.config import Settings
from ebsqs.envelope import Envelope, decode
from ebsqs.errors import BrokerError, EnvelopeError, QueueDoesNotExist
from ebsqs.execution import Job, Outcome, OutcomeKind
from ebsqs.executors.base import Executor
from ebsqs.producer import ensure_queue
from ebsqs.registry import TaskRegistry, registry
from ebsqs.settle import Settler
from ebsqs.stats import TaskStats

log = structlog.get_logger(__name__)

#: Seconds between keeper passes (heartbeat and visibility extension).
KEEPER_INTERVAL = 1.0

#: The exit code of a worker process whose task overran a hard limit its executor cannot
#: enforce (inline, thread): the task's message was settled, and the process must be replaced.
EXIT_OVERRUN = 4


class FastStop(BaseException):
    """Raised in the loop's thread by a second stop signal: abandon work and exit now."""


class _ReceiveInterrupted(BaseException):
    """Raised by a stop signal that arrives during a long poll, so the worker need not wait.

    A BaseException, because botocore retries a request that raised an ordinary Exception.
    """


class WorkerState(enum.StrEnum):
    """What the loop is doing, as heartbeats report it."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class Counters:
    """Outcomes since the process started; ``tasks`` breaks them down per task name."""

    done: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    received: int = 0
    empty_receives: int = 0
    receives: int = 0
    extended: int = 0
    tasks: dict[str, TaskStats] = field(default_factory=dict)

    def task(self, name: str) -> TaskStats:
        """The stats of task ``name``, created at zero on first use."""
        stats = self.tasks.get(name)
        if stats is None:
            stats = self.tasks[name] = TaskStats()
        return stats


@dataclass(frozen=True, slots=True)
class RunningTask:
    """A started task, as heartbeats report it."""

    task: str
    task_id: str
    queue: str
    started_at: float
    deadline: float | None


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A snapshot for heartbeats and ``ebsqs status``."""

    state: WorkerState
    held: int
    running: tuple[RunningTask, ...]
    counters: Counters
    at: float


@dataclass
class Held:
    """A received message the worker is responsible for until it acks or releases it."""

    message: ReceivedMessage
    queue: str
    envelope: Envelope | None = None
    job: Job | None = None
    backoff: Backoff | None = None
    started_at: float | None = None
    deadline: float | None = None
    visible_until: float = 0.0
    first_received: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How the loop behaves.

    Attributes:
        queues: logical queue names to consume.
        wait_seconds: long-poll wait when nothing is running.
        visibility_timeout: seconds a received message stays invisible before extension.
        max_tasks: stop gracefully after this many tasks (recycling), or None.
        heartbeat: called with a :class:`WorkerStatus` about every second, from the keeper.
    """

    queues: tuple[str, ...]
    wait_seconds: float = 20
    visibility_timeout: int = 30
    max_tasks: int | None = None
    heartbeat: Callable[[WorkerStatus], None] | None = None


class Worker:
    """One process's loop over its queues. Build it, ``start()`` it, then ``run()`` it."""

    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        executor: Executor,
        options: WorkerOptions,
        registry: TaskRegistry = registry,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.executor = executor
        self.options = options
        self.registry = registry
        self.counters = Counters()
        self.state = WorkerState.STARTING
        self._held: dict[str, Held] = {}
        self._pending: deque[Held] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._receiving = False
        self._started = 0
        self._backlog = False
        #: A task overran a hard limit the executor could not enforce: exit with EXIT_OVERRUN.
        self.overran = False
        self._keeper_stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._queues = cycle(options.queues)
        self._settler = Settler(
            broker, settings, Backoff(settings.backoff_base, settings.backoff_cap), self.counters
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare queues, the executor and the keeper (in the process that will run the loop)."""
        for queue in self.options.queues:
            self._check_queue(queue)
        self.executor.start()
        self._settler.log_successes = log.is_enabled_for(logging.INFO)
        # The keeper runs in a copy of this thread's context, so its log lines carry the same
        # bound values (role, queue, slot, pid) as the loop's.
        context = contextvars.copy_context()
        self._keeper = threading.Thread(
            target=context.run, args=(self._keep,), name="ebsqs-keeper", daemon=True
        )
        self._keeper.start()
        self.state = WorkerState.IDLE
        log.info("worker_started", queues=list(self.options.queues))

    def _check_queue(self, queue: str) -> None:
        physical = self.settings.physical_queue(queue)
        try:
            self.broker.stats(physical)
        except QueueDoesNotExist:
            if not self.settings.auto_create_queues:
                raise
            ensure_queue(self.broker, self.settings, physical)

    def run(self) -> None:
        """Loop until asked to stop, then drain.

        Raises:
            FastStop: a second stop signal; every held message was released first.
        """
        try:
            while not self._stopping.is_set():
                self.loop_once()
            self.drain()
        except FastStop:
            self.abandon()
            raise

    def stop(self) -> None:
        """Ask the loop to stop after the current step (safe from a signal handler)."""
        self._stopping.set()

    def on_stop_signal(self, signum: int) -> None:
        """The signal handler's whole job (it runs in the loop's thread).

        The first signal asks for a drain, and cuts a long poll short so an idle worker stops
        at once. The second raises :class:`FastStop` wherever the loop is, even inside a task.
        """
        if self._stopping.is_set():
            raise FastStop(signum)
        self._stopping.set()
        if self._receiving:
            raise _ReceiveInterrupted()

    def abandon(self) -> None:
        """Release every held message at once, running or not, and stop the keeper."""
        self._pending.clear()
        self._release(list(self._held.values()), reason="fast stop")
        self._settler.flush_acks()
        self._keeper_stop.set()
        self.state = WorkerState.STOPPED
        log.warning("worker_abandoned", **_counts(self.counters))

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stopping.is_set()

    def drain(self, deadline: float | None = None) -> None:
        """Release unstarted messages, finish running ones until ``deadline``, settle all."""
        self.state = WorkerState.DRAINING
        self._release(list(self._pending), reason="draining")
        self._pending.clear()
        if deadline is None:
            deadline = time.monotonic() + 3600
        self._settle(self.executor.shutdown(deadline))
        self._release(list(self._held.values()), reason="stopped before finishing", timeout=1)
        self._settler.flush_acks()
        self._keeper_stop.set()
        self.state = WorkerState.STOPPED
        log.info("worker_stopped", **_counts(self.counters))

    # -- the loop --------------------------------------------------------------------------

    def loop_once(self) -> None:
        """One iteration: receive what can start, start what is due, settle what finished."""
        if self._wants_messages():
            self._receive()
        self._start_pending()
        outcomes = self.executor.collect(self._collect_wait())
        outcomes += self.executor.stop_overdue(time.monotonic())
        self._settle(outcomes)
        self._start_pending()
        self.state = WorkerState.BUSY if self._held else WorkerState.IDLE
        if self._reached_max_tasks() and not self.executor.running():
            log.info("worker_recycled", tasks=self._started)
            self.stop()

    def _collect_wait(self) -> float:
        """How long to wait for outcomes: not at all while more work could start at once."""
        if not self.executor.running():
            return 0.0
        if self.executor.free_slots() > 0 and (
            self._pending or (self._backlog and self._wants_messages())
        ):
            return 0.0  # a slot is free and work is at hand (held, or a full last receive)
        # Every slot is busy (or nothing waits): block until one finishes. Returning at once
        # here would spin the loop at 100 % of a core while prefetched messages wait.
        return min(1.0, self.options.wait_seconds)

    def _wants_messages(self) -> bool:
        if self._stopping.is_set() or self._reached_max_tasks():
            return False
        return self._room() > 0 and len(self._pending) < max(self.executor.free_slots(), 1)

    def _room(self) -> int:
        """Messages the loop may still take: what can run at once plus one batch, less held."""
        return self.executor.concurrency + MAX_BATCH - len(self._held)

    def _reached_max_tasks(self) -> bool:
        """True once as many tasks were started as this process may run (recycling)."""
        limit = self.options.max_tasks
        return limit is not None and self._started >= limit

    def _receive(self) -> None:
        # Finished messages awaiting deletion still hold receipts, and a long poll may follow:
        # delete them first. (The keeper sends deletes that waited a second while tasks run.)
        self._settler.flush_acks()
        queue = next(self._queues)
        room = self._room()
        # Long-poll only when nothing runs: outcomes must not wait behind a 20-second poll.
        idle = not self._held
        wait = self.options.wait_seconds / len(self.options.queues) if idle else 0
        try:
            self._receiving = True
            try:
                messages = self.broker.receive(
                    self.settings.physical_queue(queue),
                    min(room, MAX_BATCH),
                    wait_seconds=max(min(wait, 20), 0),
                    visibility_timeout=self.options.visibility_timeout,
                    metadata=False,
                )
            finally:
                self._receiving = False
        except _ReceiveInterrupted:
            # Anything the broker handed out in that instant comes back after its visibility
            # timeout: delayed, never lost.
            return
        except BrokerError as exc:
            log.error("receive_failed", queue=queue, error=str(exc))
            self._stopping.wait(1.0)  # back off without spinning; wakes at once on stop
            return
        self.counters.receives += 1
        self.counters.received += len(messages)
        self._backlog = len(messages) == min(room, MAX_BATCH)
        if not messages:
            self.counters.empty_receives += 1
        now = time.time()
        for message in messages:
            self._accept(Held(message, queue, visible_until=now + self.options.visibility_timeout))

    def _accept(self, held: Held) -> None:
        """Decode and check one message; keep it if it can run, else dead-letter or hop it."""
        try:
            envelope = decode(
                held.message.body,
                signing_key=self.settings.signing_key,
                accept_pickle=self.settings.accept_pickle,
            )
            task = self.registry.get(envelope.task)
        except EnvelopeError as exc:
            self._settler.reject(held, exc)
            return
        held.envelope = envelope
        held.backoff = task.backoff
        if envelope.due is not None and envelope.due > time.time() + 1:
            self._settler.hop(held, envelope)
            return
        hard, soft = self.settings.time_limits_for(held.queue)
        held.job = Job(
            key=held.message.message_id,
            envelope=envelope,
            queue=held.queue,
            time_limit=task.time_limit if task.time_limit is not None else hard,
            soft_time_limit=task.soft_time_limit if task.soft_time_limit is not None else soft,
        )
        with self._lock:
            self._held[held.message.message_id] = held
        self._pending.append(held)

    def _start_pending(self) -> None:
        while self._pending and self.executor.free_slots() > 0 and not self._stopping.is_set():
            if self._reached_max_tasks():
                return
            held = self._pending.popleft()
            self._started += 1
            assert held.job is not None
            held.started_at = time.time()
            if held.job.time_limit:
                held.deadline = held.started_at + held.job.time_limit
            self.state = WorkerState.BUSY
            self.executor.submit(held.job)
            # Inline jobs finish inside submit(): settle each at once, so a crash later in the
            # batch never repeats finished work (the deletes still go out ten at a time).
            self._settle(self.executor.collect(0))

    def _settle(self, outcomes: Sequence[Outcome]) -> None:
        finished = []
        for outcome in outcomes:
            with self._lock:
                held = self._held.pop(outcome.key, None)
            if held is not None:
                finished.append((held, outcome))
        self._settler.settle(finished)

    def _release(self, held: Sequence[Held], reason: str, timeout: int = 0) -> None:
        """Make messages visible again (at once, or after ``timeout`` seconds)."""
        with self._lock:
            for item in held:
                self._held.pop(item.message.message_id, None)
        self._settler.release([item.message for item in held], reason, timeout)

    # -- the keeper thread -----------------------------------------------------------------

    def _keep(self) -> None:
        """Beside the loop: extend visibility and send heartbeats until the worker stops."""
        while not self._keeper_stop.wait(self._keeper_wait()):
            try:
                self._settle_overruns()
                self._settler.flush_acks(older_than=KEEPER_INTERVAL)
                self._extend_visibility()
                if self.options.heartbeat is not None:
                    self.options.heartbeat(self.status())
            except Exception as exc:  # noqa: BLE001 - the keeper must outlive one bad pass
                log.error("keeper_failed", error=repr(exc))

    def _keeper_wait(self) -> float:
        """Until the next pass: a second, or sooner when a running task's hard limit falls."""
        with self._lock:
            deadlines = [h.deadline for h in self._held.values() if h.deadline is not None]
        soonest = min(deadlines, default=None)
        if soonest is None:
            return KEEPER_INTERVAL
        return min(KEEPER_INTERVAL, max(soonest - time.time(), 0.0) + 0.05)

    def _settle_overruns(self) -> None:
        """Keeper side: tasks past a hard limit their executor cannot enforce.

        Inline and thread executors cannot stop a task. The keeper settles its message as
        TIMED_OUT (a retry or a dead letter, per the task's policy), then ends this process,
        which the supervisor replaces: at once for inline (the loop's thread is the runaway), by
        a drain for thread (other threads' tasks may finish; the runaway dies with the process).
        """
        if getattr(self.executor, "stops_overdue", False):
            return
        now = time.time()
        with self._lock:
            overrun = [
                h
                for h in self._held.values()
                if h.deadline is not None and h.started_at is not None and now > h.deadline
            ]
        if not overrun:
            return
        for held in overrun:
            assert held.job is not None and held.started_at is not None
            log.error(
                "task_overran",
                task=held.job.envelope.task,
                task_id=held.job.envelope.id,
                time_limit=held.job.time_limit,
                duration=round(now - held.started_at, 3),
            )
        self._settle(
            [
                Outcome(
                    h.message.message_id,
                    OutcomeKind.TIMED_OUT,
                    now - (h.started_at or now),
                    error=f"ran past its hard time limit of {h.job.time_limit if h.job else '?'} s",
                )
                for h in overrun
            ]
        )
        self._exit_after_overrun()

    def _exit_after_overrun(self) -> None:
        """Replace this process: the runaway task cannot be stopped inside it."""
        self.overran = True
        self.stop()
        if not getattr(self.executor, "runs_in_loop_thread", False):
            return  # the loop is free: it drains the other tasks, then the process ends
        # The loop's own thread runs the task: release what waits, delete what is done, leave.
        self._release(list(self._pending), reason="task overran its hard limit")
        self._pending.clear()
        self._settler.flush_acks()
        log.critical("worker_exited_after_overrun", exit_code=EXIT_OVERRUN)
        sys.stderr.flush()
        os._exit(EXIT_OVERRUN)

    def _extend_visibility(self) -> None:
        now = time.time()
        timeout = self.options.visibility_timeout
        margin = max(timeout / 3, 2 * KEEPER_INTERVAL)
        with self._lock:
            due = [h for h in self._held.values() if h.visible_until - now < margin]
        if due:
            self._settler.extend(due, timeout, now)

    def status(self) -> WorkerStatus:
        """A snapshot of the loop, safe to take from any thread."""
        with self._lock:
            running = tuple(
                RunningTask(
                    h.job.envelope.task, h.job.envelope.id, h.queue, h.started_at, h.deadline
                )
                for h in self._held.values()
                if h.job is not None and h.started_at is not None
            )
            held = len(self._held)
        return WorkerStatus(self.state, held, running, self.counters, time.time())


def _counts(counters: Counters) -> dict[str, int]:
    return {
        "done": counters.done,
        "failed": counters.failed,
        "retried": counters.retried,
        "dead_lettered": counters.dead_lettered,
    }
