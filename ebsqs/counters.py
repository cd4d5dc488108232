"""The one count model: what a worker counted, from its loop to Prometheus.

A worker process keeps one :class:`Counters`: queue-level counts (receives, extensions...) and,
per task name, a :class:`TaskStats` of outcomes and durations. The numbers are cumulative over
the process's life, so a report that is lost (a dropped heartbeat) loses nothing: the next one
carries the sum. The same type travels unchanged in heartbeats (:meth:`Counters.to_wire`), is
added up by the supervisor's master into one lifetime total per queue (children past and
present), and is what ``ebsqs status``, systemd's ``STATUS=`` line and the metrics read.

Adding a counter is a one-place change: declare a field with :func:`counter` on
:class:`TaskStats` (per task) or :class:`Counters` (per queue). The heartbeat, the master's
totals, the status document and the metric ``ebsqs_tasks_<name>_total`` (or the metric name
given) all follow from the field.

This is core code: it knows nothing of the supervisor or of Prometheus.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

#: Upper bounds (seconds) of the duration histogram's buckets; one more bucket holds the rest.
#: Spread from 5 ms to an hour: queue tasks range from quick writes to long reports.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

#: The task name under which messages are counted that never named a runnable task
#: (undecodable, unknown task, bad signature): they are dead-lettered without running.
REJECTED = "<rejected>"


def counter(help_text: str, metric: str | None = None) -> Any:
    """Declare a cumulative counter field (an ``int`` starting at 0).

    Args:
        help_text: the metric's ``# HELP`` text.
        metric: the Prometheus name; by default ``ebsqs_tasks_<field>_total`` on
            :class:`TaskStats` and ``ebsqs_<field>_total`` on :class:`Counters`.
    """
    return field(default=0, metadata={"help": help_text, "metric": metric})


@dataclass(frozen=True, slots=True)
class CounterField:
    """One declared counter: its attribute name, metric name and help text."""

    name: str
    metric: str
    help: str


def _declared(cls: type, default_metric: str) -> tuple[CounterField, ...]:
    return tuple(
        CounterField(
            f.name, f.metadata["metric"] or default_metric.format(f.name), f.metadata["help"]
        )
        for f in fields(cls)
        if "help" in f.metadata
    )


def _zero_buckets() -> list[int]:
    return [0] * (len(DURATION_BUCKETS) + 1)


@dataclass
class TaskStats:
    """One task's outcomes and durations, cumulative.

    Attributes:
        succeeded: attempts that succeeded.
        failed: tasks that failed for good (no retry left, or not retryable).
        retried: retries scheduled (one per failed attempt that will run again).
        dead_lettered: dead-letter copies sent (failed tasks and rejected messages).
        timed_out: attempts stopped at a time limit (each is also retried or failed).
        deferred: messages a middleware put back for later (rate and concurrency limits).
        crashed: attempts whose process died while running them (the message is redelivered).
        redelivered: attempts whose environment failed (a dropped database connection): the
            message is redelivered without using an attempt, as after a crash.
        skipped: duplicate deliveries of a unique task that already completed, acked unrun.
        buckets: how many attempts ran within each :data:`DURATION_BUCKETS` bound (not
            cumulative: ``buckets[i]`` counts durations in ``(bound[i-1], bound[i]]``); the
            last entry counts longer ones.
        duration_sum: total seconds of all counted attempts.
    """

    succeeded: int = counter("Task attempts that succeeded.")
    failed: int = counter("Tasks that failed for good (no retry left, or not retryable).")
    retried: int = counter("Retries scheduled.")
    dead_lettered: int = counter("Messages copied to the dead-letter queue (failed or rejected).")
    timed_out: int = counter("Task attempts stopped at a time limit (then retried or failed).")
    deferred: int = counter("Messages a middleware deferred (released with a delay).")
    crashed: int = counter("Attempts whose process died under them (redelivered, not failed).")
    redelivered: int = counter(
        "Attempts whose environment failed (a dropped database connection): redelivered."
    )
    # New counters go last: the wire format is positional (see from_wire).
    skipped: int = counter("Duplicate deliveries of completed tasks, acked without running.")
    buckets: list[int] = field(default_factory=_zero_buckets)
    duration_sum: float = 0.0

    @property
    def attempts(self) -> int:
        """Attempts whose duration was observed."""
        return sum(self.buckets)

    def observe(self, seconds: float) -> None:
        """Count one attempt's duration."""
        seconds = max(seconds, 0.0)
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def __add__(self, other: TaskStats) -> TaskStats:
        summed = TaskStats(
            buckets=[a + b for a, b in zip(self.buckets, other.buckets, strict=True)],
            duration_sum=self.duration_sum + other.duration_sum,
        )
        for item in TASK_COUNTERS:
            setattr(summed, item.name, getattr(self, item.name) + getattr(other, item.name))
        return summed

    def to_wire(self) -> list[Any]:
        """A compact JSON-able form for heartbeats: the counters, the sum, then the buckets.

        Trailing zero buckets are left out, so a task that always runs fast costs a few bytes.
        The counters go first in their declared order; see :meth:`from_wire`.
        """
        buckets = list(self.buckets)
        while buckets and buckets[-1] == 0:
            buckets.pop()
        head = [getattr(self, item.name) for item in TASK_COUNTERS]
        return [len(head), *head, round(self.duration_sum, 6), *buckets]

    @classmethod
    def from_wire(cls, values: Sequence[Any]) -> TaskStats:
        """The inverse of :meth:`to_wire`. The wire says how many counters it carries, so a
        child running newer code (a reload) that counts more is read up to what this knows.

        Raises:
            ValueError: not a list written by :meth:`to_wire`.
        """
        if not values or not isinstance(values[0], int) or len(values) < values[0] + 2:
            raise ValueError("task stats are not in the wire format")
        count = values[0]
        buckets = [int(v) for v in values[count + 2 :]]
        if len(buckets) > len(DURATION_BUCKETS) + 1:
            raise ValueError(f"task stats have {len(buckets)} buckets")
        stats = cls(
            buckets=buckets + [0] * (len(DURATION_BUCKETS) + 1 - len(buckets)),
            duration_sum=float(values[count + 1]),
        )
        for item, value in zip(TASK_COUNTERS, values[1 : count + 1], strict=False):
            setattr(stats, item.name, int(value))
        return stats


@dataclass
class Counters:
    """Everything one worker counted since it started (or a sum of such).

    Attributes:
        receives: receive calls.
        empty_receives: receive calls that returned nothing (an idle queue, not an error).
        received: messages received.
        extended: visibility extensions.
        receive_errors: receive calls that failed (of which some were throttled or KMS errors).
        throttled: broker calls refused for throttling (``RequestThrottled``, ``OverLimit``...).
        kms_errors: broker calls that failed on the queue's KMS key.
        ack_errors: deletes that failed.
        log_dropped: log lines the process could not write (a full disk, a closed pipe).
        tasks: per task name, outcomes and durations.
    """

    receives: int = counter("Receive calls.")
    empty_receives: int = counter("Receive calls that returned nothing.")
    received: int = counter("Messages received.", metric="ebsqs_messages_received_total")
    extended: int = counter("Visibility timeout extensions.", "ebsqs_visibility_extensions_total")
    receive_errors: int = counter("Receive calls that failed.")
    throttled: int = counter("Broker calls refused for throttling or over a limit.")
    kms_errors: int = counter("Broker calls that failed on the queue's KMS key.")
    ack_errors: int = counter("Deletes that failed (the message will be delivered again).")
    log_dropped: int = counter(
        "Log lines dropped because the log output failed.", "ebsqs_log_lines_dropped_total"
    )
    tasks: dict[str, TaskStats] = field(default_factory=dict)

    def task(self, name: str) -> TaskStats:
        """The stats of task ``name``, created at zero on first use."""
        stats = self.tasks.get(name)
        if stats is None:
            stats = self.tasks[name] = TaskStats()
        return stats

    def total(self, name: str) -> int:
        """One :class:`TaskStats` counter summed over every task (``total("succeeded")``)."""
        # A copy first: the loop's thread may add a task while another thread reads.
        return sum(getattr(stats, name) for stats in list(self.tasks.values()))

    def totals(self) -> dict[str, int]:
        """Every task counter summed over tasks, by name (``succeeded``, ``failed``...)."""
        return {item.name: self.total(item.name) for item in TASK_COUNTERS}

    def flat(self) -> dict[str, int]:
        """Every counter by name: the task counters summed over tasks, then the queue's."""
        return {**self.totals(), **{item.name: getattr(self, item.name) for item in QUEUE_COUNTERS}}

    @property
    def finished(self) -> int:
        """Tasks that ran to an end (succeeded or failed for good)."""
        return self.total("succeeded") + self.total("failed")

    @property
    def attempts(self) -> int:
        """Attempts run, whatever their outcome."""
        return sum(stats.attempts for stats in list(self.tasks.values()))

    def __add__(self, other: Counters) -> Counters:
        summed = Counters(tasks=dict(self.tasks))
        for item in QUEUE_COUNTERS:
            setattr(summed, item.name, getattr(self, item.name) + getattr(other, item.name))
        for name, stats in other.tasks.items():
            mine = summed.tasks.get(name)
            summed.tasks[name] = stats + mine if mine is not None else stats + TaskStats()
        return summed

    def updated(self, newer: Counters) -> Counters:
        """``newer`` (a later report of the same worker), keeping the tasks it leaves out: a
        heartbeat carries only some tasks' stats when there are many."""
        if not self.tasks.keys() - newer.tasks.keys():
            return newer
        merged = Counters(tasks={**self.tasks, **newer.tasks})
        for item in QUEUE_COUNTERS:
            setattr(merged, item.name, getattr(newer, item.name))
        return merged

    def queue_wire(self) -> list[int]:
        """The queue-level counters for a heartbeat, in declared order."""
        return [getattr(self, item.name) for item in QUEUE_COUNTERS]

    def task_wire(self) -> Iterator[tuple[str, list[Any]]]:
        """``(name, TaskStats.to_wire())`` per task, sorted by name."""
        for name, stats in sorted(list(self.tasks.items()), key=lambda item: item[0]):
            yield name, stats.to_wire()

    @classmethod
    def from_wire(cls, queue: Sequence[Any], tasks: Mapping[str, Any] | None) -> Counters:
        """Counters from a heartbeat's two parts; malformed task entries are skipped.

        Raises:
            ValueError: the queue-level part is not a list of integers.
        """
        counters = cls()
        for item, value in zip(QUEUE_COUNTERS, queue, strict=False):
            setattr(counters, item.name, int(value))
        for name, wire in (tasks or {}).items():
            try:
                counters.tasks[str(name)] = TaskStats.from_wire(wire)
            except (TypeError, ValueError):
                continue
        return counters


#: The per-task counters, in declared order (the wire order).
TASK_COUNTERS: tuple[CounterField, ...] = _declared(TaskStats, "ebsqs_tasks_{}_total")
#: The queue-level counters, in declared order (the wire order).
QUEUE_COUNTERS: tuple[CounterField, ...] = _declared(Counters, "ebsqs_{}_total")
