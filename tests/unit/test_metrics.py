"""The master's metrics: aggregation across child lifetimes, and the Prometheus text."""

from __future__ import annotations

import pytest

from ebsqs.stats import DURATION_BUCKETS, REJECTED, TaskStats
from ebsqs.supervisor.metrics import ChildGauge, ChildReport, MetricsRegistry
from tests import prometheus


def stats(succeeded: int = 0, failed: int = 0, retried: int = 0, *durations: float) -> TaskStats:
    result = TaskStats(succeeded=succeeded, failed=failed, retried=retried)
    for seconds in durations:
        result.observe(seconds)
    return result


def scrape(registry: MetricsRegistry, now: float = 0.0) -> dict[prometheus.Key, float]:
    return prometheus.parse(registry.render(now))


def succeeded(samples: dict[prometheus.Key, float], queue: str, task: str) -> float:
    return prometheus.value(samples, "ebsqs_tasks_succeeded_total", queue=queue, task=task)


# -- TaskStats ------------------------------------------------------------------------------


def test_durations_fall_in_inclusive_buckets() -> None:
    result = stats(0, 0, 0, 0.005, 0.0051, 7200.0, -1.0)
    assert result.buckets[0] == 2  # 0.005 itself and a clock that went backwards
    assert result.buckets[1] == 1
    assert result.buckets[-1] == 1
    assert result.duration_count == 4
    assert result.duration_sum == pytest.approx(7200.0101)


def test_task_stats_wire_form_round_trips() -> None:
    original = TaskStats(3, 1, 2, 1)
    original.observe(0.2)
    original.observe(0.2)
    wire = original.to_wire()
    assert len(wire) == 5 + 6  # trailing zero buckets are left out
    assert TaskStats.from_wire(wire) == original
    assert TaskStats.from_wire(TaskStats().to_wire()) == TaskStats()
    with pytest.raises(ValueError, match="fields"):
        TaskStats.from_wire([1, 2])


def test_task_stats_add_up() -> None:
    total = stats(1, 0, 0, 0.1) + stats(2, 1, 1, 0.1, 5.0)
    assert (total.succeeded, total.failed, total.retried) == (3, 1, 1)
    assert total.duration_count == 3


# -- aggregation ----------------------------------------------------------------------------


def test_live_reports_replace_each_other() -> None:
    registry = MetricsRegistry(["a"])
    registry.report(1, ChildReport("a", tasks={"t": stats(5)}))
    registry.report(1, ChildReport("a", tasks={"t": stats(8)}))
    assert succeeded(scrape(registry), "a", "t") == 8


def test_tasks_left_out_of_a_report_keep_their_counts() -> None:
    registry = MetricsRegistry(["a"])
    registry.report(1, ChildReport("a", receives=1, tasks={"t": stats(5), "u": stats(1)}))
    registry.report(1, ChildReport("a", receives=2, tasks={"u": stats(2)}))
    samples = scrape(registry)
    assert succeeded(samples, "a", "t") == 5
    assert succeeded(samples, "a", "u") == 2
    assert prometheus.value(samples, "ebsqs_receives_total", queue="a") == 2


def test_counters_survive_a_child_exit() -> None:
    registry = MetricsRegistry(["a"])
    registry.report(("a", 1, 100), ChildReport("a", receives=4, tasks={"t": stats(10, 1)}))
    registry.retire(("a", 1, 100))
    registry.report(("a", 1, 101), ChildReport("a", receives=2, tasks={"t": stats(3)}))
    samples = scrape(registry)
    assert succeeded(samples, "a", "t") == 13
    assert prometheus.value(samples, "ebsqs_tasks_failed_total", queue="a", task="t") == 1
    assert prometheus.value(samples, "ebsqs_receives_total", queue="a") == 6


def test_a_report_read_after_the_exit_counts_once() -> None:
    registry = MetricsRegistry()
    registry.report("child", ChildReport("a", tasks={"t": stats(10)}))
    registry.retire("child")
    registry.report("child", ChildReport("a", tasks={"t": stats(10)}))
    registry.retire("child")
    assert succeeded(scrape(registry), "a", "t") == 10


def test_children_of_several_queues_and_tasks_add_up() -> None:
    registry = MetricsRegistry(["a", "b"])
    registry.report(1, ChildReport("a", tasks={"t": stats(1), "u": stats(2)}))
    registry.report(2, ChildReport("a", tasks={"t": stats(3)}))
    registry.report(3, ChildReport("b", tasks={"t": stats(4)}))
    samples = scrape(registry)
    assert succeeded(samples, "a", "t") == 4
    assert succeeded(samples, "a", "u") == 2
    assert succeeded(samples, "b", "t") == 4


def test_queues_are_listed_before_any_report() -> None:
    registry = MetricsRegistry(["a"])
    samples = scrape(registry)
    assert ("ebsqs_receives_total", frozenset({("queue", "a")})) in samples
    assert ("ebsqs_child_restarts_total", frozenset({("queue", "a")})) in samples


def test_restarts_and_kills_are_counted() -> None:
    registry = MetricsRegistry(["a"])
    registry.count_restart("a")
    registry.count_restart("a")
    registry.count_kill("a", "hung")
    samples = scrape(registry)
    assert prometheus.value(samples, "ebsqs_child_restarts_total", queue="a") == 2
    assert prometheus.value(samples, "ebsqs_child_kills_total", queue="a", reason="hung") == 1


# -- exposition -----------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    registry = MetricsRegistry()
    registry.report(1, ChildReport("a", tasks={"t": stats(3, 0, 0, 0.003, 0.3, 30000.0)}))
    samples = scrape(registry)
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


def test_gauges_describe_the_live_children() -> None:
    registry = MetricsRegistry(["a"])
    registry.set_children(
        [
            ChildGauge("a", 1, "busy", 0.5, in_flight=2, running=1, rss=1000, at=10.0),
            ChildGauge("a", 2, "idle", 0.25, rss=2000, at=10.0),
        ]
    )
    samples = scrape(registry, now=11.0)
    assert prometheus.value(samples, "ebsqs_children", queue="a", state="busy") == 1
    assert prometheus.value(samples, "ebsqs_children", queue="a", state="idle") == 1
    assert prometheus.value(samples, "ebsqs_tasks_in_flight", queue="a") == 1
    assert prometheus.value(samples, "ebsqs_messages_held", queue="a") == 2
    age = "ebsqs_child_heartbeat_age_seconds"
    assert prometheus.value(samples, age, queue="a", slot="1") == 1.5
    assert prometheus.value(samples, age, queue="a", slot="2") == 1.25
    rss = "ebsqs_child_resident_memory_bytes"
    assert prometheus.value(samples, rss, queue="a", slot="2") == 2000


def test_label_values_are_escaped() -> None:
    registry = MetricsRegistry()
    registry.report(1, ChildReport("a", tasks={'odd"name\\x\n': stats(1), REJECTED: TaskStats()}))
    text = registry.render(0.0)
    assert 'task="odd\\"name\\\\x\\n"' in text
    samples = prometheus.parse(text)
    assert succeeded(samples, "a", 'odd"name\\x\n') == 1
    assert ("ebsqs_tasks_dead_lettered_total", frozenset({("queue", "a"), ("task", REJECTED)})) in (
        samples
    )


def test_every_family_has_help_and_type() -> None:
    registry = MetricsRegistry(["a"])
    registry.report(1, ChildReport("a", tasks={"t": stats(1, 0, 0, 0.1)}))
    lines = registry.render(0.0).splitlines()
    helps = {line.split()[2] for line in lines if line.startswith("# HELP ")}
    types = {line.split()[2] for line in lines if line.startswith("# TYPE ")}
    assert helps == types
    assert {"ebsqs_tasks_succeeded_total", "ebsqs_task_duration_seconds"} <= types
