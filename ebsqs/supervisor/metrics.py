"""Prometheus metrics for the supervisor: aggregated in the master, served as text over HTTP.

Children report *cumulative* counters in their heartbeats (see :class:`ChildReport`). The
master feeds every report to a :class:`MetricsRegistry`, which keeps the latest report of each
live child and, when a child exits, adds that last report to a retired total. A metric is the
retired total plus the live reports, so counters never go backwards when a child is recycled,
crashes or is replaced by a reload, and a dropped heartbeat loses nothing (the next one carries
the sum). What a child counted after its last heartbeat and before a SIGKILL is lost: at most
one heartbeat interval (a second) of work. Children send a last heartbeat when they exit on
their own, so graceful exits lose nothing.

The text format is Prometheus's exposition format 0.0.4, written here without a dependency.
:class:`MetricsServer` serves it from a thread of the master, on 127.0.0.1 unless told
otherwise: metrics name queues and tasks, which is not for the world to read.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from ebsqs.stats import DURATION_BUCKETS, TaskStats

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: How many exited children's keys are remembered, so a late report cannot count twice.
_RETIRED_MEMORY = 4096


@dataclass(frozen=True, slots=True)
class ChildReport:
    """What one child has counted since it started: cumulative, as its heartbeat carries it.

    Attributes:
        queue: the logical queue the child consumes.
        receives: receive calls.
        empty_receives: receive calls that returned nothing (an idle queue, not an error).
        received: messages received.
        extended: visibility extensions.
        tasks: per task name, outcome counts and durations.
    """

    queue: str
    receives: int = 0
    empty_receives: int = 0
    received: int = 0
    extended: int = 0
    tasks: Mapping[str, TaskStats] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChildGauge:
    """A live child's current values, for the gauges (taken from the master's snapshot).

    Attributes:
        queue: its queue.
        slot: its slot number within the queue.
        state: its state (``idle``, ``busy``, ``draining``, ``killing``...).
        heartbeat_age: seconds since its last heartbeat, as of ``at``.
        in_flight: messages it holds (running or fetched).
        running: tasks it is running.
        rss: resident memory in bytes.
        at: ``time.monotonic()`` when these values were taken.
    """

    queue: str
    slot: int
    state: str
    heartbeat_age: float
    in_flight: int = 0
    running: int = 0
    rss: int = 0
    at: float = field(default_factory=time.monotonic)


@dataclass
class _QueueTotals:
    receives: int = 0
    empty_receives: int = 0
    received: int = 0
    extended: int = 0
    tasks: dict[str, TaskStats] = field(default_factory=dict)

    def add(self, report: ChildReport | _QueueTotals) -> None:
        self.receives += report.receives
        self.empty_receives += report.empty_receives
        self.received += report.received
        self.extended += report.extended
        for name, stats in report.tasks.items():
            self.tasks[name] = self.tasks.get(name, TaskStats()) + stats


class MetricsRegistry:
    """The master's metrics: counters aggregated across children, gauges of the live ones.

    Fed from the master's loop (:meth:`report`, :meth:`retire`, :meth:`count_restart`,
    :meth:`count_kill`, :meth:`set_children`); read from the HTTP server's thread
    (:meth:`render`). A lock makes the two safe together.

    Child keys are anything hashable that names one child's life (its pid plus its spawn time,
    or the master's child object): never reuse a key for a new child.
    """

    def __init__(self, queues: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._live: dict[Hashable, ChildReport] = {}
        self._retired: dict[str, _QueueTotals] = {}
        self._retired_keys: deque[Hashable] = deque(maxlen=_RETIRED_MEMORY)
        self._restarts: dict[str, int] = {}
        self._kills: dict[tuple[str, str], int] = {}
        self._children: tuple[ChildGauge, ...] = ()
        self._queues: list[str] = []
        for queue in queues:
            self.add_queue(queue)

    def add_queue(self, queue: str) -> None:
        """Make ``queue``'s counters exist (at zero) before any child reports."""
        with self._lock:
            if queue not in self._queues:
                self._queues.append(queue)

    def report(self, key: Hashable, report: ChildReport) -> None:
        """A live child's latest cumulative counts.

        They replace its previous report, except that tasks the report leaves out keep their
        previous counts: a heartbeat with many tasks carries only some of them each time.
        """
        with self._lock:
            if key in self._retired_keys:
                return  # read from the pipe after the child was reaped: already counted
            previous = self._live.get(key)
            if previous is not None and previous.tasks.keys() - report.tasks.keys():
                report = replace(report, tasks={**previous.tasks, **report.tasks})
            self._live[key] = report
            if report.queue not in self._queues:
                self._queues.append(report.queue)

    def retire(self, key: Hashable) -> None:
        """The child exited: its last report joins the retired total, once."""
        with self._lock:
            report = self._live.pop(key, None)
            if report is not None:
                self._retired.setdefault(report.queue, _QueueTotals()).add(report)
            if key not in self._retired_keys:
                self._retired_keys.append(key)

    def count_restart(self, queue: str) -> None:
        """One unplanned replacement of a child of ``queue`` (a crash or a hang)."""
        with self._lock:
            self._restarts[queue] = self._restarts.get(queue, 0) + 1

    def count_kill(self, queue: str, reason: str) -> None:
        """The master killed a child of ``queue`` (``hung``, ``overdue``, ``drain_timeout``...)."""
        with self._lock:
            self._kills[(queue, reason)] = self._kills.get((queue, reason), 0) + 1

    def set_children(self, children: Iterable[ChildGauge]) -> None:
        """The live children's gauges, replacing the previous set (called each master tick)."""
        gauges = tuple(children)
        with self._lock:
            self._children = gauges

    def totals(self) -> dict[str, _QueueTotals]:
        """Per queue: retired totals plus every live child's latest report."""
        with self._lock:
            return self._totals()

    def _totals(self) -> dict[str, _QueueTotals]:
        totals: dict[str, _QueueTotals] = {queue: _QueueTotals() for queue in self._queues}
        for queue, retired in self._retired.items():
            totals.setdefault(queue, _QueueTotals()).add(retired)
        for report in self._live.values():
            totals.setdefault(report.queue, _QueueTotals()).add(report)
        return totals

    def render(self, now: float | None = None) -> str:
        """Every metric in Prometheus text format.

        Args:
            now: ``time.monotonic()``, to age the heartbeat gauges (default: the clock).
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            totals = self._totals()
            restarts = dict(self._restarts)
            kills = dict(self._kills)
            children = self._children
            queues = list(self._queues)
        lines: list[str] = []
        lines += _task_counters(totals)
        lines += _duration_histogram(totals)
        lines += _queue_counters(totals)
        lines += _family(
            "ebsqs_child_restarts_total",
            "counter",
            "Unplanned child replacements (crashes, hangs).",
            [({"queue": q}, restarts.get(q, 0)) for q in queues],
        )
        lines += _family(
            "ebsqs_child_kills_total",
            "counter",
            "Children the master killed, by reason.",
            [({"queue": q, "reason": r}, n) for (q, r), n in sorted(kills.items())],
        )
        lines += _child_gauges(children, queues, now)
        return "\n".join(lines) + "\n"


_TASK_COUNTERS = (
    ("succeeded", "Task attempts that succeeded."),
    ("failed", "Tasks that failed for good (no retry left, or not retryable)."),
    ("retried", "Retries scheduled."),
    ("dead_lettered", "Messages copied to the dead-letter queue (failed or rejected)."),
)

_QUEUE_COUNTERS = (
    ("ebsqs_receives_total", "receives", "Receive calls."),
    ("ebsqs_empty_receives_total", "empty_receives", "Receive calls that returned nothing."),
    ("ebsqs_messages_received_total", "received", "Messages received."),
    ("ebsqs_visibility_extensions_total", "extended", "Visibility timeout extensions."),
)


def _task_rows(totals: Mapping[str, _QueueTotals]) -> Iterator[tuple[str, str, TaskStats]]:
    for queue in sorted(totals):
        for task in sorted(totals[queue].tasks):
            yield queue, task, totals[queue].tasks[task]


def _task_counters(totals: Mapping[str, _QueueTotals]) -> list[str]:
    lines: list[str] = []
    for attribute, help_text in _TASK_COUNTERS:
        samples = [
            ({"queue": queue, "task": task}, getattr(stats, attribute))
            for queue, task, stats in _task_rows(totals)
        ]
        lines += _family(f"ebsqs_tasks_{attribute}_total", "counter", help_text, samples)
    return lines


def _duration_histogram(totals: Mapping[str, _QueueTotals]) -> list[str]:
    name = "ebsqs_task_duration_seconds"
    lines = [
        f"# HELP {name} Seconds task attempts ran.",
        f"# TYPE {name} histogram",
    ]
    for queue, task, stats in _task_rows(totals):
        labels = {"queue": queue, "task": task}
        cumulative = 0
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), stats.buckets, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else _number(bound)
            lines.append(_sample(f"{name}_bucket", {**labels, "le": le}, cumulative))
        lines.append(_sample(f"{name}_sum", labels, stats.duration_sum))
        lines.append(_sample(f"{name}_count", labels, cumulative))
    return lines


def _queue_counters(totals: Mapping[str, _QueueTotals]) -> list[str]:
    lines: list[str] = []
    for name, attribute, help_text in _QUEUE_COUNTERS:
        samples = [({"queue": q}, getattr(totals[q], attribute)) for q in sorted(totals)]
        lines += _family(name, "counter", help_text, samples)
    return lines


def _child_gauges(children: tuple[ChildGauge, ...], queues: list[str], now: float) -> list[str]:
    states: dict[tuple[str, str], int] = {}
    held: dict[str, int] = dict.fromkeys(queues, 0)
    running: dict[str, int] = dict.fromkeys(queues, 0)
    for child in children:
        states[(child.queue, child.state)] = states.get((child.queue, child.state), 0) + 1
        held[child.queue] = held.get(child.queue, 0) + child.in_flight
        running[child.queue] = running.get(child.queue, 0) + child.running
    by_slot = sorted(children, key=lambda c: (c.queue, c.slot))
    return [
        *_family(
            "ebsqs_children",
            "gauge",
            "Live children by state.",
            [({"queue": q, "state": s}, n) for (q, s), n in sorted(states.items())],
        ),
        *_family(
            "ebsqs_tasks_in_flight",
            "gauge",
            "Tasks running now.",
            [({"queue": q}, n) for q, n in sorted(running.items())],
        ),
        *_family(
            "ebsqs_messages_held",
            "gauge",
            "Messages children hold now (running or fetched).",
            [({"queue": q}, n) for q, n in sorted(held.items())],
        ),
        *_family(
            "ebsqs_child_heartbeat_age_seconds",
            "gauge",
            "Seconds since each child's last heartbeat.",
            [(_slot_labels(c), round(c.heartbeat_age + max(now - c.at, 0.0), 3)) for c in by_slot],
        ),
        *_family(
            "ebsqs_child_resident_memory_bytes",
            "gauge",
            "Each child's resident memory.",
            [(_slot_labels(c), c.rss) for c in by_slot],
        ),
    ]


def _slot_labels(child: ChildGauge) -> dict[str, str]:
    return {"queue": child.queue, "slot": str(child.slot)}


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]
) -> list[str]:
    return [
        f"# HELP {name} {help_text}",
        f"# TYPE {name} {kind}",
        *(_sample(name, labels, value) for labels, value in samples),
    ]


def _sample(name: str, labels: Mapping[str, str], value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    text = ",".join(f'{key}="{_escape(str(val))}"' for key, val in labels.items())
    return f"{name}{{{text}}} {_number(value)}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


# -- serving -------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/", "/metrics"):
            self.send_error(404)
            return
        try:
            body = self.server.render().encode()
        except Exception as exc:  # noqa: BLE001 - a scrape must not kill the server thread
            log.error("metrics_render_failed", error=repr(exc))
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], render: Callable[[], str]) -> None:
        super().__init__(address, _Handler)
        self.render = render


class MetricsServer:
    """Serves ``render()`` at ``/metrics`` from a daemon thread of the master.

    Runs in the master only: after a fork, the child closes its copy of the listening socket
    (an ``os.register_at_fork`` hook), so a port is never held by a child the master left.
    """

    def __init__(self, render: Callable[[], str], port: int, host: str = "127.0.0.1") -> None:
        self._render = render
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (useful when asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = self._address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def bind(self) -> None:
        """Bind the address (in the master, early: a port in use fails the start).

        Raises:
            OSError: the address cannot be bound (in use, not permitted).
        """
        self._server = _Server(self._address, self._render)
        os.register_at_fork(after_in_child=self._close_in_child)

    def serve(self) -> None:
        """Answer scrapes from a daemon thread (binding first if :meth:`bind` was not called).

        The thread holds no lock across a fork that a child would need: it waits in
        ``select`` between scrapes, and a scrape only takes the registry's lock, which children
        never use.
        """
        if self._server is None:
            self.bind()
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ebsqs-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics_serving", url=self.url)

    def _close_in_child(self) -> None:
        """After a fork, in the child: drop the inherited listening socket (no thread runs it)."""
        if self._server is not None:
            self._server.socket.close()
            self._server = None

    def stop(self) -> None:
        """Stop serving and close the socket (in the master, at exit)."""
        if self._server is None:
            return
        if self._thread is not None:
            self._server.shutdown()
        self._server.server_close()
        self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
