"""The master's decisions, driven with a fake clock and no processes.

:class:`~ebsqs.supervisor.table.Table` holds every decision the master makes (which slot to
fill, when, who is hung, who rolls on a reload, who goes on TTOU); the master only forks and
signals. Times here are plain numbers standing for the master's monotonic clock. The heartbeat
pipe protocol and ``--queues`` parsing are tested here too, with a pipe but no child.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator

import pytest

from ebsqs.backoff import Backoff
from ebsqs.counters import TASK_COUNTERS, Counters
from ebsqs.errors import ConfigurationError, ExitCode
from ebsqs.supervisor.config import QueueSpec, SupervisorConfig, parse_queues
from ebsqs.supervisor.heartbeat import MAX_FRAME, Beat, BeatReader, BeatWriter, encode
from ebsqs.supervisor.process import ExitStatus
from ebsqs.supervisor.snapshot import KillReason, MasterState, Phase
from ebsqs.supervisor.table import ChildRecord, Slot, Table, Verdict
from ebsqs.worker import RunningTask, WorkerState, WorkerStatus

OUTCOMES = {item.name for item in TASK_COUNTERS}

OK = ExitStatus(0, None)
CRASH = ExitStatus(1, None)
KILLED = ExitStatus(None, 9)
BOOT = ExitStatus(int(ExitCode.BOOT), None)


def config(queues: dict[str, int] | None = None, **changes: object) -> SupervisorConfig:
    specs = tuple(QueueSpec(name, count) for name, count in (queues or {"a": 2}).items())
    return SupervisorConfig(apps=(), queues=specs, **changes)  # type: ignore[arg-type]


class World:
    """A table plus fake pids and a fake clock: forks and beats as plain method calls."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.now = 1000.0
        self._pids: Iterator[int] = itertools.count(100)

    def fill(self) -> list[ChildRecord]:
        """Spawn a child into every slot the table wants filled now."""
        return [self.spawn(slot) for slot in self.table.slots_to_fill(self.now)]

    def spawn(self, slot: Slot) -> ChildRecord:
        return self.table.spawned(slot, next(self._pids), self.now, self.table.max_tasks())

    def beat(self, child: ChildRecord, state: str = "idle", **fields: object) -> bool:
        """A beat with ``fields``; outcome counts (``succeeded=3``...) are task ``t``'s."""
        counters = Counters()
        for name in [key for key in fields if key in OUTCOMES]:
            count = int(fields.pop(name))  # type: ignore[call-overload]
            setattr(counters.task("t"), name, count)
            for _ in range(count):
                counters.task("t").observe(0.01)
        wire = {"counts": counters.queue_wire(), "tasks": dict(counters.task_wire())}
        beat = Beat(child.pid, state, **wire, **fields)  # type: ignore[arg-type]
        return self.table.beat(child.pid, beat, self.now)

    def boot(self) -> list[ChildRecord]:
        """Fill every slot and let every new child report in."""
        children = self.fill()
        for child in children:
            self.beat(child)
        return children

    def exit(self, child: ChildRecord, status: ExitStatus = CRASH) -> Verdict:
        return self.table.exited(child.pid, status, self.now)[1]

    def running(self, queue: str) -> int:
        return sum(
            1
            for slot in self.table.slots.values()
            if slot.queue == queue and slot.child is not None and slot.child.phase is Phase.RUNNING
        )


def world(queues: dict[str, int] | None = None, **changes: object) -> World:
    return World(Table(config(queues, **changes), random.Random(7)))


# -- --queues ----------------------------------------------------------------------------------


def test_queues_take_the_default_count_unless_they_name_one() -> None:
    assert parse_queues("a, b", 3) == (QueueSpec("a", 3), QueueSpec("b", 3))
    assert parse_queues("a:8,b:2") == (QueueSpec("a", 8), QueueSpec("b", 2))
    assert parse_queues("a:8,b", 4) == (QueueSpec("a", 8), QueueSpec("b", 4))


@pytest.mark.parametrize("text", ["", " , ", "a,a", "a:0", "a:x", ":3", "a:-1"])
def test_bad_queue_lists_are_refused(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_queues(text)


# -- filling and crash backoff -------------------------------------------------------------------


def test_every_slot_is_filled_at_start_in_queue_then_slot_order() -> None:
    w = world({"a": 2, "b": 3})
    children = w.fill()
    assert [(c.slot.queue, c.slot.index) for c in children] == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("b", 2),
        ("b", 3),
    ]
    assert w.table.slots_to_fill(w.now) == []
    assert not w.table.all_ready()
    for child in children:
        w.beat(child)
    assert w.table.all_ready()


def test_a_crash_is_replaced_at_once_then_repeated_crashes_back_off() -> None:
    w = world({"a": 2})
    first, other = w.boot()
    assert w.exit(first) is Verdict.CRASHED
    slot = first.slot
    assert w.table.slots_to_fill(w.now) == [slot]  # the first crash: at once

    delays = []
    for _ in range(12):
        child = w.spawn(slot)
        w.now += 1  # each one dies a second after it started: not stable
        w.exit(child, KILLED)
        delays.append(round(slot.not_before - w.now, 3))
        assert w.table.slots_to_fill(w.now) == ([] if delays[-1] else [slot])
        w.now = slot.not_before
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert max(delays) == 30.0 and delays[-1] == 30.0
    # Only the crashing slot was touched; the other child is still its slot's.
    assert other.attached and other.slot.restarts == 0
    assert slot.restarts == 13 and w.table.restarts == 13


def test_backoff_resets_once_a_child_stayed_up() -> None:
    w = world({"a": 1}, stable_after=30.0)
    [child] = w.boot()
    slot = child.slot
    for _ in range(3):
        w.exit(child)
        w.now = slot.not_before
        [child] = w.boot()
    assert slot.failures == 3
    w.now += 30
    w.exit(child)
    assert slot.failures == 1 and slot.not_before == w.now


def test_restart_delays_follow_the_configured_backoff() -> None:
    w = world(restart_backoff=Backoff(0.5, 4.0, jitter=False))
    assert [w.table.restart_delay(n) for n in range(1, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]


def test_a_child_that_cannot_boot_is_not_restarted() -> None:
    w = world({"a": 2})
    first, _ = w.fill()
    assert w.exit(first, BOOT) is Verdict.BOOT_FAILED
    assert first.slot.restarts == 0  # the master halts; nothing is scheduled


def test_a_clean_exit_of_an_attached_child_is_a_recycle_refilled_at_once() -> None:
    w = world({"a": 1})
    [child] = w.boot()
    assert w.exit(child, OK) is Verdict.RECYCLED
    assert child.slot.failures == 0 and w.table.recycled == 1
    assert w.table.slots_to_fill(w.now) == [child.slot]


def test_a_child_draining_on_its_own_is_replaced_while_it_drains() -> None:
    w = world({"a": 1})
    [child] = w.boot()
    assert w.beat(child, "draining")  # it reached its task limit
    assert child.phase is Phase.RETIRING and not child.attached
    [replacement] = w.fill()
    assert replacement.slot is child.slot
    assert w.exit(child, OK) is Verdict.EXPECTED
    assert replacement.attached and w.table.recycled == 1


def test_task_limits_are_jittered_per_child() -> None:
    w = world({"a": 20}, max_tasks_per_child=50)
    limits = [child.max_tasks for child in w.fill()]
    assert all(limit is not None and 45 <= limit <= 55 for limit in limits)
    assert len(set(limits)) > 3
    assert world({"a": 1}).table.max_tasks() is None


# -- hung and overdue children -------------------------------------------------------------------


def test_a_silent_child_is_hung_after_the_heartbeat_timeout() -> None:
    w = world({"a": 2}, heartbeat_timeout=30.0)
    quiet, chatty = w.boot()
    w.now += 30
    assert w.table.hung(w.now) == []
    w.now += 0.5
    w.beat(chatty)
    [(found, why, reason)] = w.table.hung(w.now)
    assert found is quiet and why is KillReason.HUNG and "no heartbeat for 30.5 s" in reason


def test_a_child_that_never_reports_in_is_hung_too() -> None:
    w = world({"a": 1}, heartbeat_timeout=5.0)
    [child] = w.fill()
    w.now += 5.1
    assert [c for c, _, _ in w.table.hung(w.now)] == [child]


def test_a_task_past_its_hard_limit_gets_its_child_killed_despite_heartbeats() -> None:
    w = world({"a": 1}, deadline_grace=3.0)
    [child] = w.boot()
    w.beat(child, "busy", task="t", task_id="id", deadline_in=2.0)
    for _ in range(5):
        w.now += 1
        w.beat(child, "busy", task="t", task_id="id", deadline_in=child.deadline_at - w.now)  # type: ignore[operator]
        assert w.table.hung(w.now) == []
    w.now += 0.5
    w.beat(child, "busy", task="t", task_id="id", deadline_in=child.deadline_at - w.now)  # type: ignore[operator]
    [(found, why, reason)] = w.table.hung(w.now)
    assert found is child and why is KillReason.OVERDUE and "past its hard limit" in reason


def test_a_condemned_child_is_killed_after_the_murder_grace_and_its_slot_backs_off() -> None:
    w = world({"a": 1}, murder_grace=1.0, heartbeat_timeout=2.0)
    [child] = w.boot()
    w.now += 3
    w.table.condemn(child, w.now, KillReason.HUNG, "no heartbeat")
    assert w.table.hung(w.now) == []  # not twice
    assert w.table.overdue(w.now + 0.9) == []
    assert w.table.overdue(w.now + 1.0) == [child]
    assert child.attached  # its slot refills once it is reaped
    assert w.exit(child, ExitStatus(None, 6)) is Verdict.CRASHED
    assert child.slot.restart_reason == "no heartbeat"
    assert w.table.kills == {("a", KillReason.HUNG): 1}


def test_a_retiring_child_gets_the_graceful_timeout_then_sigkill() -> None:
    w = world({"a": 1}, graceful_timeout=30.0)
    [child] = w.boot()
    w.table.retire(child, w.now, "stop")
    assert not child.attached and child.phase is Phase.RETIRING
    assert w.table.overdue(w.now + 29.9) == []
    assert w.table.overdue(w.now + 30) == [child]
    w.table.hurry(child, w.now, 5.0)  # a second TERM
    assert w.table.overdue(w.now + 5) == [child]
    assert w.exit(child, OK) is Verdict.EXPECTED


def test_memory_hogs_are_recycled_once_they_ran_a_task() -> None:
    w = world({"a": 2}, max_memory_per_child=100)
    small, big = w.boot()
    w.beat(small, rss=50 << 20, succeeded=3)
    w.beat(big, rss=101 << 20)
    assert w.table.to_recycle() == []  # born over the limit: a replacement would be too
    w.beat(big, rss=101 << 20, failed=1)
    [(found, reason)] = w.table.to_recycle()
    assert found is big and "101 MiB" in reason


def test_the_next_event_bounds_the_loops_sleep() -> None:
    w = world({"a": 1}, heartbeat_timeout=30.0)
    [child] = w.boot()
    assert w.table.next_event() == w.now + 30
    w.table.retire(child, w.now, "stop")
    assert w.table.next_event(filling=False) == w.now + 30  # heartbeat and SIGKILL times
    assert w.table.next_event(filling=True) <= w.now  # type: ignore[operator]  # fill at once


# -- TTIN / TTOU ---------------------------------------------------------------------------------


def test_ttin_adds_a_slot_per_queue_and_ttou_retires_the_highest() -> None:
    w = world({"a": 2, "b": 1})
    w.boot()
    w.table.scale(+1)
    assert w.table.targets == {"a": 3, "b": 2}
    new = w.boot()
    assert [(c.slot.queue, c.slot.index) for c in new] == [("a", 3), ("b", 2)]

    w.table.scale(-1)
    w.table.scale(-1)
    assert w.table.targets == {"a": 1, "b": 1}  # never below one
    surplus = w.table.surplus()
    assert sorted((c.slot.queue, c.slot.index) for c in surplus) == [("a", 2), ("a", 3), ("b", 2)]
    for child in surplus:
        w.table.retire(child, w.now, "scaled down")
    assert sorted(w.table.slots) == [("a", 1), ("b", 1)]
    assert w.table.slots_to_fill(w.now) == []
    for child in surplus:
        assert w.exit(child, OK) is Verdict.EXPECTED


# -- HUP -----------------------------------------------------------------------------------------


def test_hup_rolls_one_child_per_queue_at_a_time_lowest_slot_first() -> None:
    w = world({"a": 3, "b": 1})
    old = {c.pid: c for c in w.boot()}
    w.table.reload()
    rolled: list[tuple[str, int]] = []
    for _ in range(10):
        picks = w.table.to_roll()
        if not picks:
            break
        replacements = []
        for child in picks:
            rolled.append((child.slot.queue, child.slot.index))
            replacements.append(w.spawn(child.slot))  # the replacement starts ...
            w.table.retire(child, w.now, "reload")  # ... and the old one drains
        # Until the replacement reports in, nothing else in its queue rolls.
        assert w.table.to_roll() == []
        assert w.running("a") >= 3 - 1 and w.running("b") >= 1 - 1
        for child in replacements:
            w.beat(child)
        for child in picks:
            w.exit(child, OK)
        assert w.table.reload_finished() is (not w.table.to_roll() and len(rolled) == 4)
    assert rolled == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
    assert not w.table.reloading
    assert all(c.generation == 1 for c in w.table.children.values())
    assert not set(w.table.children) & set(old)


def test_hup_waits_while_a_slot_of_the_queue_is_down() -> None:
    w = world({"a": 2})
    first, _ = w.boot()
    w.exit(first)  # a crash: slot a#1 is empty
    w.table.reload()
    assert w.table.to_roll() == []  # rolling now would leave fewer than N-1
    [refill] = w.boot()
    assert refill.generation == 1  # the refill already runs the new code
    [stale] = w.table.to_roll()
    assert stale.slot.index == 2


# -- snapshots -----------------------------------------------------------------------------------


def test_counts_survive_child_restarts() -> None:
    w = world({"a": 2})
    one, two = w.boot()
    w.beat(one, succeeded=5, failed=1)
    w.beat(two, succeeded=3, retried=2)
    w.exit(one, KILLED)
    [three] = w.boot()
    w.beat(three, "busy", succeeded=1, task="t", task_id="x", task_age=2.0, deadline_in=8.0)
    w.now += 0.5
    snap = w.table.snapshot(w.now, pid=1, state=MasterState.RUNNING, uptime=9.0)
    totals = snap.counts.totals()
    assert (totals["succeeded"], totals["failed"], totals["retried"]) == (9, 1, 2)
    assert totals["dead_lettered"] == 0
    assert snap.queue_restarts == {"a": 1}
    assert snap.restarts == 1 and snap.running("a") == 2
    child = next(c for c in snap.children if c.pid == three.pid)
    assert child.state == "busy" and child.restarts == 1 and child.heartbeat_age == 0.5
    assert child.task is not None
    assert (child.task.name, child.task.running_for, child.task.deadline_in) == ("t", 2.5, 7.5)


# -- the heartbeat pipe --------------------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[BeatReader, BeatWriter]]:
    read_fd, write_fd = os.pipe()
    reader, writer = BeatReader(read_fd), BeatWriter(write_fd)
    writer.prepare()
    yield reader, writer
    reader.close()
    writer.close()


def test_beats_cross_the_pipe_whole_and_in_order(pipe: tuple[BeatReader, BeatWriter]) -> None:
    reader, writer = pipe
    beats = [
        Beat(7, "busy", 1, 1, "t", "id", 0.5, 3.0, 1 << 20, 1.0, [i, 0, 0, 0]) for i in range(3)
    ]
    for beat in beats:
        assert writer.send(beat)
    assert reader.read() == beats
    assert reader.read() == []
    writer.close()
    assert reader.read() == [] and reader.closed


def test_partial_and_malformed_frames(pipe: tuple[BeatReader, BeatWriter]) -> None:
    reader, writer = pipe
    frame = encode(Beat(7, "idle"))
    os.write(writer.fd, frame[:5])
    assert reader.read() == []
    os.write(writer.fd, frame[5:] + b"\x00\x00\x00\x02[]" + frame)
    assert reader.read() == [Beat(7, "idle"), Beat(7, "idle")]
    assert reader.malformed == 1
    assert len(encode(Beat(7, "busy", task="x" * 200, task_id="y" * 200))) < MAX_FRAME


def test_a_beat_reports_the_task_nearest_its_hard_limit() -> None:
    running = (
        RunningTask("old", "1", "a", started_at=90.0, deadline=None),
        RunningTask("tight", "2", "a", started_at=95.0, deadline=103.0),
        RunningTask("loose", "3", "a", started_at=80.0, deadline=200.0),
    )
    counters = Counters(receives=9)
    stats = counters.task("t")
    stats.succeeded, stats.failed, stats.retried, stats.dead_lettered = 4, 1, 2, 3
    beat = Beat.from_status(7, WorkerStatus(WorkerState.BUSY, 5, running, counters, 100.0), 123)
    assert (beat.task, beat.task_id, beat.task_age, beat.deadline_in) == ("tight", "2", 5.0, 3.0)
    assert (beat.state, beat.in_flight, beat.running, beat.rss) == ("busy", 5, 3, 123)
    assert beat.counters() == counters


def test_a_child_whose_loop_stalls_is_killed_though_it_beats() -> None:
    w = world({"a": 1}, heartbeat_timeout=30.0)
    [child] = w.boot()
    w.beat(child, "busy", loop_age=29.0)
    assert w.table.hung(w.now) == []
    w.now += 0.5
    w.beat(child, "busy", loop_age=29.5)
    w.now += 0.6  # the beat is 0.6 s old: the loop has now been still for 30.1 s
    [(found, why, reason)] = w.table.hung(w.now)
    assert found is child and why is KillReason.STALLED and "no progress for 30.1 s" in reason


def test_a_loop_that_blocks_on_purpose_is_not_stalled() -> None:
    w = world({"a": 1}, heartbeat_timeout=30.0)
    [child] = w.boot()
    for _ in range(40):  # a long inline task, a long poll or a drain: loop_age is None
        w.now += 1
        w.beat(child, "busy", loop_age=None)
        assert w.table.hung(w.now) == []


def test_children_that_keep_crashing_before_they_consume_stop_the_master() -> None:
    """Not a configuration error (those exit 3 at once) but a crash at boot, every time, in
    every slot: after boot_crash_limit in a row per slot, the verdict is a boot failure."""
    w = world({"a": 2}, boot_crash_limit=3)
    verdicts = []
    for _ in range(3):
        for child in w.fill():
            verdicts.append(w.exit(child, KILLED))
        w.now += 60  # past every backoff
    assert verdicts[:-1] == [Verdict.CRASHED] * 5
    assert verdicts[-1] is Verdict.BOOT_FAILED


def test_a_child_that_consumed_resets_its_slot_s_boot_crashes() -> None:
    w = world({"a": 1}, boot_crash_limit=2)
    [child] = w.fill()
    assert w.exit(child, KILLED) is Verdict.CRASHED
    w.now += 60
    [child] = w.boot()  # this one reports in: the slot can boot
    assert w.exit(child, KILLED) is Verdict.CRASHED
    w.now += 60
    [child] = w.fill()
    assert w.exit(child, KILLED) is Verdict.CRASHED  # one boot crash since the last success
