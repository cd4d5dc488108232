"""Queue depth for metrics and ``ebsqs status``: sampled by a daemon thread of the master.

The master's loop never talks to the broker; this thread does, at most once per
:data:`INTERVAL`: one ``GetQueueAttributes`` per configured queue and one per its dead-letter
queue, so ``2 * N`` requests per interval for ``N`` queues (``8 * N`` a minute at 15 s), plus
one ``GetQueueUrl`` per queue the first time.

An idle queue is read only every :data:`IDLE_INTERVAL`: one whose last sample was empty (nothing
visible, in flight or delayed) and whose children received nothing since (:meth:`note_received`,
from the master's totals). Nothing can change its depth unseen then: a message sent to it is
received by the children's poll (which is activity), and its dead-letter queue grows only when
a receive moves a message there. So a host with idle queues costs their long polls (3 requests
a minute per queue, see :mod:`ebsqs.worker.idle`) and ``2 / 10`` of a request a minute each. A
queue worked by other hosts only is read late (up to :data:`IDLE_INTERVAL` behind). A
sample that blocks (a broker that hangs) delays only the next sample, never a heartbeat, a
signal or a kill.

Which side of the fork: the thread and its broker live in the master only, and children never
use them (each builds its own broker after its fork; the SQS broker's boto3 clients are per pid
too). A thread of the parent does not exist in a child, but a lock it held at the fork stays
held there for good: Python's per-module import locks among them, which boto3 takes while it
builds a client (seen: a child forked meanwhile waited on one forever). So the master builds the
sampler's broker and clients in its main thread, before the first fork (:meth:`prepare`: local
work, no request to the queue; boto3 may look its credentials up once), and starts the thread
only once the pool is ready. Should :meth:`prepare` fail, the thread builds them itself under a
fork guard (:func:`os.register_at_fork`): a fork waits for that local work, never for a sample.
Between samples the thread waits on an :class:`threading.Event`.

A failed sample keeps the last depths (with the time of the last good one, so a reader sees how
stale they are) and is logged once per change of state: ``queue_depth_failed`` when sampling
starts failing, ``queue_depth_recovered`` when it works again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from ebsqs.brokers import from_url, prepared
from ebsqs.brokers.base import Broker
from ebsqs.config import Settings
from ebsqs.errors import QueueDoesNotExist
from ebsqs.log import get_logger

log = get_logger(__name__)

#: Seconds between samples (the master reads depth at most this often).
INTERVAL = 15.0
#: Seconds between samples of a queue that is idle (see above).
IDLE_INTERVAL = 600.0


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """One queue's depth at its last good sample, as the broker reports it (approximate).

    Attributes:
        queue: the logical queue.
        visible: messages waiting to be received.
        in_flight: messages received and not yet deleted.
        delayed: messages not yet visible (delayed sends, retries waiting their backoff).
        dead_letters: messages in its dead-letter queue (visible ones), or None if it has none.
        sampled_at: wall-clock time of that sample (``time.time()``); 0 if none succeeded yet.
        stale: the latest attempt failed, so these are older than one interval.
    """

    queue: str
    visible: int = 0
    in_flight: int = 0
    delayed: int = 0
    dead_letters: int | None = None
    sampled_at: float = 0.0
    stale: bool = False


class DepthSampler:
    """Reads each configured queue's depth from a daemon thread of the master.

    Args:
        settings: the broker URL and queue naming (prefix, dead-letter suffix).
        queues: the logical queues to sample.
        interval: seconds between samples.
        broker_factory: builds the broker, in the sampler's thread (default: ``from_url``).
    """

    def __init__(
        self,
        settings: Settings,
        queues: Sequence[str],
        interval: float = INTERVAL,
        broker_factory: Callable[[str], Broker] = from_url,
        idle_interval: float = IDLE_INTERVAL,
    ) -> None:
        self.settings = settings
        self.queues = tuple(queues)
        self.interval = interval
        self.idle_interval = idle_interval
        # Per queue: messages its children received in all (from the master), and that count
        # at the queue's last good sample.
        self._received: dict[str, int] = {}
        self._received_at_sample: dict[str, int] = {}
        self._factory = broker_factory
        self._broker: Broker | None = None
        self._depths: dict[str, QueueDepth] = {q: QueueDepth(q) for q in self.queues}
        self._failing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fork_guard = threading.Lock()

    def depths(self) -> Mapping[str, QueueDepth]:
        """The latest depth of every configured queue (zeros before the first good sample)."""
        with self._lock:
            return dict(self._depths)

    def note_received(self, received: Mapping[str, int]) -> None:
        """Messages each queue's children received so far (the master's lifetime totals): a
        queue whose count moved is sampled again at the next interval, idle or not."""
        with self._lock:
            self._received.update(received)

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._thread is not None

    def prepare(self) -> None:
        """Build the broker and its clients now, in the calling thread (the master's, before
        the first fork); a failure is logged and left to the sampler's thread to retry."""
        try:
            self._broker = self._build()
        except Exception as exc:  # noqa: BLE001 - the thread retries, and logs its failures
            log.warning("queue_depth_failed", error_type=type(exc).__name__, error=str(exc))

    def start(self) -> None:
        """Start the thread (in the master, once its first children are forked); it samples at
        once, then every interval."""
        os.register_at_fork(
            before=self._fork_guard.acquire,
            after_in_parent=self._fork_guard.release,
            after_in_child=self._forget_in_child,
        )
        self._thread = threading.Thread(target=self._run, name="ebsqs-depth", daemon=True)
        self._thread.start()

    def _forget_in_child(self) -> None:
        """After a fork, in the child: a fresh guard (the copied one is held by the fork)."""
        self._fork_guard = threading.Lock()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread; a sample that hangs on the broker is left to die with the process
        (the thread is a daemon), so the master's exit never waits on the broker for long."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive() and self._broker is not None:
                self._broker.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.interval)

    def sample_once(self) -> None:
        """Read every queue's depth; keep the last ones on failure (in the sampler's thread)."""
        try:
            if self._broker is None:
                self._broker = self._build()
            due = [queue for queue in self.queues if not self._idle(queue)]
            with self._lock:
                received = {queue: self._received.get(queue, 0) for queue in due}
            fresh = {queue: self._read(self._broker, queue) for queue in due}
        except Exception as exc:  # noqa: BLE001 - any broker failure: keep the last depths
            self._failed(exc)
            return
        with self._lock:
            self._depths = {**self._depths, **fresh}
            self._received_at_sample.update(received)
        if self._failing:
            self._failing = False
            log.info("queue_depth_recovered", queues=len(self.queues))

    def _idle(self, queue: str) -> bool:
        """Whether ``queue`` can skip this sample: empty when last read (less than
        :attr:`idle_interval` ago), and nothing received since."""
        with self._lock:
            depth = self._depths[queue]
            moved = self._received.get(queue, 0) != self._received_at_sample.get(queue, -1)
        empty = not (depth.visible or depth.in_flight or depth.delayed)
        recent = time.time() - depth.sampled_at < self.idle_interval
        return empty and recent and not moved and not depth.stale

    def _build(self) -> Broker:
        """The sampler's broker, with its clients made now (no queue request) under the fork
        guard, so no child is forked while boto3 holds its import locks in this thread."""
        with self._fork_guard:
            return prepared(self.settings.broker_url, self._factory)

    def _read(self, broker: Broker, queue: str) -> QueueDepth:
        stats = broker.stats(self.settings.physical_queue(queue))
        try:
            dead: int | None = broker.stats(self.settings.dead_letter_queue(queue)).visible
        except QueueDoesNotExist:
            dead = None
        return QueueDepth(
            queue, stats.visible, stats.in_flight, stats.delayed, dead, sampled_at=time.time()
        )

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            self._depths = {q: replace(d, stale=True) for q, d in self._depths.items()}
        if not self._failing:
            self._failing = True
            log.warning("queue_depth_failed", error_type=type(exc).__name__, error=str(exc))
