"""ebsqs against plain boto3 loops at real SQS latency, and what it costs while idle.

Every consumer talks to fauxqs through ``benchmarks.counting_proxy``: at "0 ms" a proxy that adds
nothing, at "15 ms" one that holds each request 15 ms on the way in and 15 ms on the way out
(about 30 ms a round trip, as SQS answers). ebsqs and the plain loop always go through the same
proxy, so both pay its cost. Queues are filled and watched directly, not through the proxy.
Measured in one run, ratios of medians, the kinds alternating ABC CBA within each leg:

(a) One ``ebsqs worker`` (inline executor, no-op tasks, ``--max-tasks`` so it exits when done)
    against one ``benchmarks.plain`` loop, at 0 and 15 ms, with the default logging (info, JSON,
    into /dev/null) and with ``--log-level warning``; throughput and CPU per task, measured from
    outside as ``benchmarks.worker`` does (from the queue first seen being consumed to first
    seen empty).
(b) ``ebsqs supervise --queues q:4`` against four plain loops at once, at 0 and 15 ms, both log
    levels; the middle 80 % of each drain, as ``benchmarks.supervisor`` measures it.
(c) Scale-out at 15 ms: two supervisors on one queue, each its own process tree with its own
    ``--status-file`` and ``--pidfile`` (two "hosts"), against one, timed from when 10 % are gone
    and every child of every host is up to when 90 % are gone; every task appends its argument
    to a ledger file, and duplicates and gaps are counted from it once the queue is empty.
(d) Idle cost: ``supervise --queues q:4`` on an empty queue, through the 15 ms proxy, for a
    minute once its children are up: SQS requests per idle queue per host per minute.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks import VERBOSE, Drain, Result, median_drain, report
from benchmarks import supervisor as sup
from benchmarks.counting_proxy import RequestCounter, counting_proxy
from benchmarks.tasks import LEDGER_VARIABLE, record
from benchmarks.worker import ROOT, Bench
from benchmarks.worker import Scale as WorkerScale
from ebsqs.envelope import Envelope, encode

#: Seconds the proxy adds each way for the "real SQS" leg: a 30 ms round trip.
SQS_DELAY = 0.015
#: Seconds after the children are up before the idle window opens: start-up requests
#: (GetQueueUrl, the first receives) stay out of it.
IDLE_SETTLE = 3.0
#: Consumer kinds of (a) and (b): "default" is info logs (JSON, into /dev/null).
LOG_LEVELS = {"default": "info", "warning": "warning"}


@dataclass(frozen=True, slots=True)
class Scale:
    """How big a run is."""

    #: Messages per drain at 0 ms and at 15 ms, one process and four.
    single: tuple[int, int]
    group: tuple[int, int]
    rounds: int
    scale_out_tasks: int
    idle_seconds: float
    #: Messages per run of :func:`in_one_process`.
    in_process: int


#: At 0 ms a drain must last seconds, not one: four children start one after the other, and a
#: 5,000-message window of 1.3 s charged their start-up to the tasks (1.5x the plain loops' CPU
#: per task, against 1.2x over 20,000).
#: Three rounds: on a shared 2-core machine one run in six came out 20 % slow, and the median
#: of two is their mean.
FULL = Scale(
    single=(10_000, 2000),
    group=(20_000, 3000),
    rounds=3,
    scale_out_tasks=20_000,
    idle_seconds=60,
    in_process=5000,
)
QUICK = Scale(
    single=(1000, 300),
    group=(2000, 600),
    rounds=1,
    scale_out_tasks=4000,
    idle_seconds=20,
    in_process=500,
)


@dataclass(frozen=True, slots=True)
class Leg:
    """One latency: the proxy every consumer of this leg talks to."""

    endpoint: str
    delay: float
    proxy: str
    counter: RequestCounter

    @property
    def label(self) -> str:
        return f"{self.delay * 1000:.0f} ms"

    def bench(self, messages: int) -> Bench:
        """Queues of ``messages`` no-op bodies, consumed through this leg's proxy."""
        bench = Bench(self.endpoint, WorkerScale(messages=messages, rounds=0, enqueue_rounds=0))
        bench.env = {**bench.env, "AWS_ENDPOINT_URL_SQS": self.proxy}
        return bench

    def through(self, measure: Callable[[], Drain]) -> Callable[[], Drain]:
        """``measure``, checking that its consumers did talk through the proxy."""

        def checked() -> Drain:
            before = sum(self.counter.snapshot().values())
            drain = measure()
            seen = sum(self.counter.snapshot().values()) - before
            if seen < math.ceil(drain.messages / 10):  # one receive per ten at the very least
                raise RuntimeError(f"only {seen} requests went through the {self.label} proxy")
            return drain

        return checked


@contextmanager
def leg(endpoint: str, delay: float) -> Iterator[Leg]:
    with counting_proxy(endpoint, delay=delay) as (proxy, counter):
        yield Leg(endpoint, delay, proxy, counter)


def alternate(runners: dict[str, Callable[[], Drain]], rounds: int) -> dict[str, Drain]:
    """Run every kind ``rounds`` times, ABC then CBA, so drift hits each alike; the medians."""
    runs: dict[str, list[Drain]] = {label: [] for label in runners}
    labels = list(runners)
    for number in range(rounds):
        for label in labels if number % 2 == 0 else labels[::-1]:
            measured = runners[label]()
            runs[label].append(measured)
            report(label, measured)
    return {label: median_drain(drains) for label, drains in runs.items()}


# -- (a) and (b) -----------------------------------------------------------------------------


def one_process(lap: Leg, messages: int, rounds: int) -> dict[str, Drain]:
    """One ``ebsqs worker`` (both log levels) and one plain loop."""
    bench = lap.bench(messages)
    runners = {"plain": lap.through(bench.plain_consumer)}
    for kind, level in LOG_LEVELS.items():
        runners[kind] = lap.through(lambda level=level: bench.worker(level))
    return alternate(runners, rounds)


def four_processes(lap: Leg, messages: int, rounds: int) -> dict[str, Drain]:
    """``supervise`` with four children (both log levels) and four plain loops."""
    bench = lap.bench(messages)
    total = str(messages)

    def plain_loops(name: str, url: str) -> list[list[str]]:
        return [[sys.executable, "-m", "benchmarks.plain", "consume", url, total]] * sup.CHILDREN

    runners = {"plain": lap.through(lambda: sup.drain(bench, plain_loops))}
    for kind, level in LOG_LEVELS.items():
        runners[kind] = lap.through(
            lambda level=level: sup.drain(
                bench,
                lambda name, url: [sup.supervise_command(name, log_level=level)],
                discard_logs=level != "warning",
            )
        )
    return alternate(runners, rounds)


def compared(
    lap: Leg, processes: str, drains: dict[str, Drain], goals: dict[str, str | None]
) -> list[Result]:
    """Throughput and CPU per task against the plain loop(s); ``goals`` by row key."""
    base = drains["plain"]
    ebsqs = "worker" if processes == "1 process" else f"supervise ({sup.CHILDREN} children)"
    loops = "plain loop" if processes == "1 process" else f"{sup.CHILDREN} plain loops"
    results = []
    for kind in LOG_LEVELS:
        drain = drains[kind]
        first = kind == "default"
        results.append(
            Result(
                f"{lap.label}, {processes}: throughput, {ebsqs} / {loops}, default logging"
                if first
                else "  the same with --log-level warning",
                drain.rate / base.rate,
                goals.get(f"throughput {kind}"),
                f"{drain.rate:.0f} vs {base.rate:.0f} msg/s",
            )
        )
    for kind in LOG_LEVELS:
        drain = drains[kind]
        results.append(
            Result(
                f"  CPU per task, {kind} logging",
                drain.cpu_per_1000 / base.cpu_per_1000,
                goals.get(f"cpu {kind}"),
                f"{drain.cpu_per_1000:.3f} vs {base.cpu_per_1000:.3f} CPU s per 1,000",
            )
        )
    return results


def in_one_process(lap: Leg, messages: int, rounds: int) -> list[Result]:
    """CPU per task of a ``Worker`` / the plain loop, alternating in one process
    (:mod:`benchmarks.inprocess`), at both log levels; medians of ``rounds``."""
    results = []
    for kind, level in LOG_LEVELS.items():
        command = [sys.executable, "-m", "benchmarks.inprocess", str(messages), str(rounds), level]
        env = {**lap.bench(0).env, "AWS_ENDPOINT_URL_SQS": lap.proxy}
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"benchmarks.inprocess exited {done.returncode}:\n{done.stderr[-2000:]}"
            )
        runs = json.loads(done.stdout.splitlines()[-1])
        ebsqs, base = statistics.median(runs["ebsqs"]), statistics.median(runs["plain"])
        results.append(
            Result(
                f"{lap.label}, in one process: CPU per task, Worker / plain loop, {kind} logging"
                if kind == "default"
                else "  the same with --log-level warning",
                ebsqs / base,
                None,
                f"{ebsqs * 1e6:.0f} vs {base * 1e6:.0f} us, medians of {rounds} x {messages}",
            )
        )
    return results


# -- (c) -------------------------------------------------------------------------------------


def scale_out(lap: Leg, tasks: int) -> list[Result]:
    """Two supervisors ("hosts") on one queue against one, every task recorded in a ledger."""
    bench = lap.bench(0)
    bench.bodies = [encode(Envelope(task=record.name, args=(i,))) for i in range(tasks)]
    with tempfile.TemporaryDirectory(prefix="ebsqs-scale-out-") as folder:
        drains, cores, ledgers = {}, {}, {}
        for hosts in (1, 2):  # one round: 20,000 tasks each is long enough to smooth noise
            ledger = Path(folder) / f"ledger-{hosts}.txt"
            drains[hosts], cores[hosts] = _ledgered_drain(bench, hosts, Path(folder), ledger)
            ledgers[hosts] = Counter(int(line) for line in ledger.read_text().split())
            if VERBOSE:
                print(f"    {hosts} host(s): {drains[hosts].rate:.0f} msg/s", flush=True)
    one, two = drains[1], drains[2]
    duplicates = {
        hosts: sum(n - 1 for n in seen.values() if n > 1) for hosts, seen in ledgers.items()
    }
    missing = {hosts: tasks - len(seen) for hosts, seen in ledgers.items()}
    return [
        Result(
            f"{lap.label}, scale-out: throughput, 2 supervisors (2 x {sup.CHILDREN}) / 1",
            two.rate / one.rate,
            ">= 1.8",
            f"{two.rate:.0f} vs {one.rate:.0f} msg/s, from 90 % left to 10 % of {tasks} tasks; "
            f"machine busy {cores[2]:.1f} vs {cores[1]:.1f} of {psutil.cpu_count()} cores",
        ),
        Result(
            "  tasks run twice or never, 2 supervisors (from the ledger)",
            duplicates[2] + missing[2],
            "<= 0",
            f"{duplicates[2]} duplicates, {missing[2]} missing; "
            f"1 supervisor: {duplicates[1]} and {missing[1]}",
        ),
    ]


def host_command(queue: str, files: Path) -> list[str]:
    """``supervise --queues queue:4`` as one "host": its own ``files``.status and ``.pid``."""
    return [
        *sup.supervise_command(queue),
        *("--status-file", f"{files}.status", "--pidfile", f"{files}.pid"),
    ]


def _ledgered_drain(bench: Bench, hosts: int, folder: Path, ledger: Path) -> tuple[Drain, float]:
    """Pre-load, start ``hosts`` supervisors, time the drain from 90 % left (and every child
    up) to 10 % left, then wait for the queue to empty; the drain and the cores the whole
    machine kept busy meanwhile (the proxy, fauxqs and anything else running included)."""
    name, url = bench.queue(f"scale-out-{hosts}")
    total = len(bench.bodies)
    commands = [host_command(name, folder / f"host-{hosts}-{host}") for host in range(hosts)]
    env = {**bench.env, LEDGER_VARIABLE: str(ledger)}
    last: list[tuple[int, float]] = []  # the remaining count and the machine's busy CPU s

    def mark(condition: Callable[[int], bool]) -> Callable[[int], bool]:
        def met(left: int) -> bool:
            if condition(left):
                last.append((left, _machine_busy()))
                return True
            return False

        return met

    try:
        bench.preload(url)
        with sup.started(commands, env) as group:
            # Opened once every host has all its children up, so two masters booting side by
            # side are not charged with the slower one's start-up.
            t0, cpu0 = sup.when(
                bench, url, group, mark(lambda left: left <= total * 0.9 and _all_up(group, hosts))
            )
            t1, cpu1 = sup.when(bench, url, group, mark(lambda left: left <= total * 0.1))
            # Empty, none in flight: every task has run and been deleted; none can run again.
            sup.when(bench, url, group, lambda left: left == 0)
    finally:
        bench.client.delete_queue(QueueUrl=url)
    (opened_at, busy0), (closed_at, busy1) = last
    if opened_at - closed_at < total * 0.5:
        raise RuntimeError(f"only {opened_at - closed_at} tasks in the window: give it more tasks")
    return Drain(opened_at - closed_at, t1 - t0, cpu1 - cpu0), (busy1 - busy0) / (t1 - t0)


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every core, every process)."""
    times = psutil.cpu_times()
    return float(sum(times)) - times.idle - getattr(times, "iowait", 0.0)


def _all_up(group: sup.Group, hosts: int) -> bool:
    """Whether ``hosts`` masters run, each with all its consuming children started."""
    masters = group.tops()
    return len(masters) == hosts and all(
        len(sup.consuming_children(master)) >= sup.CHILDREN for master in masters
    )


# -- (d) -------------------------------------------------------------------------------------


def idle_cost(lap: Leg, seconds: float) -> list[Result]:
    """Requests a minute from ``supervise --queues q:4`` on an empty queue, once it is up."""
    bench = lap.bench(0)
    name, url = bench.queue("idle")
    try:
        with (
            tempfile.TemporaryDirectory(prefix="ebsqs-idle-") as folder,
            sup.started([host_command(name, Path(folder) / "idle")], bench.env) as group,
        ):
            master = sup.wait_for_any(group.tops)[0]
            sup.consuming_children(master, wait_for=sup.CHILDREN)
            time.sleep(IDLE_SETTLE)  # not synchronisation: start-up requests stay out of the count
            lap.counter.reset()
            time.sleep(seconds)  # the measuring window itself
            counts = lap.counter.snapshot()
            if not group.alive():
                raise RuntimeError(f"the idle supervisor stopped:\n{group.error_tail()}")
    finally:
        bench.client.delete_queue(QueueUrl=url)
    per_minute = sum(counts.values()) * 60 / seconds
    breakdown = ", ".join(f"{action} {n * 60 / seconds:.1f}" for action, n in counts.most_common())
    return [
        Result(
            f"idle: SQS requests per idle queue per host per minute ({sup.CHILDREN} children)",
            per_minute,
            "<= 3",
            f"{breakdown or 'none'}; over {seconds:.0f} s at {lap.label}",
        )
    ]


# -- entry -----------------------------------------------------------------------------------


def run(endpoint: str, *, quick: bool = False) -> list[Result]:
    """Issue 15's latency leg against ``endpoint`` (a fauxqs server); about six minutes, or
    about one and a half with ``quick``."""
    scale = QUICK if quick else FULL
    print(
        f"  through a proxy adding 0 or {SQS_DELAY * 1000:.0f} ms each way; drains of "
        f"{'/'.join(map(str, scale.single))} (1 process) and {'/'.join(map(str, scale.group))} "
        f"(4) no-op tasks at 0/15 ms, {scale.rounds} alternating round(s), medians; inline "
        "executor; default logging is info, JSON, into /dev/null",
        flush=True,
    )
    results: list[Result] = []
    with leg(endpoint, 0.0) as lap:
        lap.bench(min(scale.single[0], 500)).plain_consumer()  # warm-up: a fresh server is slower
        single = one_process(lap, scale.single[0], scale.rounds)
        group = four_processes(lap, scale.group[0], scale.rounds)
        results += compared(
            lap, "1 process", single, {"throughput default": ">= 0.9", "cpu default": "<= 1.2"}
        )
        results += compared(lap, "4 processes", group, {"throughput default": ">= 0.9"})
        results += in_one_process(lap, scale.in_process, scale.rounds + 2)
    with leg(endpoint, SQS_DELAY) as lap:
        single = one_process(lap, scale.single[1], scale.rounds)
        group = four_processes(lap, scale.group[1], scale.rounds)
        results += compared(lap, "1 process", single, {"throughput default": ">= 2"})
        results += compared(lap, "4 processes", group, {})
        results += scale_out(lap, scale.scale_out_tasks)
        results += idle_cost(lap, scale.idle_seconds)
    return results
