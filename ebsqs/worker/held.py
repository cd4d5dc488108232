"""The messages a worker holds, and what its heartbeats say about them.

Every time here is ``time.monotonic()``: deadlines and visibility timers must not move when the
wall clock steps (an NTP correction, a VM resumed), or a healthy task is settled as overrun
(+1 h) or its message stops being extended and runs again (-1 h). Only what crosses hosts (a
message's due time) is wall-clock, and that lives in the envelope.

A received message is *held* from the moment it is received until it is acked (deleted) or
released. The loop's thread adds and settles held messages; the keeper's thread reads them to
extend their visibility and to find tasks past their hard limit. :class:`HeldMessages` is the
one place both threads meet, under one lock.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ebsqs.backoff import Backoff
from ebsqs.brokers import ReceivedMessage
from ebsqs.brokers.base import is_fifo
from ebsqs.counters import Counters
from ebsqs.envelope import Envelope
from ebsqs.executors.execution import Job


class WorkerState(enum.StrEnum):
    """What the loop is doing, as heartbeats report it."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEGRADED = "degraded"  # consuming, but its receives keep failing
    DRAINING = "draining"
    STOPPED = "stopped"


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
    at: float  # time.monotonic(), like the running tasks' times
    loop_age: float | None = None  # seconds since the loop progressed; None while it blocks
    brief: bool = False  # only the state and running tasks are news: per-task stats may wait
    #: What last went wrong, as text (``"ValueError: bad address"``): never task arguments.
    last_error: str | None = None


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
    first_received: float = field(default_factory=time.monotonic)
    lost: bool = False  # the broker called its receipt dead: extending it is pointless

    @property
    def fifo(self) -> bool:
        """Whether the message came from a FIFO queue (retries and delays then keep it)."""
        return is_fifo(self.message.queue)

    @property
    def group(self) -> tuple[str, str] | None:
        """The FIFO group the message belongs to (queue and group), or None."""
        if self.message.group_id is None or not self.fifo:
            return None
        return (self.message.queue, self.message.group_id)

    @property
    def key(self) -> str:
        """The message id: unique among what one worker holds."""
        return self.message.message_id

    def start(self, now: float) -> None:
        """Mark it started at ``now``, with its hard deadline."""
        self.started_at = now
        if self.job is not None and self.job.time_limit:
            self.deadline = now + self.job.time_limit


class HeldMessages:
    """Every held message by key, safe to use from the loop's and the keeper's threads."""

    def __init__(self) -> None:
        self._items: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, held: Held) -> None:
        """Hold a message."""
        with self._lock:
            self._items[held.key] = held

    def pop(self, key: str) -> Held | None:
        """Stop holding the message ``key``; None if it was not held (settled already)."""
        with self._lock:
            return self._items.pop(key, None)

    def pop_all(self, held: Iterable[Held]) -> None:
        """Stop holding each of ``held``."""
        with self._lock:
            for item in held:
                self._items.pop(item.key, None)

    def all(self) -> list[Held]:
        """A copy of every held message."""
        with self._lock:
            return list(self._items.values())

    def overrun(self, now: float) -> list[Held]:
        """Started messages whose task is past its hard deadline."""
        with self._lock:
            return [
                h
                for h in self._items.values()
                if h.deadline is not None and h.started_at is not None and now > h.deadline
            ]

    def expiring(self, now: float, margin: float) -> list[Held]:
        """Messages whose visibility ends within ``margin`` seconds."""
        with self._lock:
            return [
                h for h in self._items.values() if not h.lost and h.visible_until - now < margin
            ]

    def soonest_deadline(self) -> float | None:
        """The earliest hard deadline of a running task, if any."""
        with self._lock:
            return min((h.deadline for h in self._items.values() if h.deadline), default=None)

    def running(self) -> tuple[RunningTask, ...]:
        """The started tasks, for heartbeats."""
        with self._lock:
            return tuple(
                RunningTask(
                    h.job.envelope.task, h.job.envelope.id, h.queue, h.started_at, h.deadline
                )
                for h in self._items.values()
                if h.job is not None and h.started_at is not None
            )
