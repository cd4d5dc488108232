"""The master's operations extension and the heartbeat fields it relies on, without processes:
a fake master hands out snapshots, and systemd is a datagram socket in ``tmp_path``."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ebsqs.counters import Counters, TaskStats
from ebsqs.ops.operations import Operations, pool_health, summary
from ebsqs.ops.status import StatusFile, read_status
from ebsqs.ops.systemd import Notifier
from ebsqs.supervisor.config import QueueSpec, SupervisorConfig
from ebsqs.supervisor.heartbeat import MAX_FRAME, Beat, decode, encode
from ebsqs.supervisor.process import ExitStatus
from ebsqs.supervisor.snapshot import (
    ChildSnapshot,
    KillReason,
    MasterState,
    Phase,
    SupervisorSnapshot,
)
from ebsqs.supervisor.table import Table
from ebsqs.worker import WorkerState, WorkerStatus
from tests import prometheus

pytestmark = pytest.mark.timeout(30)

# -- heartbeats carry per-task stats ----------------------------------------------------------


def status_with(tasks: dict[str, TaskStats], at: float = 1000.0) -> WorkerStatus:
    counters = Counters(receives=9, empty_receives=4, received=5, extended=2, tasks=tasks)
    return WorkerStatus(WorkerState.IDLE, 0, (), counters, at)


def test_a_beat_round_trips_with_its_task_stats() -> None:
    stats = TaskStats(succeeded=3)
    stats.observe(0.2)
    beat = Beat.from_status(42, status_with({"t": stats}), rss=1000)
    again = decode(encode(beat)[4:])
    assert again == beat
    counts = again.counters()
    assert (counts.receives, counts.empty_receives, counts.received, counts.extended) == (
        9,
        4,
        5,
        2,
    )
    assert counts.tasks == {"t": stats}


def test_many_tasks_are_split_into_parts_that_each_fit_a_frame() -> None:
    tasks = {f"myapp.tasks.{'x' * 80}_{i}": TaskStats(succeeded=i) for i in range(200)}
    parts = Beat.parts(42, status_with(tasks), rss=1)
    assert len(parts) > 1
    assert all(len(encode(part)) <= MAX_FRAME for part in parts)
    carried = {name: wire for part in parts for name, wire in (part.tasks or {}).items()}
    assert carried.keys() == tasks.keys()
    # Beats sent a second apart carry different parts, so every task is reported in turn.
    seen = {
        frozenset(Beat.from_status(42, status_with(tasks, at=1000.0 + s), 1).tasks or {})
        for s in range(len(parts))
    }
    assert len(seen) == len(parts)


def test_malformed_task_entries_are_skipped() -> None:
    beat = Beat(pid=1, state="idle", tasks={"good": TaskStats(1).to_wire(), "bad": [1]})
    assert set(beat.counters().tasks) == {"good"}


# -- summary and health -----------------------------------------------------------------------


def child(**changes: Any) -> ChildSnapshot:
    base = ChildSnapshot(
        queue="a",
        slot=1,
        pid=101,
        phase=Phase.RUNNING,
        state="idle",
        generation=0,
        uptime=10.0,
        heartbeat_age=0.5,
        in_flight=0,
        task=None,
        counts=Counters(),
        rss=0,
        restarts=0,
    )
    return replace(base, **changes)


def counts(succeeded: int, failed: int) -> Counters:
    return Counters(tasks={"t": TaskStats(succeeded=succeeded, failed=failed)})


def snapshot(*children: ChildSnapshot, **changes: Any) -> SupervisorSnapshot:
    base = SupervisorSnapshot(
        pid=100,
        state=MasterState.RUNNING,
        uptime=10.0,
        targets={"a": 2, "b": 1},
        children=children,
        queue_counts={"a": counts(7, 1), "b": Counters()},
        restarts=2,
        recycled=0,
    )
    return replace(base, **changes)


def test_summary_is_one_line_per_pool() -> None:
    snap = snapshot(child(state="busy"), child(slot=2, pid=102), child(queue="b", pid=103))
    assert summary(snap) == "a 2/2 up, 1 busy; b 1/1 up, 0 busy; done 7, failed 1, restarts 2"
    stopping = replace(snap, state=MasterState.STOPPING)
    assert summary(stopping).startswith("stopping: a 2/2 up")


def test_summary_says_which_queues_have_degraded_children() -> None:
    snap = snapshot(child(state="degraded"), child(slot=2, pid=102), child(queue="b", pid=103))
    assert summary(snap) == (
        "a 2/2 up, 0 busy, 1 degraded; b 1/1 up, 0 busy; done 7, failed 1, restarts 2"
    )


def test_a_degraded_child_does_not_stop_the_watchdog() -> None:
    # The broker fails, not the pool: a restart by systemd would mend nothing.
    assert pool_health(snapshot(child(state="degraded")), heartbeat_timeout=10) is None


def test_pool_health() -> None:
    assert pool_health(snapshot(child()), heartbeat_timeout=10) is None
    assert pool_health(snapshot(child(heartbeat_age=4.9)), heartbeat_timeout=10) is None
    silent = pool_health(snapshot(child(heartbeat_age=5.1)), heartbeat_timeout=10)
    assert silent is not None and "silent" in silent
    killing = pool_health(snapshot(child(phase=Phase.KILLING)), heartbeat_timeout=10)
    assert killing is not None and "being killed" in killing


# -- the extension with a fake master ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.setblocking(False)
        yield sock


def messages(sock: socket.socket) -> list[str]:
    found = []
    while True:
        try:
            found.append(sock.recv(4096).decode())
        except BlockingIOError:
            return found


def operations(tmp_path: Path, clock: Clock) -> Operations:
    config = SupervisorConfig(
        apps=(), queues=(QueueSpec("a", 2), QueueSpec("b", 1)), heartbeat_timeout=10
    )
    notifier = Notifier(str(tmp_path / "notify"), watchdog_interval=1.0)
    return Operations(config, notifier, StatusFile(tmp_path / "status.json"), clock=clock)


def test_ready_status_and_watchdog(tmp_path: Path, systemd: socket.socket) -> None:
    clock = Clock()
    ops = operations(tmp_path, clock)
    snap = snapshot(child(), child(slot=2, pid=102), child(queue="b", pid=103))
    ops.on_ready(snap)
    assert messages(systemd) == [
        "READY=1\nSTATUS=a 2/2 up, 0 busy; b 1/1 up, 0 busy; done 7, failed 1, restarts 2"
    ]
    assert read_status(tmp_path / "status.json")["master"]["state"] == "running"
    ops.on_tick(snap)
    clock.now = 0.5
    ops.on_tick(snap)  # not due yet
    clock.now = 1.0
    ops.on_tick(snap)
    assert messages(systemd) == ["WATCHDOG=1", "WATCHDOG=1"]


def test_no_watchdog_while_a_child_is_being_killed(tmp_path: Path, systemd: socket.socket) -> None:
    clock = Clock()
    ops = operations(tmp_path, clock)
    snap = snapshot(child(phase=Phase.KILLING))
    for second in range(3):
        clock.now = float(second)
        ops.on_tick(snap)
    assert not any(m == "WATCHDOG=1" for m in messages(systemd))


def test_a_child_turning_degraded_reaches_systemd_and_the_status_file(
    tmp_path: Path, systemd: socket.socket
) -> None:
    clock = Clock()
    ops = operations(tmp_path, clock)
    healthy = snapshot(child(), child(slot=2, pid=102), child(queue="b", pid=103))
    ops.on_ready(healthy)
    messages(systemd)
    failing = Counters(receive_errors=9, kms_errors=9)
    sick = replace(
        healthy, children=(child(state="degraded", counts=failing), *healthy.children[1:])
    )
    ops.on_tick(sick)
    sent = messages(systemd)
    assert (
        "STATUS=a 2/2 up, 0 busy, 1 degraded; b 1/1 up, 0 busy; done 7, failed 1, restarts 2"
        in sent
    )
    assert "WATCHDOG=1" in sent
    written = read_status(tmp_path / "status.json")
    assert written["degraded"] == 1
    assert written["children"][0]["state"] == "degraded"
    assert written["children"][0]["counts"]["kms_errors"] == 9


def test_reload_and_stop(tmp_path: Path, systemd: socket.socket) -> None:
    clock = Clock()
    ops = operations(tmp_path, clock)
    snap = snapshot(child())
    ops.on_reload(snap)
    ops.on_reloaded(snap)
    sent = messages(systemd)
    assert sent[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert sent[1].startswith("READY=1\n")
    snap = replace(snap, state=MasterState.STOPPING)
    ops.on_stopping(snap, graceful=True)
    assert messages(systemd) == ["STOPPING=1"]
    clock.now = 10.0
    ops.on_tick(snap)  # first look at the drain: progress
    ops.on_tick(snap)  # nothing changed: no extension
    snap = replace(snap, queue_counts={"a": counts(8, 1)})
    clock.now = 11.0
    ops.on_tick(snap)
    extensions = [m for m in messages(systemd) if m.startswith("EXTEND_TIMEOUT_USEC=")]
    # graceful 30 s, 10 then 11 s into the drain, plus the 15 s margin
    assert extensions == ["EXTEND_TIMEOUT_USEC=35000000", "EXTEND_TIMEOUT_USEC=34000000"]
    ops.on_stopped(snap, 0)
    assert not (tmp_path / "status.json").exists()


def test_metrics_survive_a_child_exit(tmp_path: Path) -> None:
    """The one lifetime total: what exited children counted stays in the master's table and
    reaches the metrics through the snapshot; a beat read after the reap counts nothing."""
    ops = operations(tmp_path, Clock())
    table = Table(ops.config)
    beat = Beat(pid=0, state="idle", tasks={"t": TaskStats(succeeded=4).to_wire()})
    first = table.spawned(table.slots_to_fill(1.0)[0], 101, 1.0, None)
    table.beat(first.pid, replace(beat, pid=first.pid), 1.5)
    table.exited(first.pid, ExitStatus(None, 9), 2.0)
    second = table.spawned(first.slot, 102, 2.0, None)
    table.beat(second.pid, replace(beat, pid=second.pid), 2.5)
    table.condemn(second, 3.0, KillReason.HUNG, "no heartbeat for 10.1 s")
    table.exited(second.pid, ExitStatus(None, 9), 4.0)
    assert not table.beat(second.pid, beat, 4.5)  # read after the reap: already counted
    ops.on_tick(table.snapshot(5.0, pid=1, state=MasterState.RUNNING, uptime=4.0))
    samples = prometheus.parse(ops.metrics.render())
    assert prometheus.value(samples, "ebsqs_tasks_succeeded_total", queue="a", task="t") == 8
    assert prometheus.value(samples, "ebsqs_child_restarts_total", queue="a") == 2
    assert prometheus.value(samples, "ebsqs_child_kills_total", queue="a", reason="hung") == 1
