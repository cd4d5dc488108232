"""The master's table of slots and children, and every decision it makes about them.

Nothing here touches a process: the table is told facts (a child was spawned, beat, exited) with
the time, and answers questions (which slots to fill, which children are hung, which to roll on a
reload). :class:`~ebsqs.supervisor.master.Master` turns the answers into forks and signals. Times
are the master's monotonic clock, passed in, so tests drive the decisions with a fake one.

A *slot* is a place for one consuming child: queue ``a`` with 3 workers has slots ``a#1..a#3``.
A slot's child is *attached*; a child that is retiring (draining) or was replaced is detached
but stays in the table until it is reaped, so its counters and its deadline are not lost.
"""

from __future__ import annotations

import contextlib
import enum
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from ebsqs.counters import Counters
from ebsqs.errors import ExitCode
from ebsqs.supervisor.config import SupervisorConfig
from ebsqs.supervisor.heartbeat import Beat, HeartbeatError
from ebsqs.supervisor.process import ExitStatus
from ebsqs.supervisor.snapshot import (
    ChildSnapshot,
    KillReason,
    MasterState,
    Phase,
    SupervisorSnapshot,
)

#: Worker states (from heartbeats) in which a child is consuming.
CONSUMING = frozenset({"idle", "busy", "degraded"})


class Verdict(enum.StrEnum):
    """What a child's exit means for its slot."""

    EXPECTED = "expected"  # it was retiring or replaced: nothing to do
    RECYCLED = "recycled"  # it finished on its own (max tasks): refill the slot at once
    CRASHED = "crashed"  # unexpected: refill, backing off if the slot keeps crashing
    BOOT_FAILED = "boot_failed"  # it could not start: the master stops


@dataclass(eq=False)
class Slot:
    """A place for one consuming child of a queue.

    Attributes:
        queue: the logical queue.
        index: 1-based number within the queue.
        child: the attached child, if any.
        failures: crashes in a row (reset once a child stays up ``stable_after`` seconds).
        not_before: no child is spawned here before this time (crash backoff).
        restarts: unplanned replacements so far.
        restart_reason: why the next child replaces the last one, for the spawn log line.
        boot_crashes: children in a row that crashed before they ever consumed.
    """

    queue: str
    index: int
    child: ChildRecord | None = None
    failures: int = 0
    not_before: float = 0.0
    restarts: int = 0
    restart_reason: str | None = None
    boot_crashes: int = 0


@dataclass(eq=False)
class ChildRecord:
    """What the master knows about one child process.

    Attributes:
        slot: the slot it was spawned for (it may since have been detached from it).
        pid: its process id.
        generation: the reload generation whose code it runs.
        started: when it was forked.
        max_tasks: its jittered task limit, or None.
        phase: see :class:`Phase`.
        last_beat: when its last heartbeat arrived (its fork time until the first).
        beat: its last heartbeat, if any.
        counts: what it counted, merged from its heartbeats (each may carry only some tasks).
        deadline_at: when its current task's hard limit passes, if it has one.
        kill_at: when it gets SIGKILL if still alive (retiring or being killed).
        sigkilled: SIGKILL was sent.
        reason: why it is retiring or being killed.
        kill_reason: why the master is killing it, once it is.
        last_error: what last went wrong in it, from its counters (see :func:`new_error`).
        last_error_at: when the heartbeat that showed it arrived.
    """

    slot: Slot
    pid: int
    generation: int
    started: float
    max_tasks: int | None
    phase: Phase = Phase.BOOTING
    last_beat: float = 0.0
    beat: Beat | None = None
    counts: Counters = field(default_factory=Counters)
    deadline_at: float | None = None
    kill_at: float | None = None
    sigkilled: bool = False
    reason: str | None = None
    kill_reason: KillReason | None = None
    last_error: str | None = None
    last_error_at: float | None = None

    @property
    def attached(self) -> bool:
        """Whether it is its slot's consuming child."""
        return self.slot.child is self

    def snapshot(self, now: float) -> ChildSnapshot:
        """A frozen copy for status and metrics."""
        beat = self.beat
        return ChildSnapshot(
            queue=self.slot.queue,
            slot=self.slot.index,
            pid=self.pid,
            phase=self.phase,
            state=beat.state if beat else "starting",
            generation=self.generation,
            uptime=now - self.started,
            heartbeat_age=now - self.last_beat,
            in_flight=beat.in_flight if beat else 0,
            task=beat.current_task(now - self.last_beat) if beat else None,
            counts=self.counts,
            rss=beat.rss if beat else 0,
            restarts=self.slot.restarts,
            running=beat.running if beat else 0,
            last_error=self.last_error,
            last_error_age=None if self.last_error_at is None else now - self.last_error_at,
        )


#: Queue-level counters that count an error, and per-task ones; the latest to advance in a
#: heartbeat is the child's last error.
_QUEUE_ERRORS = ("receive_errors", "ack_errors", "throttled", "kms_errors")
_TASK_ERRORS = ("failed", "timed_out", "crashed", "redelivered")


def new_error(old: Counters, new: Counters) -> str | None:
    """What went wrong between two reports of one child (``"failed: app.send_mail"``,
    ``"receive_errors"``), or None. Heartbeats carry counts, not error texts: the texts are in
    the child's log lines."""
    found = None
    for name in _QUEUE_ERRORS:
        if getattr(new, name) > getattr(old, name):
            found = name
    for task, stats in sorted(new.tasks.items()):
        before = old.tasks.get(task)
        for name in _TASK_ERRORS:
            if getattr(stats, name) > (getattr(before, name) if before is not None else 0):
                found = f"{name}: {task}"
    return found


@dataclass
class Table:
    """The master's slots and children, and its decisions about them.

    Attributes:
        config: the supervisor's configuration.
        rng: draws each child's jittered task limit.
        targets: wanted children per queue (TTIN / TTOU change these).
        slots: every slot, by ``(queue, index)``.
        children: every live child, attached or not, by pid.
        generation: raised by each reload; children of older generations get rolled.
        reloading: a reload is rolling.
        exited_counts: per queue, what children that have exited counted, so that totals
            survive restarts (the lifetime total is this plus the live children's counts).
        restarts: unplanned replacements so far.
        recycled: planned replacements so far.
        kills: children killed so far, per queue and reason.
        queue_restarts: ``restarts`` per queue.
    """

    config: SupervisorConfig
    rng: random.Random = field(default_factory=random.Random)
    targets: dict[str, int] = field(default_factory=dict)
    slots: dict[tuple[str, int], Slot] = field(default_factory=dict)
    children: dict[int, ChildRecord] = field(default_factory=dict)
    generation: int = 0
    reloading: bool = False
    exited_counts: dict[str, Counters] = field(default_factory=dict)
    restarts: int = 0
    recycled: int = 0
    kills: dict[tuple[str, KillReason], int] = field(default_factory=dict)
    queue_restarts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.targets:
            self.targets = {spec.name: spec.workers for spec in self.config.queues}
        self._sync_slots()

    # -- facts -----------------------------------------------------------------------------

    def spawned(self, slot: Slot, pid: int, now: float, max_tasks: int | None) -> ChildRecord:
        """A child was forked for ``slot`` (with the limit :meth:`max_tasks` drew for it); it
        becomes the slot's child, replacing any child still attached."""
        child = ChildRecord(slot, pid, self.generation, now, max_tasks, last_beat=now)
        slot.child = child
        slot.restart_reason = None
        self.children[pid] = child
        return child

    def beat(self, pid: int, beat: Beat, now: float) -> bool:
        """A heartbeat arrived from ``pid``.

        A child that reports ``draining`` while still attached is stopping on its own (it
        reached its task limit, or someone signalled it directly): it is detached so its slot
        is refilled at once while it drains.

        Returns:
            True when the child just began draining on its own.
        """
        child = self.children.get(pid)
        if child is None:
            return False
        # Malformed counts keep its last good ones; the beat still proves it alive.
        with contextlib.suppress(HeartbeatError):
            counts = child.counts.updated(beat.counters())
            error = new_error(child.counts, counts)
            if error is not None:
                # The counters say what kind and which task; the beat, the error's own text.
                text = f"{error} ({beat.error})" if beat.error else error
                child.last_error, child.last_error_at = text, now
            child.counts = counts
        child.beat = beat
        child.last_beat = now
        child.deadline_at = None if beat.deadline_in is None else now + beat.deadline_in
        if child.phase is Phase.BOOTING and beat.state in CONSUMING:
            child.phase = Phase.RUNNING
            if child.attached:
                child.slot.boot_crashes = 0
        if beat.state == "draining" and child.phase in (Phase.BOOTING, Phase.RUNNING):
            self.recycled += 1
            self.retire(child, now, "draining on its own (task limit or a direct signal)")
            return True
        return False

    def exited(self, pid: int, status: ExitStatus, now: float) -> tuple[ChildRecord, Verdict]:
        """Child ``pid`` was reaped: forget it and decide what that means for its slot.

        Raises:
            KeyError: the table does not know ``pid``.
        """
        child = self.children.pop(pid)
        queue = child.slot.queue
        self.exited_counts[queue] = self.exited_counts.get(queue, Counters()) + child.counts
        if child.kill_reason is not None:
            key = (queue, child.kill_reason)
            self.kills[key] = self.kills.get(key, 0) + 1
        slot = child.slot
        attached = child.attached
        if attached:
            slot.child = None
        verdict = self._verdict(child, status, attached)
        if verdict is Verdict.CRASHED and child.phase is Phase.BOOTING:
            slot.boot_crashes += 1
            if self._cannot_boot(slot.queue):
                verdict = Verdict.BOOT_FAILED
        if verdict is Verdict.CRASHED:
            self._back_off(slot, child, now)
        elif verdict is Verdict.RECYCLED:
            self.recycled += 1
            slot.restart_reason = "recycled"
        self._sync_slots()
        return child, verdict

    def _verdict(self, child: ChildRecord, status: ExitStatus, attached: bool) -> Verdict:
        if status.code == ExitCode.BOOT:
            return Verdict.BOOT_FAILED
        if not attached:
            return Verdict.EXPECTED
        if status.code == ExitCode.OK and child.phase is not Phase.KILLING:
            return Verdict.RECYCLED
        return Verdict.CRASHED

    def _cannot_boot(self, queue: str) -> bool:
        """Every wanted slot of ``queue`` saw ``boot_crash_limit`` children in a row crash before
        consuming: whatever breaks them (a missing library, a crash in an import hook) is not
        going away, and restarting them forever only hides it."""
        limit = self.config.boot_crash_limit
        return all(slot.boot_crashes >= limit for slot in self._wanted_slots(queue))

    def _back_off(self, slot: Slot, child: ChildRecord, now: float) -> None:
        """The first crash is replaced at once; more in a row wait 0.1 s, 0.2 s ... 30 s."""
        if now - child.started >= self.config.stable_after:
            slot.failures = 0
        slot.failures += 1
        slot.restarts += 1
        self.restarts += 1
        self.queue_restarts[slot.queue] = self.queue_restarts.get(slot.queue, 0) + 1
        slot.restart_reason = child.reason or "crashed"
        slot.not_before = now + self.restart_delay(slot.failures)

    def restart_delay(self, failures: int) -> float:
        """Seconds before refilling a slot after its ``failures``-th crash in a row."""
        if failures <= 1:
            return 0.0
        return self.config.restart_backoff.delay(failures - 1)

    def retire(self, child: ChildRecord, now: float, reason: str) -> None:
        """``child`` is draining (asked by the master or on its own): detach it, and give it
        until the graceful timeout before SIGKILL."""
        if child.attached:
            child.slot.child = None
        child.phase = Phase.RETIRING
        child.reason = reason
        deadline = now + self.config.graceful_timeout
        child.kill_at = deadline if child.kill_at is None else min(child.kill_at, deadline)
        self._sync_slots()

    def spawn_failed(self, slot: Slot, now: float) -> None:
        """``fork`` failed (out of processes or memory): try the slot again in a second."""
        slot.not_before = now + 1.0

    def condemn(self, child: ChildRecord, now: float, why: KillReason, reason: str) -> None:
        """``child`` got SIGABRT: SIGKILL follows after the murder grace. It stays attached,
        so its slot is refilled (with backoff) once it is reaped."""
        child.phase = Phase.KILLING
        child.reason = reason
        child.kill_reason = why
        child.kill_at = now + self.config.murder_grace

    def sigkilled(self, child: ChildRecord) -> None:
        """``child`` got SIGKILL: hung past the murder grace, or out of time to stop."""
        child.sigkilled = True
        if child.kill_reason is None:
            child.kill_reason = KillReason.STOP_TIMEOUT

    def hurry(self, child: ChildRecord, now: float, within: float) -> None:
        """Move ``child``'s SIGKILL to at most ``within`` seconds from now (a fast stop)."""
        deadline = now + within
        child.kill_at = deadline if child.kill_at is None else min(child.kill_at, deadline)

    def scale(self, delta: int) -> None:
        """TTIN (+1) / TTOU (-1): one more or one fewer child per queue, never below one."""
        for queue, count in self.targets.items():
            self.targets[queue] = max(1, count + delta)
        self._sync_slots()

    def reload(self) -> None:
        """HUP: every child of an older generation is to be rolled onto fresh code."""
        self.generation += 1
        self.reloading = True

    # -- decisions -------------------------------------------------------------------------

    def max_tasks(self) -> int | None:
        """A new child's task limit: ``--max-tasks-per-child`` spread by the jitter, so
        children started together do not all recycle together."""
        limit = self.config.max_tasks_per_child
        if limit is None:
            return None
        spread = self.config.max_tasks_jitter
        return max(1, round(limit * self.rng.uniform(1 - spread, 1 + spread)))

    def slots_to_fill(self, now: float) -> list[Slot]:
        """Empty wanted slots whose backoff has passed, in queue then slot order."""
        return [
            slot for slot in self._wanted_slots() if slot.child is None and now >= slot.not_before
        ]

    def hung(self, now: float) -> list[tuple[ChildRecord, KillReason, str]]:
        """Children to kill: silent past the heartbeat timeout, running a task past its hard
        limit by more than the grace, or beating while their loop made no progress for the
        heartbeat timeout. Children already being killed are left out."""
        found = []
        for child in self.children.values():
            if child.phase is Phase.KILLING:
                continue
            verdict = self._liveness(child, now)
            if verdict is not None:
                found.append((child, *verdict))
        return found

    def _liveness(self, child: ChildRecord, now: float) -> tuple[KillReason, str] | None:
        timeout = self.config.heartbeat_timeout
        silent = now - child.last_beat
        if silent > timeout:
            return KillReason.HUNG, f"no heartbeat for {silent:.1f} s"
        if child.deadline_at is not None and now > child.deadline_at + self.config.deadline_grace:
            return KillReason.OVERDUE, f"task {now - child.deadline_at:.1f} s past its hard limit"
        loop_age = child.beat.loop_age if child.beat is not None else None
        if loop_age is not None and loop_age + silent > timeout:
            return KillReason.STALLED, f"its loop made no progress for {loop_age + silent:.1f} s"
        return None

    def overdue(self, now: float) -> list[ChildRecord]:
        """Children past their SIGKILL time that have not had it yet."""
        return [
            child
            for child in self.children.values()
            if child.kill_at is not None and now >= child.kill_at and not child.sigkilled
        ]

    def to_recycle(self) -> list[tuple[ChildRecord, str]]:
        """Consuming children over the memory limit, to be replaced gracefully.

        Only once a child has run a task: one that is over the limit from the start would be
        replaced by another just like it, forever.
        """
        limit = self.config.max_memory_bytes
        if limit is None:
            return []
        return [
            (child, f"rss {child.beat.rss >> 20} MiB over {limit >> 20} MiB")
            for child in self._attached()
            if child.phase is Phase.RUNNING
            and child.beat is not None
            and child.beat.rss > limit
            and child.counts.attempts > 0
        ]

    def to_roll(self) -> list[ChildRecord]:
        """During a reload: the next child to replace in each queue.

        One per queue at a time, lowest slot first, and only while every wanted slot of that
        queue has a consuming child: the replacement must be consuming before the next old
        child goes, so a queue never has fewer than N-1 consuming children.
        """
        if not self.reloading:
            return []
        picks = []
        for queue in self.targets:
            slots = self._wanted_slots(queue)
            children = [slot.child for slot in slots]
            if any(c is None or c.phase is not Phase.RUNNING for c in children):
                continue
            stale = [c for c in children if c is not None and c.generation < self.generation]
            if stale:
                picks.append(stale[0])
        return picks

    def reload_finished(self) -> bool:
        """True once, when a rolling reload has replaced every child."""
        if not self.reloading or not self.all_ready():
            return False
        if any(c.generation < self.generation for c in self._attached()):
            return False
        self.reloading = False
        return True

    def all_ready(self) -> bool:
        """Every wanted slot has a consuming child."""
        return all(
            slot.child is not None and slot.child.phase is Phase.RUNNING
            for slot in self._wanted_slots()
        )

    def surplus(self) -> list[ChildRecord]:
        """Attached children of slots above their queue's target (after TTOU), to retire."""
        return [
            child
            for child in self._attached()
            if child.slot.index > self.targets[child.slot.queue]
            and child.phase in (Phase.BOOTING, Phase.RUNNING)
        ]

    def next_event(self, filling: bool = True) -> float | None:
        """The soonest time a decision may change without a new fact (for the loop's sleep).

        Args:
            filling: empty slots are being filled (not while the master stops).
        """
        slots = self._wanted_slots() if filling else []
        times = [slot.not_before for slot in slots if slot.child is None]
        for child in self.children.values():
            if child.kill_at is not None and not child.sigkilled:
                times.append(child.kill_at)
            if child.phase is not Phase.KILLING:
                times.append(child.last_beat + self.config.heartbeat_timeout)
                if child.deadline_at is not None:
                    times.append(child.deadline_at + self.config.deadline_grace)
        return min(times, default=None)

    def snapshot(
        self, now: float, pid: int, state: MasterState, uptime: float
    ) -> SupervisorSnapshot:
        """A frozen view of the whole table."""
        children = sorted(
            self.children.values(), key=lambda c: (c.slot.queue, c.slot.index, c.started)
        )
        queue_counts = {queue: Counters() for queue in self.targets}
        for queue, counts in self.exited_counts.items():
            queue_counts[queue] = queue_counts.get(queue, Counters()) + counts
        for child in children:
            queue = child.slot.queue
            queue_counts[queue] = queue_counts.get(queue, Counters()) + child.counts
        restarts = {**dict.fromkeys(self.targets, 0), **self.queue_restarts}
        return SupervisorSnapshot(
            pid=pid,
            state=state,
            uptime=uptime,
            targets=dict(self.targets),
            children=tuple(child.snapshot(now) for child in children),
            queue_counts=queue_counts,
            restarts=self.restarts,
            recycled=self.recycled,
            queue_restarts=restarts,
            kills=dict(self.kills),
        )

    # -- slots -----------------------------------------------------------------------------

    def _wanted_slots(self, queue: str | None = None) -> list[Slot]:
        queues = [queue] if queue is not None else list(self.targets)
        return [self.slots[(q, i)] for q in queues for i in range(1, self.targets[q] + 1)]

    def _attached(self) -> Iterator[ChildRecord]:
        return (slot.child for slot in self.slots.values() if slot.child is not None)

    def _sync_slots(self) -> None:
        """Create wanted slots; drop empty slots above a queue's target (after TTOU)."""
        for queue, count in self.targets.items():
            for index in range(1, count + 1):
                self.slots.setdefault((queue, index), Slot(queue, index))
        for key, slot in list(self.slots.items()):
            if slot.child is None and slot.index > self.targets[slot.queue]:
                del self.slots[key]
