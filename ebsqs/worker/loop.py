"""The receive-execute-ack loop of one process.

Per iteration (:meth:`Worker.loop_once`): receive what the executor can start (plus at most one
batch held back), decode and check each message, ask the middleware whether each may start,
start what is due, collect outcomes, then ack, retry or dead-letter (:mod:`.settle`). A keeper
thread beside the loop (:mod:`.keeper`) extends the visibility of every held message
(:mod:`.held`) before it expires and reports a heartbeat every second, so a long task neither
loses its message nor makes a healthy process look hung.

Guarantees: at-least-once. A message is deleted only after its task succeeded, its retry was
sent, or its dead-letter copy was sent. Messages fetched but not started are released
(visibility 0) when the worker stops.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import cycle

from ebsqs import middleware
from ebsqs.backoff import Backoff
from ebsqs.brokers import MAX_BATCH, MAX_VISIBILITY_SECONDS, Broker
from ebsqs.config import Settings
from ebsqs.counters import Counters
from ebsqs.envelope import MAX_BODY_BYTES, Envelope, decode
from ebsqs.errors import (
    BrokerError,
    ConfigurationError,
    EnvelopeError,
    ExitCode,
    QueueDoesNotExist,
)
from ebsqs.executors.base import Executor
from ebsqs.executors.execution import Job, Outcome
from ebsqs.log import get_logger
from ebsqs.middleware import Action, Decision
from ebsqs.payload import PayloadUnavailable
from ebsqs.producer import ensure_queue, payloads
from ebsqs.registry import TaskRegistry, registry
from ebsqs.worker.held import Held, HeldMessages, WorkerState, WorkerStatus
from ebsqs.worker.keeper import Keeper
from ebsqs.worker.pulse import Heartbeat, Pulse
from ebsqs.worker.settle import DEFAULT_ACK_WAIT, Settler

log = get_logger(__name__)

#: Pauses after failed receives: 0.5 s doubling to 30 s, jittered so that a fleet does not
#: come back in step after an outage.
RECEIVE_BACKOFF = Backoff(0.5, 30.0)
#: Receives failed in a row after which the worker reports itself degraded.
DEGRADED_AFTER = 3
#: Seconds an offloaded message waits before another try when S3 could not be read.
PAYLOAD_RETRY_SECONDS = 10
#: What SQS says when it refuses a call for its rate or a limit.
THROTTLED = ("Throttl", "OverLimit", "RequestThrottled", "SlowDown")


def fifo_attempt(envelope: Envelope, receive_count: int) -> int:
    """The attempt a message from a FIFO queue is on.

    A FIFO retry keeps its message (the body, which counts attempts on a standard queue, cannot
    change), so each receive past the first is an attempt, less the receives that only kept a
    delayed message waiting until it was due (one per 12 hours of delay).
    """
    waits = 0
    if envelope.due is not None and envelope.due > envelope.enqueued_at:
        waits = math.ceil((envelope.due - envelope.enqueued_at) / MAX_VISIBILITY_SECONDS)
    return envelope.attempt + max(receive_count - 1 - waits, 0)


class FastStop(BaseException):
    """Raised in the loop's thread by a second stop signal: abandon work and exit now."""


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How the loop behaves.

    Attributes:
        queues: logical queue names to consume.
        wait_seconds: long-poll wait when nothing is running.
        visibility_timeout: seconds a received message stays invisible before extension.
        max_tasks: stop gracefully after this many tasks (recycling), or None.
        heartbeat: called with a :class:`WorkerStatus` about every second, from a thread of its
            own (and from the loop's thread just before a task with a hard limit starts).
        ack_wait: seconds a finished message's delete may wait to fill a batch of ten.
    """

    queues: tuple[str, ...]
    wait_seconds: float = 20
    visibility_timeout: int = 30
    max_tasks: int | None = None
    heartbeat: Callable[[WorkerStatus], None] | None = None
    ack_wait: float = DEFAULT_ACK_WAIT


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
        self._held = HeldMessages()
        self._pending: deque[Held] = deque()
        # FIFO groups: one task of a group at a time, in order. A group whose message went
        # back to its queue (a retry, a delay, a release) is yielded: its later messages in
        # hand are released too, to come after it. The keeper's thread may yield a group, so
        # yields wait in a deque (thread-safe) for the loop's thread.
        self._running_groups: set[tuple[str, str]] = set()
        self._yielded_groups: deque[tuple[str, str]] = deque()
        self._stopping = threading.Event()
        self._receive_failures = 0  # in a row
        self._started = 0
        self._backlog = False
        #: A task overran a hard limit the executor could not enforce: exit with
        #: ``ExitCode.OVERRUN``.
        self.overran = False
        self._queues = cycle(options.queues)
        self._runs_here = executor.capabilities.runs_in_loop_thread
        self._pulse = Pulse()
        # The producer's, shared: one S3 client per process for unpacking and for the retries
        # and hops this worker sends.
        self._payloads = payloads(settings)
        self._settler = Settler(
            broker,
            settings,
            Backoff(settings.backoff_base, settings.backoff_cap),
            self.counters,
            io=self._pulse.blocked,
            ack_wait=options.ack_wait,
            payloads=self._payloads,
        )
        self._keeper = Keeper(
            self._held,
            self._settler,
            executor.capabilities,
            options.visibility_timeout,
            settle=self._settle,
            on_overrun=self._exit_after_overrun,
        )
        self._heartbeat = Heartbeat(self._beat_now)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare queues, the executor and the keeper (in the process that will run the loop)."""
        for queue in self.options.queues:
            self._check_queue(queue)
        self.executor.start()
        self._settler.log_successes = log.is_enabled_for(logging.INFO)
        self._keeper.start()
        if self.options.heartbeat is not None:
            self._heartbeat.start()
        self.state = WorkerState.IDLE
        log.info("worker_started", queues=list(self.options.queues))
        middleware.worker_started()

    def _check_queue(self, queue: str) -> None:
        """The queue and its dead-letter queue exist (or are created, where allowed).

        Without a dead-letter queue, a message that must not run could be neither dead-lettered
        nor deleted: it would come back forever. So a missing one stops the worker at start.

        Raises:
            QueueDoesNotExist: the queue is missing and auto-creation is off (a boot error).
            ConfigurationError: likewise its dead-letter queue (a boot error).
        """
        physical = self.settings.physical_queue(queue)
        dead_letters = self.settings.dead_letter_queue_of_physical(physical)
        for name in (physical, dead_letters):
            try:
                self.broker.stats(name)
            except QueueDoesNotExist:
                if self.settings.auto_create_queues:
                    ensure_queue(self.broker, self.settings, physical)
                    return
                if name == physical:
                    raise
                raise ConfigurationError(
                    f"queue {physical!r} has no dead-letter queue {dead_letters!r}: messages that "
                    f"fail or must not run would come back forever; create both with "
                    f"`ebsqs queues create {queue}`, or turn auto_create_queues on"
                ) from None

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

        The first signal asks for a drain. A long poll under way is let finish (at most
        ``wait_seconds``) and what it brings is released at once: cut short, the request's
        messages would be handed out to nobody and wait out their whole visibility timeout.
        The second raises :class:`FastStop` wherever the loop is, even inside a task.
        """
        if self._stopping.is_set():
            raise FastStop(signum)
        self._stopping.set()

    def abandon(self) -> None:
        """Release every held message at once, running or not, and stop the keeper."""
        self._pending.clear()
        self._release(self._held.all(), reason="fast stop")
        self._settler.flush_acks()
        self._keeper.stop()
        self._heartbeat.stop()
        self.state = WorkerState.STOPPED
        log.warning("worker_abandoned", **self.counters.totals())

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stopping.is_set()

    def drain(self, deadline: float | None = None) -> None:
        """Release unstarted messages, finish running ones until ``deadline``, settle all."""
        self.state = WorkerState.DRAINING
        self._pulse.block()  # bounded by ``deadline``, and by the supervisor's graceful timeout
        self._release(list(self._pending), reason="draining")
        self._pending.clear()
        if deadline is None:
            deadline = time.monotonic() + 3600
        self._settle(self.executor.shutdown(deadline))
        self._release(self._held.all(), reason="stopped before finishing", timeout=1)
        self._settler.flush_acks()
        self._keeper.stop()
        self._heartbeat.stop()
        self.state = WorkerState.STOPPED
        log.info("worker_stopped", **self.counters.totals())

    # -- the loop --------------------------------------------------------------------------

    def loop_once(self) -> None:
        """One iteration: receive what can start, start what is due, settle what finished."""
        self._pulse.beat()
        if self._wants_messages():
            self._receive()
        self._start_pending()
        outcomes = self.executor.collect(self._collect_wait())
        outcomes += self.executor.stop_overdue(time.monotonic())
        self._settle(outcomes)
        self._start_pending()
        if self._receive_failures >= DEGRADED_AFTER:
            self.state = WorkerState.DEGRADED
        else:
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
            with self._pulse.blocked():
                messages = self.broker.receive(
                    self.settings.physical_queue(queue),
                    min(room, MAX_BATCH),
                    wait_seconds=max(min(wait, 20), 0),
                    visibility_timeout=self.options.visibility_timeout,
                    metadata=False,
                )
        except BrokerError as exc:
            self._receive_failed(queue, exc)
            return
        self._receive_failures = 0
        self.counters.receives += 1
        self.counters.received += len(messages)
        self._backlog = len(messages) == min(room, MAX_BATCH)
        if not messages:
            self.counters.empty_receives += 1
        now = time.monotonic()
        for message in messages:
            self._accept(Held(message, queue, visible_until=now + self.options.visibility_timeout))

    def _receive_failed(self, queue: str, exc: BrokerError) -> None:
        """Count the failure, then back off, capped and jittered, waking at once on stop."""
        self._receive_failures += 1
        counters = self.counters
        counters.receive_errors += 1
        text = str(exc)
        if any(marker in text for marker in THROTTLED):
            counters.throttled += 1
        if "KMS" in text:
            counters.kms_errors += 1
        delay = RECEIVE_BACKOFF.delay(self._receive_failures)
        log.error("receive_failed", queue=queue, error=text, retry_in=round(delay, 3))
        with self._pulse.blocked():  # backing off up to 30 s is waiting on the broker, not a stall
            self._stopping.wait(delay)

    def _accept(self, held: Held) -> None:
        """Decode and check one message; keep it if it can run, else dead-letter or hop it."""
        try:
            body, stored = self._payloads.unpack(held.message)
            envelope = decode(
                body,
                signing_key=self.settings.signing_keys,
                accept_pickle=self.settings.accept_pickle,
                max_signature_age=self.settings.signature_max_age,
                max_bytes=max(self.settings.max_payload_bytes, MAX_BODY_BYTES),
            )
            task = self.registry.get(envelope.task)
        except EnvelopeError as exc:
            self._settler.reject(held, exc)
            return
        except PayloadUnavailable as exc:
            # S3, not the message, failed: try again later, never dead-letter for this.
            log.error("payload_unavailable", message_id=held.key, error=str(exc))
            self._settler.release([held.message], "payload unavailable", PAYLOAD_RETRY_SECONDS)
            self._yield_group(held)
            return
        if stored is not None:
            self._settler.stored[held.key] = stored
        if held.fifo:
            envelope = envelope.at_attempt(fifo_attempt(envelope, held.message.receive_count))
        held.envelope = envelope
        held.backoff = task.backoff
        if envelope.due is not None and envelope.due > time.time() + 1:
            self._settler.hop(held, envelope)
            self._yield_group(held)
            return
        hard, soft = self.settings.time_limits_for(held.queue)
        held.job = Job(
            key=held.message.message_id,
            envelope=envelope,
            queue=held.queue,
            time_limit=task.time_limit if task.time_limit is not None else hard,
            soft_time_limit=task.soft_time_limit if task.soft_time_limit is not None else soft,
            is_async=inspect.iscoroutinefunction(inspect.unwrap(task.fn)),
        )
        self._held.add(held)
        self._pending.append(held)

    def _start_pending(self) -> None:
        self._release_yielded()
        while self._pending and self.executor.free_slots() > 0 and not self._stopping.is_set():
            if self._reached_max_tasks():
                return
            held = self._next_startable()
            if held is None:
                return  # what waits is behind running tasks of its FIFO group
            assert held.job is not None
            decision = middleware.decide(held.job)
            if decision.action is not Action.RUN:
                self._hold_back(held, decision)
                continue
            if held.group is not None:
                self._running_groups.add(held.group)
                # The message before it in its group may await its delete: a crash now would
                # run that one again after this one. FIFO order wins over batching deletes.
                self._settler.flush_acks_of(held.group)
            self._started += 1
            held.start(time.monotonic())
            self.state = WorkerState.BUSY
            if held.deadline is not None:
                # Tell the master the deadline from this thread, before the task starts: a task
                # that holds the GIL silences every other thread, heartbeats included. Brief:
                # this is on the path of every task with a limit.
                self._beat_now(brief=True)
            if self._runs_here:
                with self._pulse.blocked():
                    self.executor.submit(held.job)
            else:
                self.executor.submit(held.job)
            # Inline jobs finish inside submit(): settle each at once, so a crash later in the
            # batch never repeats finished work (the deletes still go out ten at a time).
            self._settle(self.executor.collect(0))

    def _next_startable(self) -> Held | None:
        """The first waiting message whose FIFO group has no task running here, taken out."""
        if not self._running_groups:
            return self._pending.popleft()
        for index, held in enumerate(self._pending):
            if held.group is None or held.group not in self._running_groups:
                del self._pending[index]
                return held
        return None

    def _yield_group(self, held: Held) -> None:
        """``held`` went back to its FIFO queue: what follows it in its group must wait."""
        if held.group is not None:
            self._yielded_groups.append(held.group)

    def _release_yielded(self) -> None:
        """Release the messages in hand of yielded FIFO groups, unstarted, to keep order."""
        groups = set()
        while self._yielded_groups:
            groups.add(self._yielded_groups.popleft())
        if not groups:
            return
        behind = [held for held in self._pending if held.group in groups]
        if behind:
            self._pending = deque(held for held in self._pending if held.group not in groups)
            self._release(behind, reason="an earlier message of its FIFO group went back")

    def _hold_back(self, held: Held, decision: Decision) -> None:
        """A middleware said not now (defer) or never (reject)."""
        self._held.pop(held.key)
        if decision.action is Action.DEFER:
            self._settler.defer(held, decision.delay, decision.reason)
            self._yield_group(held)
        else:
            self._settler.reject(held, EnvelopeError(decision.reason), reason="rejected")

    def _settle(self, outcomes: Sequence[Outcome]) -> None:
        """The one path from outcomes to ack, retry or dead-letter (the keeper's too)."""
        finished = []
        for outcome in outcomes:
            held = self._held.pop(outcome.key)
            if held is not None and held.job is not None:
                outcome = middleware.classify(held.job, outcome)
                middleware.after_outcome(held.job, outcome)
                finished.append((held, outcome))
                if held.group is not None:
                    self._running_groups.discard(held.group)
        for kept in self._settler.settle(finished):
            self._yield_group(kept)

    def _release(self, held: Sequence[Held], reason: str, timeout: int = 0) -> None:
        """Make messages visible again (at once, or after ``timeout`` seconds)."""
        self._held.pop_all(held)
        self._settler.release([item.message for item in held], reason, timeout)

    # -- overruns and status (called from the keeper thread) --------------------------------

    def _exit_after_overrun(self) -> None:
        """Replace this process: the runaway task cannot be stopped inside it."""
        self.overran = True
        self.stop()
        if not self.executor.capabilities.runs_in_loop_thread:
            return  # the loop is free: it drains the other tasks, then the process ends
        # The loop's own thread runs the task: release what waits, delete what is done, leave.
        self._release(list(self._pending), reason="task overran its hard limit")
        self._pending.clear()
        self._settler.flush_acks()
        log.critical("worker_exited_after_overrun", exit_code=int(ExitCode.OVERRUN))
        with contextlib.suppress(OSError, ValueError):  # a full disk must not block the exit
            sys.stderr.flush()
        os._exit(ExitCode.OVERRUN)

    def status(self) -> WorkerStatus:
        """A snapshot of the loop, safe to take from any thread."""
        return WorkerStatus(
            self.state,
            len(self._held),
            self._held.running(),
            self.counters,
            time.monotonic(),
            self._pulse.age(),
        )

    def _beat_now(self, brief: bool = False) -> None:
        """Send a heartbeat now (from the heartbeat thread, or the loop's before a task)."""
        if self.options.heartbeat is not None:
            status = self.status()
            self.options.heartbeat(replace(status, brief=True) if brief else status)
