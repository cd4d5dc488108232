"""The receive-execute-ack loop of one process.

Per iteration (:meth:`Worker.loop_once`): take the messages that receives brought, ask for more
while there is room (what the executor can run plus one batch, less what is held or asked for),
decode and check each message, ask the middleware whether each may start, start what is due,
collect outcomes, then ack, retry or dead-letter (:mod:`.settle`).

Nothing in the loop waits on a round trip it can avoid: receives are made on threads of their own
(:mod:`.receiver`), so the next batch is on its way while this one runs, and deletes go out from
the settler's sender threads (:mod:`.sender`). A keeper thread beside the loop (:mod:`.keeper`)
extends the visibility of every held message (:mod:`.held`) before it expires, so a long task
does not lose its message, and a heartbeat thread (:mod:`.pulse`) tells the master the loop is
alive.

Guarantees: at-least-once. A message is deleted only after its task succeeded, its retry was
sent, or its dead-letter copy was sent. Messages fetched but not started are released
(visibility 0) when the worker stops.
"""

from __future__ import annotations

import contextlib
import inspect
import ipaddress
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, replace
from itertools import cycle
from urllib.parse import urlsplit

from ebsqs import middleware
from ebsqs.backoff import Backoff
from ebsqs.brokers import MAX_BATCH, MAX_VISIBILITY_SECONDS, Broker
from ebsqs.brokers.base import is_fifo
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
from ebsqs.worker.idle import PollToken
from ebsqs.worker.keeper import Keeper
from ebsqs.worker.pulse import Heartbeat, Pulse
from ebsqs.worker.receiver import Receipt, Receiver, Request
from ebsqs.worker.settle import DEFAULT_ACK_WAIT, Settler

log = get_logger(__name__)

#: Pauses after failed receives: 0.5 s doubling to 30 s, jittered so that a fleet does not
#: come back in step after an outage.
RECEIVE_BACKOFF = Backoff(0.5, 30.0)
#: Receives failed in a row after which the worker reports itself degraded.
DEGRADED_AFTER = 3
#: Seconds an offloaded message waits before another try when S3 could not be read.
PAYLOAD_RETRY_SECONDS = 10
#: Where the broker is, from the fastest of the last :data:`RTT_WINDOW` receives that brought
#: messages: near once it is under ``NEAR_RTT`` seconds, far again only once it is at least
#: ``FAR_RTT`` (between the two the verdict stands, so a window of slow answers on a busy host
#: does not flip it; the first verdict is taken halfway). Far, receives and deletes overlap the
#: loop's work on threads of their own. Near (a broker on the same host), the loop makes them
#: itself, one at a time: overlapping buys nothing there, costs a request per few messages, and
#: the hand-offs between threads cost more CPU than the calls (with two threads taking turns
#: with the GIL on two cores, each boto3 call cost half as much again: 1.7x the plain loop's CPU
#: per task, against 1.05x with every call in the loop's thread). SQS answers in tens of
#: milliseconds. A broker at a loopback address (or embedded) is on this host, where the CPU its
#: server shares with the worker slows its answers: its lines are twice as far
#: (:data:`LOCAL_RTT_FACTOR`). Measured there: fauxqs with four children on two cores answered
#: receives in 1.5 ms at the fastest (p10 2.6 ms, median 5.3, p90 9.4, the average past 8 ms at
#: times), and one worker through the bench's proxy seldom under 4 ms.
NEAR_RTT = 0.004
FAR_RTT = 0.008
LOCAL_RTT_FACTOR = 2
#: Receives the fastest is taken over. The fastest, not the average: on a busy host a near
#: broker's answers queue behind the CPU, but some still come back at once; a far broker's
#: never come faster than the network's round trip and the broker's own work.
RTT_WINDOW = 20
#: The fewest messages a receive asks for while the worker holds messages or a receive is under
#: way. Asking for what just became free (one or two messages at a time) cost twice the plain
#: loop's CPU per task at 15 ms; half a batch costs 1.4 times, at the same throughput.
MIN_RECEIVE = MAX_BATCH // 2
#: The longest poll of a worker that holds messages (its drain waits for the poll to end).
BUSY_POLL_SECONDS = 2.0
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


def _on_this_host(broker: Broker) -> bool:
    """Whether the broker answers from this host: an embedded one (memory, SQLite), or SQS at a
    loopback address (a local server, or a proxy in front of one)."""
    url = getattr(broker, "endpoint_url", None)
    if url is None:
        return True  # no endpoint: in this process, or on this disk
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _nothing() -> None:
    """The wake of an executor that has none."""


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
        poll_token: shared with the sibling processes of a host: while idle, only the holder
            long-polls a queue (see :mod:`.idle`); None polls freely.
        suspects: ids of tasks that hung a process of this host (see :mod:`.suspects`): they
            run last and alone.
    """

    queues: tuple[str, ...]
    wait_seconds: float = 20
    visibility_timeout: int = 30
    max_tasks: int | None = None
    heartbeat: Callable[[WorkerStatus], None] | None = None
    ack_wait: float = DEFAULT_ACK_WAIT
    poll_token: PollToken | None = None
    suspects: Container[str] = ()


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
        # Suspects (see _suspect): how many wait in _pending, and the one running alone.
        self._suspects = 0
        self._alone: str | None = None
        self._yielded_groups: deque[tuple[str, str]] = deque()
        self._stopping = threading.Event()
        self._receive_failures = 0  # in a row
        self._receive_after = 0.0  # monotonic: no receive before (a backoff after failures)
        self._started = 0
        self._backlog = False  # the last receive brought messages: more may be waiting
        # The broker is near (True), far (False) or not yet measured (None): see NEAR_RTT.
        self._near: bool | None = None
        self._rtt_lines = (NEAR_RTT, FAR_RTT)  # for a broker elsewhere; see start()
        self._round_trips: deque[float] = deque(maxlen=RTT_WINDOW)
        # FIFO order is counted by receives: two in flight could hand a group's next message to
        # one while its head goes back through the other, using up a receive without a run.
        self._one_receive = any(is_fifo(settings.physical_queue(queue)) for queue in options.queues)
        #: A task overran a hard limit the executor could not enforce: exit with
        #: ``ExitCode.OVERRUN``.
        self.overran = False
        self._queues = cycle(options.queues)
        # Looked up per message otherwise: the settings' limits per queue, and per task function
        # whether it is a coroutine function (inspect.unwrap walks its wrappers).
        self._time_limits: dict[str, tuple[float | None, float | None]] = {}
        self._async_functions: dict[Callable[..., object], bool] = {}
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
        self._receiver = Receiver(
            broker,
            self._held,
            options.visibility_timeout,
            # Executors from before wake() existed still work: a receipt then waits for their
            # collect() to time out (at most a second).
            wake=getattr(executor, "wake", _nothing),
            token=options.poll_token,
            stop=self._stopping,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare queues, the executor and the keeper (in the process that will run the loop)."""
        for queue in self.options.queues:
            self._check_queue(queue)
        self.executor.start()
        self._settler.log_successes = log.is_enabled_for(logging.INFO)
        if _on_this_host(self.broker):
            self._rtt_lines = (NEAR_RTT * LOCAL_RTT_FACTOR, FAR_RTT * LOCAL_RTT_FACTOR)
        self._keeper.start()
        self._receiver.start()
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
        self._take_pending()
        self._receiver.close()
        self._release(self._held.all(), reason="fast stop")
        self._settler.finish_acks(timeout=5)
        self._keeper.stop()
        self._heartbeat.stop()
        self.state = WorkerState.STOPPED
        log.warning("worker_abandoned", **self.counters.totals())

    def flush(self, timeout: float | None = None) -> bool:
        """Send the deletes that wait to fill a batch and wait until every delete is done;
        False if ``timeout`` passed first. (Between steps of a loop driven by hand.)"""
        self._settler.flush_acks()
        return self._settler.wait_acks(timeout)

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self._stopping.is_set()

    def drain(self, deadline: float | None = None) -> None:
        """Release unstarted messages, finish running ones until ``deadline``, settle all."""
        self.state = WorkerState.DRAINING
        self._pulse.block()  # bounded by ``deadline``, and by the supervisor's graceful timeout
        self._release(self._take_pending(), reason="draining")
        if deadline is None:
            deadline = time.monotonic() + 3600
        self._settle(self.executor.shutdown(deadline))
        # Receives under way come back (within their poll), and what they bring goes back.
        for receipt in self._receiver.finish(deadline):
            self._release(receipt.held, reason="draining")
        self._receiver.close()
        self._release(self._held.all(), reason="stopped before finishing", timeout=1)
        self._settler.finish_acks()
        self._keeper.stop()
        self._heartbeat.stop()
        self.state = WorkerState.STOPPED
        log.info("worker_stopped", **self.counters.totals())

    # -- the loop --------------------------------------------------------------------------

    def loop_once(self) -> None:
        """One iteration: take what receives brought and ask for more, start what is due,
        wait for something to happen, settle what finished."""
        self._pulse.beat()
        self._take_receipts()
        self._request_messages()
        self._start_pending()
        outcomes = self._wait_for_work()
        outcomes += self.executor.stop_overdue(time.monotonic())
        self._settle(outcomes)
        self._take_receipts()
        self._start_pending()
        if self._receive_failures >= DEGRADED_AFTER:
            self.state = WorkerState.DEGRADED
        else:
            self.state = WorkerState.BUSY if self._held else WorkerState.IDLE
        if self._reached_max_tasks() and not self.executor.running():
            log.info("worker_recycled", tasks=self._started)
            self.stop()

    def _wait_for_work(self) -> list[Outcome]:
        """Wait until an outcome or a receipt comes, unless work is at hand; the outcomes.

        Running tasks are waited for in the executor's ``collect``, which a receipt cuts short
        (the receiver calls the executor's ``wake``). Otherwise the loop waits for a receipt,
        or out a backoff after failed receives.
        """
        wait = self._idle_wait()
        if self.executor.running():
            return self.executor.collect(wait)
        if wait > 0:
            self._settler.flush_acks()  # nothing to run: what finished need not wait for nine
            with self._pulse.blocked():
                if self._receiver.in_flight:
                    self._take_receipts(wait)
                else:
                    self._stopping.wait(wait)
        return self.executor.collect(0)

    def _idle_wait(self) -> float:
        """How long the loop may wait: not at all while work could start at once."""
        if self._receiver.ready() or (self._startable() and self.executor.free_slots() > 0):
            return 0.0
        if self._receives_here() and self._wants_messages():
            return 0.0  # the loop's own receive is the next thing to do
        wait = min(1.0, self.options.wait_seconds) or 1.0
        if not self._receiver.in_flight and not self.executor.running():
            # Only a backoff, a drain or recycling keeps receives from being asked for.
            wait = min(wait, max(self._receive_after - time.monotonic(), 0.0)) or wait
        return wait

    def _receives_here(self) -> bool:
        """Whether the loop makes the next receive itself: a near broker with a backlog."""
        return self._backlog and self._near is True

    def _startable(self) -> bool:
        """Whether a waiting message could start now (see :meth:`_startable_index`)."""
        if not self._running_groups and self._alone is None and not self._suspects:
            return bool(self._pending)
        return self._startable_index() is not None

    def _may_hang(self, held: Held) -> bool:
        """A message that came back (received before) whose task has no hard limit this
        executor can enforce: should it hold the GIL, nothing else in this process runs, the
        keeper included, until the master kills the process at its heartbeat timeout."""
        job = held.job
        return (
            held.message.receive_count > 1
            and held.group is None
            and job is not None
            and job.time_limit is None
            and not self.executor.capabilities.stops_overdue(job)
        )

    def _suspect(self, held: Held) -> bool:
        """One that did hang a process of this host (:mod:`.suspects`): what waited behind it
        lapsed unrun, and would again, time after time, into the dead-letter queue. So it runs
        last, and alone (FIFO messages keep their group's order instead)."""
        return (
            self._may_hang(held)
            and held.envelope is not None
            and held.envelope.id in self.options.suspects
        )

    def _wants_messages(self) -> bool:
        """Whether to ask for another receive now."""
        if self._stopping.is_set() or self._reached_max_tasks():
            return False
        if self._suspects or self._alone is not None:
            return False  # nothing more may wait behind a task that is to run alone
        if not self._receiver.can_request() or time.monotonic() < self._receive_after:
            return False
        if self._receiver.in_flight and (
            not self._backlog or self._near is not False or self._one_receive
        ):
            return False  # an empty queue needs one poll, not two; a near broker, one at a time
        room = self._room()
        if self._near is not False and self._held and room < MAX_BATCH:
            return False  # a near broker: ask for a whole batch once enough of what is held ran
        if (self._held or self._receiver.in_flight) and room < MIN_RECEIVE:
            return False  # a receive for a message or two costs a whole request's CPU
        return room > 0

    def _room(self) -> int:
        """Messages the loop may still ask for: what can run at once plus one batch, less what
        is held and what receives under way may bring."""
        held = len(self._held) + self._receiver.reserved
        return self.executor.concurrency + MAX_BATCH - held

    def _reached_max_tasks(self) -> bool:
        """True once as many tasks were started as this process may run (recycling)."""
        limit = self.options.max_tasks
        return limit is not None and self._started >= limit

    def _request_messages(self) -> None:
        """Ask for receives while there is room and a receiver is free.

        A full long poll only when nothing is held or asked for; a worker that holds messages
        polls for at most :data:`BUSY_POLL_SECONDS`, so a drain never waits out a 20-second
        poll behind a running task, and a second request (only after a receive brought
        messages) does not wait at all. While a near broker (a round trip under
        :data:`NEAR_RTT`) has a backlog, the loop receives itself, without waiting: the
        first empty answer sends the next poll back to a receiver thread.
        """
        while self._wants_messages():
            queue = next(self._queues)
            wait = self.options.wait_seconds / len(self.options.queues)
            if self._receiver.in_flight:
                wait = 0
            elif self._held:
                wait = min(wait, BUSY_POLL_SECONDS)
            request = Request(
                queue,
                self.settings.physical_queue(queue),
                min(self._room(), MAX_BATCH),
                max(min(wait, 20), 0),
            )
            if self._receives_here():
                # The loop waits on the network now: what finished need not wait for nine
                # more, as before any wait (and as a plain loop deletes each batch it ran).
                self._settler.flush_acks()
                with self._pulse.blocked():  # bounded by the client's read timeout
                    self._received(self._receiver.receive_here(request))
            else:
                self._receiver.request(request)

    def _take_receipts(self, timeout: float = 0.0) -> None:
        """Accept what the receives that came back brought (waiting up to ``timeout`` s)."""
        for receipt in self._receiver.take(timeout):
            self._received(receipt)

    def _received(self, receipt: Receipt) -> None:
        queue = receipt.request.queue
        if receipt.error is not None:
            self._receive_failed(queue, receipt.error)
            return
        if not receipt.polled:
            return  # a sibling process holds the queue's poll token: nothing was asked
        self._receive_failures = 0
        self.counters.receives += 1
        self.counters.received += len(receipt.messages)
        self._backlog = bool(receipt.messages)
        if receipt.messages:
            self._round_trips.append(receipt.took)
            fastest = min(self._round_trips)
            near, far = self._rtt_lines
            if self._near is None:
                self._near = fastest < (near + far) / 2
            elif fastest < near:
                self._near = True
            elif fastest >= far:
                self._near = False
            self._settler.deletes_here = self._near is True
        if not receipt.messages:
            self.counters.empty_receives += 1
        if self._stopping.is_set():
            self._release(receipt.held, reason="draining")
            return
        # A group yielded since the last start must let go of what it had in hand before this
        # receipt's messages join them: one of them may be the group's head, back again.
        self._release_yielded()
        for held in receipt.held:
            self._accept(held)

    def _receive_failed(self, queue: str, exc: BrokerError) -> None:
        """Count the failure, then back off, capped and jittered (a stop ends the wait)."""
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
        self._settler.last_error = f"receive from {queue}: {text}"
        self._receive_after = time.monotonic() + delay

    def _accept(self, held: Held) -> None:
        """Decode and check one received message (held since it came); keep it if it can run,
        else dead-letter or hop it."""
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
            self._held.pop(held.key)
            self._settler.reject(held, exc)
            return
        except PayloadUnavailable as exc:
            # S3, not the message, failed: try again later, never dead-letter for this.
            log.error("payload_unavailable", message_id=held.key, error=str(exc))
            self._held.pop(held.key)
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
            self._held.pop(held.key)
            self._settler.hop(held, envelope)
            self._yield_group(held)
            return
        hard, soft = self._limits_of(held.queue)
        held.job = Job(
            key=held.message.message_id,
            envelope=envelope,
            queue=held.queue,
            time_limit=task.time_limit if task.time_limit is not None else hard,
            soft_time_limit=task.soft_time_limit if task.soft_time_limit is not None else soft,
            is_async=self._is_async(task.fn),
        )
        if self._suspect(held):
            self._suspects += 1
        self._pending.append(held)

    def _limits_of(self, queue: str) -> tuple[float | None, float | None]:
        """The queue's default (hard, soft) time limits, parsed from the settings once."""
        limits = self._time_limits.get(queue)
        if limits is None:
            limits = self._time_limits[queue] = self.settings.time_limits_for(queue)
        return limits

    def _is_async(self, fn: Callable[..., object]) -> bool:
        """Whether a task's function is a coroutine function, looked up once per function."""
        known = self._async_functions.get(fn)
        if known is None:
            known = self._async_functions[fn] = inspect.iscoroutinefunction(inspect.unwrap(fn))
        return known

    def _start_pending(self) -> None:
        while self._pending and self.executor.free_slots() > 0 and not self._stopping.is_set():
            if self._reached_max_tasks():
                return
            # Each pass may yield a group (a deferred head, a retry collected after a start):
            # what follows it in hand goes back before anything else of the group can start.
            self._release_yielded()
            if not self._pending:
                return
            held = self._next_startable()
            if held is None:
                return  # what waits is behind running tasks of its FIFO group
            assert held.job is not None
            decision = middleware.decide(held.job)
            if decision.action is not Action.RUN:
                self._hold_back(held, decision)
                continue
            self._start(held)
            # Inline jobs finish inside submit(): settle each at once, so a crash later in the
            # batch never repeats finished work (the deletes still go out ten at a time).
            self._settle(self.executor.collect(0))

    def _start(self, held: Held) -> None:
        """Hand one message's job to the executor (an inline one runs it before returning)."""
        assert held.job is not None
        if held.group is not None:
            self._running_groups.add(held.group)
            # The message before it in its group may await its delete: a crash now would run
            # that one again after this one. FIFO order wins over batching deletes.
            self._settler.flush_acks_of(held.group)
        self._started += 1
        held.start(time.monotonic())
        self.state = WorkerState.BUSY
        may_hang = self._may_hang(held)
        if may_hang:
            # Should it hang this process, what finished before it must not run again.
            self._settler.flush_acks()
            self._settler.wait_acks()
        if held.deadline is not None or may_hang:
            # Tell the master the deadline from this thread, before the task starts: a task
            # that holds the GIL silences every other thread, heartbeats included. Brief: this
            # is on the path of every task with a limit. A task that came back and has no limit
            # is named, so that the master can list it if it hangs this process.
            self._beat_now(brief=True)
        if self._runs_here:
            self._pulse.enter()  # this is the loop's thread: no context manager per task
            try:
                self.executor.submit(held.job)
            finally:
                self._pulse.leave()
        else:
            self.executor.submit(held.job)

    def _next_startable(self) -> Held | None:
        """The next message to start, taken out (see :meth:`_startable_index`)."""
        if not self._running_groups and self._alone is None and not self._suspects:
            return self._pending.popleft()
        index = self._startable_index()
        if index is None:
            return None
        held = self._pending[index]
        del self._pending[index]
        if self._suspect(held):
            self._suspects -= 1
            self._alone = held.key
            behind = self._take_pending()
            if behind:
                self._release(behind, reason="waiting behind a task that runs alone")
        return held

    def _take_pending(self) -> list[Held]:
        """Every waiting message, taken out."""
        taken = list(self._pending)
        self._pending.clear()
        self._suspects = 0
        return taken

    def _startable_index(self) -> int | None:
        """Where the next message to start waits: the first whose FIFO group has no task
        running here and that is not a suspect (:meth:`_suspect`); a suspect only once
        nothing else waits or runs; nothing while a suspect runs."""
        if self._alone is not None:
            return None
        suspect = None
        for index, held in enumerate(self._pending):
            if held.group is not None and held.group in self._running_groups:
                continue
            if self._suspects and self._suspect(held):
                suspect = index if suspect is None else suspect
                continue
            return index
        if suspect is None or self.executor.running():
            return None
        return suspect

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
        """A middleware said not now (defer), never (reject) or already done (skip)."""
        self._held.pop(held.key)
        if decision.action is Action.DEFER:
            self._settler.defer(held, decision.delay, decision.reason)
            self._yield_group(held)
        elif decision.action is Action.SKIP:
            self._settler.skip(held, decision.reason)
        else:
            self._settler.reject(held, EnvelopeError(decision.reason), reason="rejected")

    def _settle(self, outcomes: Sequence[Outcome]) -> None:
        """The one path from outcomes to ack, retry or dead-letter (the keeper's too)."""
        finished = []
        for outcome in outcomes:
            held = self._held.pop(outcome.key)
            if outcome.key == self._alone:
                self._alone = None  # what it kept waiting may be fetched and started again
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
        self._release(self._take_pending(), reason="task overran its hard limit")
        self._settler.finish_acks(timeout=5)
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
            last_error=self._settler.last_error,
        )

    def _beat_now(self, brief: bool = False) -> None:
        """Send a heartbeat now (from the heartbeat thread, or the loop's before a task)."""
        if self.options.heartbeat is not None:
            status = self.status()
            self.options.heartbeat(replace(status, brief=True) if brief else status)
