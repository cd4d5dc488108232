"""The master's view of its children, as frozen snapshots: the read model for ``ebsqs status``,
health checks, sd_notify and metrics. Nothing here runs on its own; :meth:`Master.snapshot`
builds these from the master's live table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ebsqs.counters import Counters


class Phase(enum.StrEnum):
    """Where a child is in its life, as the master sees it."""

    BOOTING = "booting"  # forked, not yet consuming
    RUNNING = "running"  # consuming (idle or busy)
    RETIRING = "retiring"  # draining: asked by the master, or stopping on its own
    KILLING = "killing"  # hung or overdue: SIGABRT sent, SIGKILL follows


class KillReason(enum.StrEnum):
    """Why the master killed a child (the ``reason`` label of ``ebsqs_child_kills_total``)."""

    HUNG = "hung"  # no heartbeat for the heartbeat timeout
    OVERDUE = "overdue"  # running a task past its hard limit (plus the grace)
    STALLED = "stalled"  # heartbeats arrive, but its loop made no progress for the timeout
    STOP_TIMEOUT = "stop_timeout"  # still alive when its drain or fast stop ran out of time


class MasterState(enum.StrEnum):
    """What the master is doing."""

    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"  # graceful drain
    HALTING = "halting"  # fast stop, or a child could not boot


@dataclass(frozen=True, slots=True)
class CurrentTask:
    """The task a child reported running (the one nearest its hard limit, else the oldest).

    Attributes:
        name: the task's registered name.
        task_id: its id.
        running_for: seconds since it started, if it still runs: the last heartbeat named it,
            and it may have ended since (the next beat would not name it).
        deadline_in: seconds until its hard time limit (negative once past), or None.
    """

    name: str
    task_id: str
    running_for: float | None
    deadline_in: float | None


@dataclass(frozen=True, slots=True)
class ChildSnapshot:
    """One child.

    Attributes:
        queue: the logical queue it consumes.
        slot: its number within the queue, from 1 (as in ``worker[a] #3``).
        pid: its process id.
        phase: see :class:`Phase`.
        state: what its last heartbeat said (``starting``, ``idle``, ``busy``, ``draining``...).
        generation: 0 for children of the first import, +1 per reload (HUP).
        uptime: seconds since it was forked.
        heartbeat_age: seconds since its last heartbeat (since the fork if none came yet).
        in_flight: messages it holds (running or fetched).
        task: what it is running, if anything.
        counts: what it counted so far (its last heartbeats').
        rss: resident memory in bytes, from its last heartbeat.
        restarts: unplanned replacements of its slot so far (crashes, hangs).
        running: tasks it is running (of ``in_flight``), from its last heartbeat.
        last_error: what last went wrong in it (``"failed: app.send_mail"``,
            ``"receive_errors"``), read from its counters; None if nothing did.
        last_error_age: seconds since the heartbeat that showed ``last_error``.
    """

    queue: str
    slot: int
    pid: int
    phase: Phase
    state: str
    generation: int
    uptime: float
    heartbeat_age: float
    in_flight: int
    task: CurrentTask | None
    counts: Counters
    rss: int
    restarts: int
    running: int = 0
    last_error: str | None = None
    last_error_age: float | None = None


@dataclass(frozen=True, slots=True)
class SupervisorSnapshot:
    """The whole supervisor at one moment.

    Attributes:
        pid: the master's pid.
        state: see :class:`MasterState`.
        uptime: seconds since the master started.
        targets: the wanted number of children per queue.
        children: every child the master tracks, retiring ones included.
        queue_counts: per queue, what its children counted over the master's lifetime (exited
            children plus live ones): the one total that status, metrics and systemd read.
        restarts: unplanned replacements (crashes, hangs) over the master's lifetime.
        recycled: planned replacements (max tasks, max memory, reloads).
        queue_restarts: ``restarts`` per queue.
        kills: children killed, per queue and :class:`KillReason`.
    """

    pid: int
    state: MasterState
    uptime: float
    targets: Mapping[str, int]
    children: tuple[ChildSnapshot, ...]
    queue_counts: Mapping[str, Counters]
    restarts: int
    recycled: int
    queue_restarts: Mapping[str, int] = field(default_factory=dict)
    kills: Mapping[tuple[str, KillReason], int] = field(default_factory=dict)

    @property
    def counts(self) -> Counters:
        """Everything counted over the master's lifetime, all queues together."""
        return sum(self.queue_counts.values(), Counters())

    def running(self, queue: str) -> int:
        """Children of ``queue`` that are consuming now."""
        return sum(1 for c in self.children if c.queue == queue and c.phase is Phase.RUNNING)
