"""Prometheus metrics for the supervisor: read from the master's snapshot, served over HTTP.

Every count comes from the master's one lifetime total (:class:`~ebsqs.counters.Counters` per
queue in :class:`~ebsqs.supervisor.snapshot.SupervisorSnapshot`): children report cumulative
counters in their heartbeats, and the master adds the last report of each exited child to a
retired total, so counters never go backwards when a child is recycled, crashes or is replaced
by a reload, and a dropped heartbeat loses nothing (the next one carries the sum). What a child
counted after its last heartbeat and before a SIGKILL is lost: at most one heartbeat interval
(a second) of work. Children send a last heartbeat when they exit on their own, so graceful
exits lose nothing.

Every configured queue has every counter family from the start, at zero, and
``ebsqs_children`` a sample per state (:data:`CHILD_STATES`), so rates and alerts never meet a
missing series. ``ebsqs_build_info`` names the ebsqs and Python versions. Queue depth
(``ebsqs_queue_messages``, ``ebsqs_dead_letter_messages``) comes from the master's
:class:`~ebsqs.ops.depth.DepthSampler`, with the time of its last good sample and a staleness
flag.

The metric families follow from the counter fields (:data:`~ebsqs.counters.TASK_COUNTERS`,
:data:`~ebsqs.counters.QUEUE_COUNTERS`): a counter added there appears here with no change.

The text format is Prometheus's exposition format 0.0.4, written here without a dependency.
:class:`MetricsServer` serves it from a thread of the master, on 127.0.0.1 unless told
otherwise: metrics name queues and tasks, which is not for the world to read.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ebsqs.counters import DURATION_BUCKETS, QUEUE_COUNTERS, TASK_COUNTERS, Counters, TaskStats
from ebsqs.log import get_logger
from ebsqs.ops.depth import QueueDepth
from ebsqs.supervisor.snapshot import ChildSnapshot, KillReason, Phase, SupervisorSnapshot

log = get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Every state ``ebsqs_children`` reports, at 0 when no child is in it: the master's phases,
#: and a consuming child's own states (see :func:`_state`).
CHILD_STATES = ("booting", "idle", "busy", "degraded", "retiring", "killing")


@dataclass(frozen=True, slots=True)
class _Taken:
    snapshot: SupervisorSnapshot
    at: float  # time.monotonic() when the snapshot was taken


class Metrics:
    """The master's metrics: the latest snapshot, rendered on each scrape.

    Fed from the master's loop (:meth:`update`, about once a second); read from the HTTP
    server's thread (:meth:`render`). Snapshots are frozen, so handing one over is safe.
    """

    def __init__(self, depths: Callable[[], Mapping[str, QueueDepth]] | None = None) -> None:
        """``depths``: the queues' latest depths (:meth:`DepthSampler.depths`), if sampled."""
        self._taken: _Taken | None = None
        self._lock = threading.Lock()
        self.depths = depths

    def update(self, snapshot: SupervisorSnapshot, at: float | None = None) -> None:
        """Serve ``snapshot`` from now on (``at``: when it was taken, monotonic)."""
        taken = _Taken(snapshot, time.monotonic() if at is None else at)
        with self._lock:
            self._taken = taken

    def render(self, now: float | None = None) -> str:
        """Every metric in Prometheus text format (nothing before the first snapshot).

        Args:
            now: ``time.monotonic()``, to age the heartbeat gauges (default: the clock).
        """
        with self._lock:
            taken = self._taken
        if taken is None:
            return ""
        now = time.monotonic() if now is None else now
        depths = self.depths() if self.depths is not None else None
        return render(taken.snapshot, max(now - taken.at, 0.0), depths)


def render(
    snapshot: SupervisorSnapshot,
    age: float = 0.0,
    depths: Mapping[str, QueueDepth] | None = None,
) -> str:
    """``snapshot`` in Prometheus text format.

    Every configured queue has every counter family from the start (at zero), and every child
    state its gauge, so a rate or an alert never meets a missing series.

    Args:
        snapshot: the master's snapshot.
        age: seconds since it was taken.
        depths: the queues' depths from the master's sampler (:mod:`ebsqs.ops.depth`), if any.
    """
    totals = {**{q: Counters() for q in snapshot.targets}, **snapshot.queue_counts}
    lines: list[str] = _family(
        "ebsqs_build_info",
        "gauge",
        "The running ebsqs and Python versions (always 1).",
        [({"version": _version(), "python": platform.python_version()}, 1)],
    )
    lines += _task_counters(totals)
    lines += _duration_histogram(totals)
    lines += _queue_counters(totals)
    restarts = {**dict.fromkeys(totals, 0), **snapshot.queue_restarts}
    lines += _family(
        "ebsqs_child_restarts_total",
        "counter",
        "Unplanned child replacements (crashes, hangs).",
        [({"queue": q}, n) for q, n in sorted(restarts.items())],
    )
    kills = {(q, r): 0 for q in totals for r in KillReason}
    kills.update(snapshot.kills)
    lines += _family(
        "ebsqs_child_kills_total",
        "counter",
        "Children the master killed, by reason.",
        [({"queue": q, "reason": str(r)}, n) for (q, r), n in sorted(kills.items())],
    )
    lines += _child_gauges(snapshot, age)
    if depths is not None:
        lines += _depth_gauges(depths)
    return "\n".join(lines) + "\n"


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("ebsqs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _depth_gauges(depths: Mapping[str, QueueDepth]) -> list[str]:
    rows = [depths[q] for q in sorted(depths)]
    return [
        *_family(
            "ebsqs_queue_messages",
            "gauge",
            "Messages in each queue by state, as the broker reports them (sampled every 15 s).",
            [
                ({"queue": d.queue, "state": state}, value)
                for d in rows
                for state, value in (
                    ("visible", d.visible),
                    ("in_flight", d.in_flight),
                    ("delayed", d.delayed),
                )
            ],
        ),
        *_family(
            "ebsqs_dead_letter_messages",
            "gauge",
            "Messages in each queue's dead-letter queue (sampled every 15 s).",
            [({"queue": d.queue}, d.dead_letters) for d in rows if d.dead_letters is not None],
        ),
        *_family(
            "ebsqs_queue_depth_sampled_timestamp_seconds",
            "gauge",
            "Unix time of each queue's last good depth sample (0: none yet).",
            [({"queue": d.queue}, round(d.sampled_at, 3)) for d in rows],
        ),
        *_family(
            "ebsqs_queue_depth_stale",
            "gauge",
            "1 while the latest depth sample failed (the depths shown are older).",
            [({"queue": d.queue}, int(d.stale)) for d in rows],
        ),
    ]


def _task_rows(totals: Mapping[str, Counters]) -> Iterator[tuple[str, str, TaskStats]]:
    for queue in sorted(totals):
        for task in sorted(totals[queue].tasks):
            yield queue, task, totals[queue].tasks[task]


def _task_counters(totals: Mapping[str, Counters]) -> list[str]:
    lines: list[str] = []
    for item in TASK_COUNTERS:
        samples = [
            ({"queue": queue, "task": task}, getattr(stats, item.name))
            for queue, task, stats in _task_rows(totals)
        ]
        lines += _family(item.metric, "counter", item.help, samples)
    return lines


def _duration_histogram(totals: Mapping[str, Counters]) -> list[str]:
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


def _queue_counters(totals: Mapping[str, Counters]) -> list[str]:
    lines: list[str] = []
    for item in QUEUE_COUNTERS:
        samples = [({"queue": q}, getattr(totals[q], item.name)) for q in sorted(totals)]
        lines += _family(item.metric, "counter", item.help, samples)
    return lines


def _state(child: ChildSnapshot) -> str:
    """A running child's own state (idle, busy...), else the master's phase for it."""
    return child.state if child.phase is Phase.RUNNING else str(child.phase)


def _child_gauges(snapshot: SupervisorSnapshot, age: float) -> list[str]:
    queues = list(snapshot.targets)
    children = snapshot.children
    states = {(q, s): 0 for q in queues for s in CHILD_STATES}
    held: dict[str, int] = dict.fromkeys(queues, 0)
    running: dict[str, int] = dict.fromkeys(queues, 0)
    for child in children:
        key = (child.queue, _state(child))
        states[key] = states.get(key, 0) + 1
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
            [(_slot_labels(c), round(c.heartbeat_age + age, 3)) for c in by_slot],
        ),
        *_family(
            "ebsqs_child_resident_memory_bytes",
            "gauge",
            "Each child's resident memory.",
            [(_slot_labels(c), c.rss) for c in by_slot],
        ),
    ]


def _slot_labels(child: ChildSnapshot) -> dict[str, str]:
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
