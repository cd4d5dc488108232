"""What each page shows, as rows: queues, workers and tasks. No web framework here.

- Queues: :func:`read_depths` reads each configured queue and its dead-letter queue from the
  broker (the poller of :mod:`ebsqs.dashboard.history` calls it), :func:`queue_rows` turns the
  history into rows.
- Workers and tasks: from masters' status documents (:func:`ebsqs.ops.status.document`), one
  per master: the local status files without Django (:func:`status_documents`), the
  ``MasterSnapshot`` table with it (:mod:`ebsqs.contrib.django.publish`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebsqs.brokers import Broker
from ebsqs.config import Settings
from ebsqs.counters import DURATION_BUCKETS, TaskStats
from ebsqs.dashboard.history import History, Sample, backlog_age
from ebsqs.errors import EbsqsError, QueueDoesNotExist
from ebsqs.ops.status import StatusError, find_status_files, read_status

#: Seconds after which a master's document counts as stale (it publishes every few seconds).
STALE_AFTER = 30.0


# -- queues ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One configured queue on the queues page."""

    queue: str
    physical: str
    dead_letter_queue: str
    latest: Sample | None
    waiting_for: tuple[float, bool] | None
    trend: tuple[int, ...]


def read_depths(
    broker: Broker, settings: Settings, queues: Sequence[str], now: float
) -> dict[str, Sample]:
    """One :class:`Sample` per logical queue: two broker calls each (queue, dead-letter queue).

    A queue that cannot be read gets a sample carrying the error, so one broken queue does not
    blank the page.
    """
    found: dict[str, Sample] = {}
    for queue in queues:
        try:
            stats = broker.stats(settings.physical_queue(queue))
            try:
                dead: int | None = broker.stats(settings.dead_letter_queue(queue)).visible
            except QueueDoesNotExist:
                dead = None
            found[queue] = Sample(now, stats.visible, stats.in_flight, stats.delayed, dead)
        except EbsqsError as exc:
            found[queue] = Sample(now, error=f"{type(exc).__name__}: {exc}")
    return found


def queue_rows(
    settings: Settings, queues: Sequence[str], history: History, now: float | None = None
) -> list[QueueRow]:
    """The queues page's rows from the poller's history."""
    now = time.time() if now is None else now
    rows = []
    for queue in queues:
        samples = history.samples(queue)
        rows.append(
            QueueRow(
                queue=queue,
                physical=settings.physical_queue(queue),
                dead_letter_queue=settings.dead_letter_queue(queue),
                latest=samples[-1] if samples else None,
                waiting_for=backlog_age(samples, now),
                trend=tuple(s.visible for s in samples),
            )
        )
    return rows


# -- workers -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChildRow:
    """One child of a master."""

    queue: str
    slot: int
    pid: int
    state: str
    task: str | None
    running_for: float | None
    succeeded: int
    failed: int
    retried: int
    rss: int
    restarts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class MasterRow:
    """One supervisor: its master and children, from its latest document."""

    host: str
    pid: int
    state: str
    age: float
    stale: bool
    uptime: float
    succeeded: int
    failed: int
    retried: int
    restarts: int
    children: tuple[ChildRow, ...]


def status_documents(sources: Sequence[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """The documents of the status files named by ``sources`` (files, or directories of
    ``*.json`` files), or of the default places (see :func:`find_status_files`) without any.

    Returns the documents (each with ``host`` set to this host) and a line per file that could
    not be read.
    """
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            paths += sorted(p for p in path.glob("*.json") if not p.name.startswith("."))
        else:
            paths.append(path)
    if not sources:
        paths = find_status_files()
    documents, problems = [], []
    host = socket.gethostname()
    for path in paths:
        try:
            documents.append({"host": host, **read_status(path)})
        except StatusError as exc:
            problems.append(str(exc))
    return documents, problems


def master_rows(
    documents: Iterable[Mapping[str, Any]], now: float | None = None
) -> list[MasterRow]:
    """One :class:`MasterRow` per document, by host and pid."""
    now = time.time() if now is None else now
    rows = [_master_row(doc, now) for doc in documents]
    return sorted(rows, key=lambda row: (row.host, row.pid))


def _master_row(doc: Mapping[str, Any], now: float) -> MasterRow:
    master, counts = doc["master"], doc.get("counts", {})
    age = max(now - float(doc["written_at"]), 0.0)
    return MasterRow(
        host=str(doc.get("host", "?")),
        pid=int(master["pid"]),
        state=str(master["state"]),
        age=age,
        stale=age > STALE_AFTER,
        uptime=float(master["uptime"]) + age,
        succeeded=int(counts.get("succeeded", 0)),
        failed=int(counts.get("failed", 0)),
        retried=int(counts.get("retried", 0)),
        restarts=int(doc.get("restarts", 0)),
        children=tuple(_child_row(child) for child in doc.get("children", [])),
    )


def _child_row(child: Mapping[str, Any]) -> ChildRow:
    task, counts = child.get("task"), child.get("counts", {})
    state = child["state"] if child["phase"] == "running" else f"{child['state']}/{child['phase']}"
    return ChildRow(
        queue=str(child["queue"]),
        slot=int(child["slot"]),
        pid=int(child["pid"]),
        state=str(state),
        task=str(task["name"]) if task else None,
        running_for=task.get("running_for") if task else None,
        succeeded=int(counts.get("succeeded", 0)),
        failed=int(counts.get("failed", 0)),
        retried=int(counts.get("retried", 0)),
        rss=int(child.get("rss", 0)),
        restarts=int(child.get("restarts", 0)),
        last_error=child.get("last_error"),
    )


# -- tasks -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One task's totals over every master shown.

    Attributes:
        per_minute: tasks finished a minute, averaged over each master's uptime, summed.
        failure_rate: failed / (succeeded + failed), or None before any finished.
        p50: median attempt duration (seconds), from the duration histogram, or None.
        p95: 95th percentile, the same way.
    """

    name: str
    succeeded: int
    failed: int
    retried: int
    dead_lettered: int
    attempts: int
    per_minute: float
    failure_rate: float | None
    p50: float | None
    p95: float | None


def task_rows(documents: Iterable[Mapping[str, Any]]) -> list[TaskRow]:
    """Per task name, the masters' lifetime totals added up (a document without per-task
    totals, from an older ebsqs, adds nothing)."""
    totals: dict[str, TaskStats] = {}
    rates: dict[str, float] = {}
    for doc in documents:
        uptime = max(float(doc["master"]["uptime"]), 1.0)
        for name, wire in (doc.get("tasks") or {}).items():
            try:
                stats = TaskStats.from_wire(wire)
            except (TypeError, ValueError):
                continue
            totals[name] = totals[name] + stats if name in totals else stats
            rates[name] = rates.get(name, 0.0) + 60.0 * (stats.succeeded + stats.failed) / uptime
    return [_task_row(name, stats, rates[name]) for name, stats in sorted(totals.items())]


def _task_row(name: str, stats: TaskStats, per_minute: float) -> TaskRow:
    finished = stats.succeeded + stats.failed
    return TaskRow(
        name=name,
        succeeded=stats.succeeded,
        failed=stats.failed,
        retried=stats.retried,
        dead_lettered=stats.dead_lettered,
        attempts=stats.attempts,
        per_minute=per_minute,
        failure_rate=stats.failed / finished if finished else None,
        p50=percentile(stats.buckets, 0.50),
        p95=percentile(stats.buckets, 0.95),
    )


def percentile(buckets: Sequence[int], fraction: float) -> float | None:
    """The ``fraction`` quantile of a :data:`DURATION_BUCKETS` histogram, interpolated
    linearly within its bucket (as Prometheus's ``histogram_quantile`` does); the open last
    bucket answers its lower bound. None for an empty histogram."""
    total = sum(buckets)
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(DURATION_BUCKETS):
                return DURATION_BUCKETS[-1]
            low = DURATION_BUCKETS[index - 1] if index else 0.0
            high = DURATION_BUCKETS[index]
            return low + (high - low) * (rank - seen) / count
        seen += count
    return DURATION_BUCKETS[-1]
