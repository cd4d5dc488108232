"""The one count model (ebsqs.counters) and the Prometheus text rendered from a snapshot."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ebsqs.brokers.base import QueueStats
from ebsqs.config import Settings
from ebsqs.counters import (
    DURATION_BUCKETS,
    QUEUE_COUNTERS,
    REJECTED,
    TASK_COUNTERS,
    Counters,
    TaskStats,
)
from ebsqs.errors import BrokerUnavailable, QueueDoesNotExist
from ebsqs.ops import status
from ebsqs.ops.depth import DepthSampler, QueueDepth
from ebsqs.ops.metrics import CHILD_STATES, Metrics, render
from ebsqs.ops.operations import Operations
from ebsqs.ops.status import StatusFile
from ebsqs.ops.systemd import Notifier
from ebsqs.supervisor.config import QueueSpec, SupervisorConfig
from ebsqs.supervisor.snapshot import (
    ChildSnapshot,
    KillReason,
    MasterState,
    Phase,
    SupervisorSnapshot,
)
from tests import prometheus
from tests.waiting import wait_until


def stats(succeeded: int = 0, failed: int = 0, retried: int = 0, *durations: float) -> TaskStats:
    result = TaskStats(succeeded=succeeded, failed=failed, retried=retried)
    for seconds in durations:
        result.observe(seconds)
    return result


def snapshot(
    queue_counts: Mapping[str, Counters],
    children: tuple[ChildSnapshot, ...] = (),
    **fields: object,
) -> SupervisorSnapshot:
    return SupervisorSnapshot(
        pid=1,
        state=MasterState.RUNNING,
        uptime=1.0,
        targets={queue: 1 for queue in queue_counts},
        children=children,
        queue_counts=queue_counts,
        restarts=0,
        recycled=0,
        **fields,  # type: ignore[arg-type]
    )


def scrape(snap: SupervisorSnapshot, age: float = 0.0) -> dict[prometheus.Key, float]:
    return prometheus.parse(render(snap, age))


def succeeded(samples: dict[prometheus.Key, float], queue: str, task: str) -> float:
    return prometheus.value(samples, "ebsqs_tasks_succeeded_total", queue=queue, task=task)


# -- TaskStats and Counters -----------------------------------------------------------------


def test_durations_fall_in_inclusive_buckets() -> None:
    result = stats(0, 0, 0, 0.005, 0.0051, 7200.0, -1.0)
    assert result.buckets[0] == 2  # 0.005 itself and a clock that went backwards
    assert result.buckets[1] == 1
    assert result.buckets[-1] == 1
    assert result.attempts == 4
    assert result.duration_sum == pytest.approx(7200.0101)


def test_task_stats_wire_form_round_trips() -> None:
    original = TaskStats(3, 1, 2, 1)
    original.observe(0.2)
    original.observe(0.2)
    wire = original.to_wire()
    # How many counters, the counters, the sum, then buckets up to the last non-zero one.
    assert len(wire) == 1 + len(TASK_COUNTERS) + 1 + 6
    assert TaskStats.from_wire(wire) == original
    assert TaskStats.from_wire(TaskStats().to_wire()) == TaskStats()
    with pytest.raises(ValueError, match="wire format"):
        TaskStats.from_wire([1, 2])


def test_task_stats_from_newer_code_with_more_counters_are_read_up_to_ours() -> None:
    original = stats(3, 1, 0, 0.2)
    wire = original.to_wire()
    count = wire[0]
    newer = [count + 1, *wire[1 : count + 1], 77, *wire[count + 1 :]]
    assert TaskStats.from_wire(newer) == original


def test_task_stats_add_up() -> None:
    total = stats(1, 0, 0, 0.1) + stats(2, 1, 1, 0.1, 5.0)
    assert (total.succeeded, total.failed, total.retried) == (3, 1, 1)
    assert total.attempts == 3


def test_counters_add_up_per_queue_counter_and_per_task() -> None:
    one = Counters(receives=2, tasks={"t": stats(1), "u": stats(2)})
    two = Counters(receives=3, extended=1, tasks={"t": stats(3)})
    total = one + two
    assert (total.receives, total.extended) == (5, 1)
    assert total.tasks["t"].succeeded == 4 and total.tasks["u"].succeeded == 2
    assert total.total("succeeded") == 6 and total.finished == 6
    assert one.tasks["t"].succeeded == 1  # the operands are left alone


def test_a_later_report_keeps_the_tasks_it_leaves_out() -> None:
    first = Counters(receives=1, tasks={"t": stats(5), "u": stats(1)})
    merged = first.updated(Counters(receives=2, tasks={"u": stats(2)}))
    assert merged.receives == 2
    assert merged.tasks["t"].succeeded == 5 and merged.tasks["u"].succeeded == 2


def test_counters_round_trip_through_the_heartbeat_wire() -> None:
    counters = Counters(receives=9, empty_receives=4, received=5, extended=2)
    counters.tasks["t"] = stats(3, 0, 1, 0.2)
    again = Counters.from_wire(counters.queue_wire(), dict(counters.task_wire()))
    assert again == counters
    assert Counters.from_wire([1], {"bad": ["x"]}) == Counters(receives=1)


# -- exposition -----------------------------------------------------------------------------


def test_counters_per_queue_and_task() -> None:
    snap = snapshot(
        {
            "a": Counters(receives=6, tasks={"t": stats(13, 1), "u": stats(2)}),
            "b": Counters(tasks={"t": stats(4)}),
        }
    )
    samples = scrape(snap)
    assert succeeded(samples, "a", "t") == 13
    assert succeeded(samples, "a", "u") == 2
    assert succeeded(samples, "b", "t") == 4
    assert prometheus.value(samples, "ebsqs_tasks_failed_total", queue="a", task="t") == 1
    assert prometheus.value(samples, "ebsqs_receives_total", queue="a") == 6


def test_every_declared_counter_is_a_metric_family() -> None:
    """Adding a counter field is the whole change: it is rendered with its name and help."""
    text = render(snapshot({"a": Counters(tasks={"t": stats(1)})}))
    for item in (*TASK_COUNTERS, *QUEUE_COUNTERS):
        assert f"# HELP {item.metric} {item.help}" in text
        assert f"# TYPE {item.metric} counter" in text


def test_queues_restarts_and_kills_exist_at_zero_before_any_event() -> None:
    samples = scrape(snapshot({"a": Counters()}, queue_restarts={"a": 0}))
    assert prometheus.value(samples, "ebsqs_receives_total", queue="a") == 0
    assert prometheus.value(samples, "ebsqs_child_restarts_total", queue="a") == 0
    for reason in KillReason:
        labels = {"queue": "a", "reason": str(reason)}
        assert prometheus.value(samples, "ebsqs_child_kills_total", **labels) == 0


def test_restarts_and_kills_are_counted() -> None:
    snap = snapshot({"a": Counters()}, queue_restarts={"a": 2}, kills={("a", KillReason.HUNG): 1})
    samples = scrape(snap)
    assert prometheus.value(samples, "ebsqs_child_restarts_total", queue="a") == 2
    assert prometheus.value(samples, "ebsqs_child_kills_total", queue="a", reason="hung") == 1


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    samples = scrape(snapshot({"a": Counters(tasks={"t": stats(3, 0, 0, 0.003, 0.3, 30000.0)})}))
    labels = {"queue": "a", "task": "t"}

    def bucket(le: str) -> float:
        return prometheus.value(samples, "ebsqs_task_duration_seconds_bucket", le=le, **labels)

    assert bucket("0.005") == 1
    assert bucket("0.25") == 1
    assert bucket("0.5") == 2
    assert bucket("3600") == 2
    assert bucket("+Inf") == 3
    assert prometheus.value(samples, "ebsqs_task_duration_seconds_count", **labels) == 3
    assert prometheus.value(samples, "ebsqs_task_duration_seconds_sum", **labels) == (
        pytest.approx(30000.303)
    )
    bounds = [key for key in samples if key[0] == "ebsqs_task_duration_seconds_bucket"]
    assert len(bounds) == len(DURATION_BUCKETS) + 1


def child(slot: int, state: str, heartbeat_age: float, **fields: object) -> ChildSnapshot:
    base = ChildSnapshot(
        queue="a",
        slot=slot,
        pid=100 + slot,
        phase=Phase.RUNNING,
        state=state,
        generation=0,
        uptime=5.0,
        heartbeat_age=heartbeat_age,
        in_flight=0,
        task=None,
        counts=Counters(),
        rss=0,
        restarts=0,
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def test_gauges_describe_the_live_children_aged_since_the_snapshot() -> None:
    children = (
        child(1, "busy", 0.5, in_flight=2, running=1, rss=1000),
        child(2, "idle", 0.25, rss=2000),
        child(3, "draining", 0.0, phase=Phase.KILLING),
    )
    metrics = Metrics()
    metrics.update(snapshot({"a": Counters()}, children), at=10.0)
    samples = prometheus.parse(metrics.render(now=11.0))
    assert prometheus.value(samples, "ebsqs_children", queue="a", state="busy") == 1
    assert prometheus.value(samples, "ebsqs_children", queue="a", state="idle") == 1
    assert prometheus.value(samples, "ebsqs_children", queue="a", state="killing") == 1
    assert prometheus.value(samples, "ebsqs_tasks_in_flight", queue="a") == 1
    assert prometheus.value(samples, "ebsqs_messages_held", queue="a") == 2
    age = "ebsqs_child_heartbeat_age_seconds"
    assert prometheus.value(samples, age, queue="a", slot="1") == 1.5
    assert prometheus.value(samples, age, queue="a", slot="2") == 1.25
    rss = "ebsqs_child_resident_memory_bytes"
    assert prometheus.value(samples, rss, queue="a", slot="2") == 2000


def test_nothing_is_served_before_the_first_snapshot() -> None:
    assert Metrics().render() == ""


def test_label_values_are_escaped() -> None:
    tasks = {'odd"name\\x\n': stats(1), REJECTED: TaskStats(dead_lettered=1)}
    text = render(snapshot({"a": Counters(tasks=tasks)}))
    assert 'task="odd\\"name\\\\x\\n"' in text
    samples = prometheus.parse(text)
    assert succeeded(samples, "a", 'odd"name\\x\n') == 1
    dead = "ebsqs_tasks_dead_lettered_total"
    assert prometheus.value(samples, dead, queue="a", task=REJECTED) == 1


def test_every_family_has_help_and_type() -> None:
    lines = render(snapshot({"a": Counters(tasks={"t": stats(1, 0, 0, 0.1)})})).splitlines()
    helps = {line.split()[2] for line in lines if line.startswith("# HELP ")}
    types = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
    assert helps == types
    assert {"ebsqs_tasks_succeeded_total", "ebsqs_task_duration_seconds"} <= types


def test_a_counter_flows_from_the_loop_to_the_metrics_and_the_status_file() -> None:
    """timed_out was added as one declared field and one increment in settle; this follows it
    through every stage that the count model promises carries it."""
    from ebsqs.ops.status import document
    from ebsqs.supervisor.config import QueueSpec, SupervisorConfig
    from ebsqs.supervisor.heartbeat import Beat, decode, encode
    from ebsqs.supervisor.table import Table
    from ebsqs.worker import WorkerState, WorkerStatus

    worker_counts = Counters()
    worker_counts.task("slow").timed_out = 2
    status = WorkerStatus(WorkerState.IDLE, 0, (), worker_counts, 10.0)
    beat = decode(encode(Beat.from_status(101, status, rss=1))[4:])  # through the pipe's format
    table = Table(SupervisorConfig(apps=(), queues=(QueueSpec("a", 1),)))
    table.spawned(table.slots_to_fill(1.0)[0], 101, 1.0, None)
    table.beat(101, beat, 2.0)
    snap = table.snapshot(3.0, pid=1, state=MasterState.RUNNING, uptime=2.0)
    labels = {"queue": "a", "task": "slow"}
    assert prometheus.value(scrape(snap), "ebsqs_tasks_timed_out_total", **labels) == 2
    assert document(snap, heartbeat_timeout=30.0)["counts"]["timed_out"] == 2


# -- gaps found by scraping: build info, zeros from the start, depth -----------------------


def test_build_info_names_the_ebsqs_and_python_versions() -> None:
    samples = scrape(snapshot({"a": Counters()}))
    [(name, labels)] = [key for key in samples if key[0] == "ebsqs_build_info"]
    assert dict(labels)["python"] == platform.python_version()
    assert dict(labels)["version"] == importlib.metadata.version("ebsqs")
    assert samples[(name, labels)] == 1


def test_every_queue_counter_family_exists_at_zero_for_a_queue_without_counts() -> None:
    # A configured queue missing from queue_counts (no child reported yet) still has them all.
    snap = dataclasses.replace(snapshot({"a": Counters()}), targets={"a": 1, "b": 2})
    samples = scrape(snap)
    for item in QUEUE_COUNTERS:
        assert (item.metric, frozenset({("queue", "b")})) in samples, item.metric
    assert (("ebsqs_child_restarts_total", frozenset({("queue", "b")}))) in samples
    for reason in KillReason:
        key = ("ebsqs_child_kills_total", frozenset({("queue", "b"), ("reason", str(reason))}))
        assert samples[key] == 0


def test_child_states_without_a_child_report_zero() -> None:
    busy = ChildSnapshot(
        "a", 1, 11, Phase.RUNNING, "busy", 0, 1.0, 0.1, 1, None, Counters(), 1, 0, 1
    )
    samples = scrape(snapshot({"a": Counters(), "b": Counters()}, (busy,)))
    children = {
        (dict(labels)["queue"], dict(labels)["state"]): value
        for (name, labels), value in samples.items()
        if name == "ebsqs_children"
    }
    assert children == {
        **{("a", state): 0 for state in CHILD_STATES},
        **{("b", state): 0 for state in CHILD_STATES},
        ("a", "busy"): 1,
    }
    assert prometheus.value(samples, "ebsqs_tasks_in_flight", queue="b") == 0
    assert ("ebsqs_tasks_in_flight", frozenset({("queue", "b")})) in samples


def test_queue_depth_gauges_with_staleness() -> None:
    depths = {
        "a": QueueDepth("a", 5, 2, 1, 3, sampled_at=1_700_000_000.5),
        "b": QueueDepth("b", 0, 0, 0, None, sampled_at=1_700_000_001.0, stale=True),
    }
    samples = prometheus.parse(render(snapshot({"a": Counters(), "b": Counters()}), 0, depths))
    depth = "ebsqs_queue_messages"
    assert prometheus.value(samples, depth, queue="a", state="visible") == 5
    assert prometheus.value(samples, depth, queue="a", state="in_flight") == 2
    assert prometheus.value(samples, depth, queue="a", state="delayed") == 1
    assert prometheus.value(samples, "ebsqs_dead_letter_messages", queue="a") == 3
    # No dead-letter queue: no series, rather than a lying zero.
    assert ("ebsqs_dead_letter_messages", frozenset({("queue", "b")})) not in samples
    stamp = "ebsqs_queue_depth_sampled_timestamp_seconds"
    assert prometheus.value(samples, stamp, queue="a") == 1_700_000_000.5
    assert prometheus.value(samples, "ebsqs_queue_depth_stale", queue="a") == 0
    assert prometheus.value(samples, "ebsqs_queue_depth_stale", queue="b") == 1
    # Without a sampler (render without depths), no depth family at all.
    assert not [k for k in scrape(snapshot({"a": Counters()})) if k[0] == depth]


def test_metrics_render_the_sampler_s_latest_depths() -> None:
    depths = {"a": QueueDepth("a", visible=9)}
    registry = Metrics(lambda: depths)
    registry.update(snapshot({"a": Counters()}), at=0.0)
    samples = prometheus.parse(registry.render(now=0.0))
    assert prometheus.value(samples, "ebsqs_queue_messages", queue="a", state="visible") == 9


# -- the depth sampler: off the master's loop ------------------------------------------------


class _Depths:
    """A broker that answers ``stats`` from a table, fails on demand, or blocks until told."""

    def __init__(self) -> None:
        self.visible: dict[str, int] = {"a": 4, "a-dlq": 2}
        self.failing = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.calls = 0
        self.in_flight = 1

    def stats(self, queue: str) -> QueueStats:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(30)
        if self.failing:
            raise BrokerUnavailable("no route to the broker")
        if queue not in self.visible:
            raise QueueDoesNotExist(queue)
        return QueueStats(queue, self.visible[queue], self.in_flight, 0)

    def close(self) -> None:
        pass


def sampler_of(broker: _Depths, queues: tuple[str, ...] = ("a",)) -> DepthSampler:
    return DepthSampler(Settings(broker_url="memory://"), queues, 60, lambda url: broker)  # type: ignore[arg-type, return-value]


def test_a_failing_sample_keeps_the_last_depths_marked_stale_and_logs_once_per_change() -> None:
    broker = _Depths()
    sampler = sampler_of(broker, ("a", "b"))
    assert sampler.depths()["a"] == QueueDepth("a")  # zeros before the first sample
    broker.visible["b"] = 7  # b has no dead-letter queue
    sampler.sample_once()
    good = sampler.depths()
    assert (good["a"].visible, good["a"].in_flight, good["a"].dead_letters) == (4, 1, 2)
    assert (good["b"].visible, good["b"].dead_letters) == (7, None)
    assert good["a"].sampled_at > 0 and not good["a"].stale
    broker.failing = True
    with capture_logs() as logs:
        sampler.sample_once()
        sampler.sample_once()
        broker.failing = False
        broker.visible["a"] = 5
        sampler.sample_once()
    assert [e["event"] for e in logs] == ["queue_depth_failed", "queue_depth_recovered"]
    assert logs[0]["error_type"] == "BrokerUnavailable"
    assert sampler.depths()["a"].visible == 5 and not sampler.depths()["a"].stale


def test_stale_depths_keep_their_values_and_sample_time() -> None:
    broker = _Depths()
    sampler = sampler_of(broker)
    sampler.sample_once()
    before = sampler.depths()["a"]
    broker.failing = True
    with capture_logs():
        sampler.sample_once()
    after = sampler.depths()["a"]
    assert after.stale and (after.visible, after.sampled_at) == (before.visible, before.sampled_at)


def test_a_broker_that_blocks_does_not_delay_the_master_s_hooks(tmp_path: Path) -> None:
    broker = _Depths()
    broker.release.clear()  # every stats call blocks until the test says
    sampler = sampler_of(broker)
    config = SupervisorConfig(apps=(), queues=(QueueSpec("a", 1),))
    ops = Operations(config, Notifier(None), StatusFile(tmp_path / "status.json"), sampler=sampler)
    snap = snapshot({"a": Counters()})
    try:
        ops.on_starting(snap)
        ops.on_ready(snap)  # starts the sampler's thread, which blocks in stats at once
        assert broker.entered.wait(10), "the sampler never asked the broker"
        started = time.monotonic()
        for _ in range(20):  # what the master's loop calls each tick
            ops.on_tick(snap)
        ops.on_reload(snap)
        ops.on_reloaded(snap)
        elapsed = time.monotonic() - started
        assert elapsed < 1.0, f"the master's hooks waited {elapsed:.2f} s on the broker"
        written = status.read_status(tmp_path / "status.json")
        assert written["queues"]["a"]["sampled_at"] is None  # not sampled yet, and said so
        assert broker.calls == 1
    finally:
        broker.release.set()
        ops.on_stopped(snap, 0)
    wait_until(lambda: sampler.depths()["a"].visible == 4, 10)


def test_an_idle_queue_is_read_again_only_after_a_receive_or_the_idle_interval() -> None:
    broker = _Depths()
    broker.visible = {"a": 0, "a-dlq": 3}  # an empty queue with old dead letters
    sampler = sampler_of(broker)
    sampler.idle_interval = 600
    sampler.note_received({"a": 40})
    sampler.sample_once()
    assert broker.calls == 2  # the queue and its dead-letter queue
    assert sampler.depths()["a"].in_flight == 1  # _Depths reports one in flight: not idle
    sampler.sample_once()
    assert broker.calls == 4

    broker.in_flight = 0
    sampler.sample_once()  # empty now, and nothing received since the last sample
    assert broker.calls == 6
    for _ in range(3):
        sampler.sample_once()
    assert broker.calls == 6, "an idle queue was read again within the idle interval"
    assert sampler.depths()["a"].dead_letters == 3  # the last depths stand

    sampler.note_received({"a": 41})  # a child received a message: the queue moved
    sampler.sample_once()
    assert broker.calls == 8
    sampler.sample_once()
    assert broker.calls == 8

    sampler.idle_interval = 0  # the idle interval passed: read again, even with no receive
    sampler.sample_once()
    assert broker.calls == 10
