"""``ebsqs supervise`` side by side with plain boto3 loops.

Measured in one run, on one fauxqs endpoint:

(a) Throughput and CPU per 1,000 tasks of ``ebsqs supervise --queues q:4`` (inline executor,
    no-op tasks, ``--log-level warning``) against four ``benchmarks.plain`` consumer processes
    (receive ten with a long poll, parse, call a no-op, ``delete_message_batch``) on identical
    pre-loaded queues. Both are watched from outside the same way: the queue's remaining count
    (visible + in flight) is polled every 20 ms, and the clock and the user+system CPU of every
    process of the group (the master and its children; the four loops) are read when 10 % of the
    messages are gone and again at 90 %, so start-up, imports and the tail are left out of both.
    Four ``ebsqs worker`` processes are measured the same way, to tell the supervisor's own cost
    from the worker loop's. Runs rotate in order; medians are compared.
(b) Recovery: with a backlog of tasks flowing through ``supervise --queues q:4``, a child is sent
    SIGKILL; the time until its replacement starts a task (the task writes its pid and the time
    to a file) is taken, several times, and the median reported.
(c) The master's CPU while idle (four children long-polling an empty queue, heartbeating), as a
    percentage of one core over five seconds.
(d) Memory per child as PSS (proportional set size: shared pages divided among the processes
    that share them), which shows what prefork shares; RSS alongside for contrast.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks import Drain, Result, median_drain, plain, report
from benchmarks.worker import Bench
from benchmarks.worker import Scale as WorkerScale
from ebsqs.envelope import Envelope, encode

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
POLL_SECONDS = 0.02
RUN_TIMEOUT = 120.0
CHILDREN = 4
TITLE = re.compile(r"ebsqs: worker\[[^\]]+\] #\d+ (?P<state>\w+)")


@dataclass(frozen=True, slots=True)
class Scale:
    """How big a run is."""

    messages: int
    rounds: int
    kills: int
    idle_seconds: float


FULL = Scale(messages=20000, rounds=3, kills=3, idle_seconds=5.0)
QUICK = Scale(messages=1000, rounds=1, kills=1, idle_seconds=2.0)


class Group:
    """Consumer processes started together in one session, under one shell.

    One session for the four plain loops as for the supervisor and its children: Linux's
    scheduler (with autogroups, the default) shares the CPU fairly between sessions, so four
    sessions would get four shares on a busy machine where one supervisor gets one.
    """

    def __init__(
        self, commands: Sequence[list[str]], env: dict[str, str], discard_logs: bool = False
    ) -> None:
        """Start ``commands``; with ``discard_logs`` their stderr (info logs) goes to /dev/null."""
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        script = " ".join(f"{shlex.join(command)} &" for command in commands) + " wait"
        self.shell = subprocess.Popen(
            ["/bin/sh", "-c", script],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if discard_logs else self.errors,
            start_new_session=True,
        )
        self.size = len(commands)
        self._seen = 0

    def tops(self) -> list[psutil.Process]:
        """The processes the shell started."""
        with contextlib.suppress(psutil.NoSuchProcess):
            children: list[psutil.Process] = psutil.Process(self.shell.pid).children()
            return children
        return []

    def members(self) -> list[psutil.Process]:
        """Every live process of the group, the shell and children included."""
        found = []
        with contextlib.suppress(psutil.NoSuchProcess):
            shell = psutil.Process(self.shell.pid)
            found = [shell, *shell.children(recursive=True)]
        return found

    def cpu(self) -> float:
        """User + system CPU seconds of every live member."""
        total = 0.0
        for member in self.members():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = member.cpu_times()
                total += times.user + times.system
        return total

    def alive(self) -> bool:
        """No consumer has exited (they run until stopped)."""
        return self.shell.poll() is None and self.exited == 0

    @property
    def exited(self) -> int:
        """Consumers that have exited, once all were started."""
        tops = self.tops()
        self._seen = max(self._seen, len(tops))
        return self._seen - len(tops) if self._seen == self.size else 0

    def error_tail(self) -> str:
        """The end of what the group wrote to stderr (warnings and errors only)."""
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        """SIGKILL the whole session (nothing is measured after this)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.shell.pid, signal.SIGKILL)
        self.shell.wait()
        self.errors.close()


@contextlib.contextmanager
def started(
    commands: Sequence[list[str]], env: dict[str, str], discard_logs: bool = False
) -> Iterator[Group]:
    group = Group(commands, env, discard_logs)
    try:
        yield group
    finally:
        group.stop()


def supervise_command(
    queue: str, app: str = "benchmarks.tasks", log_level: str = "warning"
) -> list[str]:
    return [
        sys.executable, "-m", "ebsqs", "supervise", "--app", app, "--queues", f"{queue}:{CHILDREN}",
        "--log-level", log_level, "--log-format", "json",
    ]  # fmt: skip


def worker_command(queue: str) -> list[str]:
    return [
        sys.executable, "-m", "ebsqs", "worker", "--app", "benchmarks.tasks", "--queues", queue,
        "--log-level", "warning", "--log-format", "json",
    ]  # fmt: skip


# -- (a) -------------------------------------------------------------------------------------


def drain(
    bench: Bench, commands: Callable[[str, str], Sequence[list[str]]], discard_logs: bool = False
) -> Drain:
    """Pre-load a fresh queue, start the consumers, and measure the middle 80 % of the drain."""
    name, url = bench.queue("supervise")
    try:
        bench.preload(url)
        total = len(bench.bodies)
        with started(commands(name, url), bench.env, discard_logs) as group:
            t0, cpu0 = when(bench, url, group, lambda left: left <= total * 0.9)
            t1, cpu1 = when(bench, url, group, lambda left: left <= total * 0.1)
        return Drain(round(total * 0.8), t1 - t0, cpu1 - cpu0)
    finally:
        bench.client.delete_queue(QueueUrl=url)


def when(
    bench: Bench, url: str, group: Group, condition: Callable[[int], bool]
) -> tuple[float, float]:
    """Poll the queue until ``condition(remaining)``; then the clock and the group's CPU."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition(sum(bench.counts(url))):
        if not group.alive() or time.monotonic() > deadline:
            raise RuntimeError(
                f"consumers stopped or stalled; queue at {bench.counts(url)}:\n{group.error_tail()}"
            )
        time.sleep(POLL_SECONDS)
    return time.monotonic(), group.cpu()


def throughput(bench: Bench, rounds: int) -> list[Result]:
    """supervise / plain loops (and / ebsqs workers), rotating the order each round."""
    total = str(len(bench.bodies))
    kinds: dict[str, Callable[[str, str], Sequence[list[str]]]] = {
        "plain": lambda name, url: (
            [[sys.executable, "-m", "benchmarks.plain", "consume", url, total]] * CHILDREN
        ),
        "supervise": lambda name, url: [supervise_command(name)],
        "workers": lambda name, url: [worker_command(name)] * CHILDREN,
    }
    windows: dict[str, list[Drain]] = {kind: [] for kind in kinds}
    labels = list(kinds)
    for number in range(rounds):
        shift = number % len(labels)
        for label in labels[shift:] + labels[:shift]:
            window = drain(bench, kinds[label])
            windows[label].append(window)
            report(label, window)
    plain, sup, workers = (median_drain(windows[label]) for label in labels)
    return [
        Result(
            f"throughput, supervise ({CHILDREN} children) / {CHILDREN} plain loops",
            sup.rate / plain.rate,
            ">= 0.9",
            f"{sup.rate:.0f} vs {plain.rate:.0f} msg/s",
        ),
        Result(
            "CPU s per 1,000 tasks, supervise / plain loops",
            sup.cpu_per_1000 / plain.cpu_per_1000,
            "<= 1.3",
            f"{sup.cpu_per_1000:.3f} vs {plain.cpu_per_1000:.3f} CPU s",
        ),
        Result(
            f"  supervise / {CHILDREN} ebsqs workers: throughput (the supervisor's own cost)",
            sup.rate / workers.rate,
            None,
            f"{workers.rate:.0f} msg/s",
        ),
        Result(
            "  supervise / ebsqs workers: CPU per 1,000 tasks",
            sup.cpu_per_1000 / workers.cpu_per_1000,
            None,
            f"{workers.cpu_per_1000:.3f} CPU s",
        ),
    ]


# -- (b), (c), (d) ---------------------------------------------------------------------------


def recovery(bench: Bench, scale: Scale) -> list[Result]:
    """Kill-to-work time, the master's idle CPU and PSS per child, on one supervisor."""
    name, url = bench.queue("recovery")
    with tempfile.TemporaryDirectory() as folder:
        record = Path(folder) / "record.txt"
        record.touch()
        env = {
            **bench.env,
            "SUP_RECORD": str(record),
            "PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)]),
        }
        try:
            with started([supervise_command(name, app="sup_tasks")], env) as group:
                master = wait_for_any(group.tops)[0]
                consuming_children(master, wait_for=CHILDREN)
                restarts = _kill_to_work(bench, url, master, record, scale.kills)
                idle = _idle_cpu(bench, url, master, scale.idle_seconds)
                pss, rss = _memory(master)
        finally:
            bench.client.delete_queue(QueueUrl=url)
    return [
        Result(
            "seconds from a child's SIGKILL to its replacement running a task",
            statistics.median(restarts),
            "<= 1",
            ", ".join(f"{s:.2f}" for s in restarts),
        ),
        Result(
            "master CPU while idle, % of one core",
            idle,
            "<= 1",
            f"over {scale.idle_seconds:.0f} s with {CHILDREN} idle children; "
            f"resolution {100 * 0.01 / scale.idle_seconds:.1f} %",
        ),
        Result(
            "memory per child, PSS MiB (mean)",
            statistics.mean(pss),
            "<= 40",
            f"max {max(pss):.1f}; RSS mean {statistics.mean(rss):.1f} MiB",
        ),
    ]


def wait_for_any(get: Callable[[], list[psutil.Process]]) -> list[psutil.Process]:
    deadline = time.monotonic() + 10
    while not (found := get()):
        if time.monotonic() > deadline:
            raise RuntimeError("the supervisor did not start")
        time.sleep(POLL_SECONDS)
    return found


def consuming_children(master: psutil.Process, wait_for: int = 0) -> dict[int, str]:
    """``{pid: state}`` of the master's consuming children; waits until ``wait_for`` are."""
    deadline = time.monotonic() + 30
    while True:
        found = {}
        for child in master.children():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                match = TITLE.search(" ".join(child.cmdline()))
                if match and match["state"] in ("idle", "busy"):
                    found[child.pid] = match["state"]
        if len(found) >= wait_for:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(found)} children came up")
        time.sleep(POLL_SECONDS)


def _kill_to_work(
    bench: Bench, url: str, master: psutil.Process, record: Path, kills: int
) -> list[float]:
    """SIGKILL a busy child ``kills`` times; seconds until each replacement starts a task."""
    bodies = [
        encode(Envelope(task="sup_tasks.work", args=(f"r{i}",), kwargs={"seconds": 0.002}))
        for i in range(3000 * kills)
    ]
    plain.send(bench.client, url, bodies)
    seconds = []
    for _ in range(kills):
        before = set(consuming_children(master, wait_for=CHILDREN))
        victim = _first_worker(record, before)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        deadline = time.monotonic() + 30
        while True:
            new = set(consuming_children(master)) - before
            first = _first_start(record, new) if new else None
            if first is not None:
                seconds.append(first - killed_at)
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no replacement started a task within 30 s")
            time.sleep(POLL_SECONDS)
    bench.client.purge_queue(QueueUrl=url)
    return seconds


def _whole_lines(record: Path) -> list[str]:
    """The record's finished lines: a read may see part of a child's write in progress."""
    text = record.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def _first_worker(record: Path, pids: set[int]) -> int:
    """A child among ``pids`` that has run a task (waiting until one has)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in _whole_lines(record):
            pid = int(line.split()[1])
            if pid in pids:
                return pid
        time.sleep(POLL_SECONDS)
    raise RuntimeError("no child ran a task within 30 s")


def _first_start(record: Path, pids: set[int]) -> float | None:
    for line in _whole_lines(record):
        event, pid, *_, at = line.split()[:7]
        if event == "start" and int(pid) in pids:
            return float(at)
    return None


def _idle_cpu(bench: Bench, url: str, master: psutil.Process, seconds: float) -> float:
    """The master's CPU over ``seconds`` once the queue is empty, in % of one core."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while sum(bench.counts(url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    consuming_children(master, wait_for=CHILDREN)
    before = master.cpu_times()
    time.sleep(seconds)
    after = master.cpu_times()
    used: float = (after.user + after.system) - (before.user + before.system)
    return 100 * used / seconds  # psutil counts in clock ticks: 0.01 s, 0.2 % over 5 s


def _memory(master: psutil.Process) -> tuple[list[float], list[float]]:
    """PSS and RSS of each child, in MiB."""
    pss, rss = [], []
    for pid in consuming_children(master, wait_for=CHILDREN):
        info = psutil.Process(pid).memory_full_info()
        pss.append(info.pss / 2**20)
        rss.append(info.rss / 2**20)
    return pss, rss


# -- entry -----------------------------------------------------------------------------------


def run(endpoint: str, *, quick: bool = False) -> list[Result]:
    """Issue 3's point 9 against ``endpoint`` (a fauxqs server); about two minutes, or 20 s
    with ``quick``."""
    scale = QUICK if quick else FULL
    print(
        f"  {scale.messages} no-op tasks per drain, {scale.rounds} rotating rounds, medians of "
        f"the middle 80 %; supervise with {CHILDREN} children, inline executor, warning logs",
        flush=True,
    )
    bench = Bench(endpoint, WorkerScale(messages=scale.messages, rounds=scale.rounds,
                                        enqueue_rounds=0))  # fmt: skip
    return [*throughput(bench, scale.rounds), *recovery(bench, scale)]
