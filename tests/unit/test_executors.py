"""Executors driven by hand: inline, thread, process and asyncio, outside any worker.

Tasks are closures registered in a registry of the test's own (the process executor's pool
processes are forked, so they see the same closures). Jobs that must stay running wait for a
file the test creates, which works across threads and processes alike.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ebsqs.envelope import Envelope
from ebsqs.errors import SoftTimeLimitExceeded
from ebsqs.executors import Executor, available, create
from ebsqs.executors.asyncio import AsyncioExecutor
from ebsqs.executors.execution import Job, Outcome, OutcomeKind, soft_time_limit
from ebsqs.executors.inline import InlineExecutor
from ebsqs.executors.process import ProcessExecutor
from ebsqs.executors.thread import ThreadExecutor
from ebsqs.registry import TaskRegistry
from ebsqs.task import Task
from tests.servers import ROOT
from tests.waiting import wait_until

PLUGIN_PATH = ROOT / "tests" / "fixtures" / "executor_plugin"
POOLED = ["thread", "process", "asyncio"]


# -- helpers -----------------------------------------------------------------------------------


class Tasks:
    """A registry of the test's own and a way to build jobs for it."""

    def __init__(self) -> None:
        self.registry = TaskRegistry()
        self._jobs = 0

    def add(self, fn: Callable[..., Any], **options: Any) -> str:
        """Register ``fn`` under its own name; return the name."""
        self.registry.register(Task(fn, name=fn.__name__, registry=self.registry, **options))
        return fn.__name__

    def job(self, name: str, *args: Any) -> Job:
        """A job for the task ``name`` with its limits, as the worker loop builds it."""
        task = self.registry.get(name)
        self._jobs += 1
        return Job(
            key=f"{name}-{self._jobs}",
            envelope=Envelope(task=name, args=args, max_retries=3),
            queue="q",
            time_limit=task.time_limit,
            soft_time_limit=task.soft_time_limit,
        )


def wait_for_file(path: str, timeout: float = 30) -> None:
    """Block (in a task) until ``path`` exists: how a test holds a job running."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)


def outcomes_of(executor: Executor, count: int, timeout: float = 10) -> dict[str, Outcome]:
    """Step the executor as the worker loop does until ``count`` outcomes came back."""
    found: dict[str, Outcome] = {}
    deadline = time.monotonic() + timeout
    while len(found) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} outcomes: {found}"
        for outcome in executor.collect(0.05) + executor.stop_overdue(time.monotonic()):
            assert outcome.key not in found, f"two outcomes for {outcome.key}"
            found[outcome.key] = outcome
    return found


@pytest.fixture
def tasks() -> Tasks:
    return Tasks()


@pytest.fixture
def started(tasks: Tasks) -> Iterator[Callable[[str, int], Executor]]:
    """``started(name, concurrency)``: a started executor, shut down after the test."""
    made: list[Executor] = []

    def make(name: str, concurrency: int = 1) -> Executor:
        executor = create(name, concurrency, tasks.registry)
        executor.start()
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(time.monotonic())


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- the contract, every executor --------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["inline", *POOLED])
def test_outcomes_describe_success_failure_and_retry(
    name: str, tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    def succeed() -> None:
        pass

    def explode() -> None:
        raise ValueError("the widget is broken")

    def again() -> None:
        tasks.registry.get("again").retry(delay=7)

    for fn in (succeed, explode, again):
        tasks.add(fn)
    executor = started(name, 3)
    jobs = [tasks.job(n) for n in ("succeed", "explode", "again")]
    for job in jobs:
        executor.submit(job)
    found = outcomes_of(executor, 3)

    ok, failed, retry = (found[job.key] for job in jobs)
    assert ok.kind is OutcomeKind.SUCCEEDED
    assert failed.kind is OutcomeKind.FAILED
    assert failed.error_type == "builtins.ValueError"
    assert failed.error == "the widget is broken"
    assert failed.traceback is not None and "in explode" in failed.traceback
    assert retry.kind is OutcomeKind.RETRY and retry.retry_delay == 7
    assert executor.running() == 0 and executor.free_slots() == executor.concurrency


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", POOLED)
def test_free_slots_bound_what_can_be_submitted(
    name: str, tasks: Tasks, started: Callable[[str, int], Executor], tmp_path: Path
) -> None:
    tasks.add(wait_for_file)
    executor = started(name, 3)
    release = tmp_path / "release"
    jobs = [tasks.job("wait_for_file", str(release)) for _ in range(3)]

    for expected_free, job in zip((3, 2, 1), jobs, strict=True):
        assert executor.free_slots() == expected_free
        executor.submit(job)
    assert executor.free_slots() == 0 and executor.running() == 3
    with pytest.raises(RuntimeError, match="no free slot"):
        executor.submit(tasks.job("wait_for_file", str(release)))
    assert executor.collect(0.1) == []

    release.touch()
    found = outcomes_of(executor, 3)
    assert {o.kind for o in found.values()} == {OutcomeKind.SUCCEEDED}
    assert executor.free_slots() == 3


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", POOLED)
def test_shutdown_lets_running_jobs_finish(
    name: str, tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    def nap() -> None:
        time.sleep(0.3)

    tasks.add(nap)
    executor = started(name, 2)
    jobs = [tasks.job("nap"), tasks.job("nap")]
    for job in jobs:
        executor.submit(job)

    begun = time.monotonic()
    outcomes = executor.shutdown(begun + 10)

    assert {o.key: o.kind for o in outcomes} == {j.key: OutcomeKind.SUCCEEDED for j in jobs}
    assert time.monotonic() - begun < 3


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", POOLED)
def test_shutdown_interrupts_what_still_runs_at_the_deadline(
    name: str, tasks: Tasks, started: Callable[[str, int], Executor], tmp_path: Path
) -> None:
    tasks.add(wait_for_file)
    executor = started(name, 2)
    release = tmp_path / "release"
    stuck = tasks.job("wait_for_file", str(release), 10)
    executor.submit(stuck)

    begun = time.monotonic()
    outcomes = executor.shutdown(begun + 0.5)
    took = time.monotonic() - begun
    release.touch()  # let an abandoned thread end

    assert [(o.key, o.kind) for o in outcomes] == [(stuck.key, OutcomeKind.INTERRUPTED)]
    assert 0.5 <= took < 3, took
    assert executor.collect(0.2) == []  # nothing reported twice


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["process", "asyncio"])
def test_hard_limits_still_hold_while_draining(
    name: str, tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    async def overstays_async() -> None:
        await asyncio.sleep(30)

    def overstays() -> None:
        time.sleep(30)

    tasks.add(overstays_async if name == "asyncio" else overstays, time_limit=0.3)
    executor = started(name, 1)
    job = tasks.job("overstays_async" if name == "asyncio" else "overstays")
    executor.submit(job)

    begun = time.monotonic()
    outcomes = executor.shutdown(begun + 10)

    assert [(o.key, o.kind) for o in outcomes] == [(job.key, OutcomeKind.TIMED_OUT)]
    assert time.monotonic() - begun < 3


# -- soft time limits --------------------------------------------------------------------------


def soft_limited_tasks(tasks: Tasks) -> None:
    """``catches`` handles its soft limit and returns; ``overruns`` does not."""

    def catches() -> None:
        try:
            time.sleep(10)
        except SoftTimeLimitExceeded:
            return

    def overruns() -> None:
        time.sleep(10)

    tasks.add(catches, soft_time_limit=0.2)
    tasks.add(overruns, soft_time_limit=0.2)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["inline", "process"])
def test_soft_limit_raises_inside_the_task(
    name: str, tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    soft_limited_tasks(tasks)
    executor = started(name, 2)
    catches, overruns = tasks.job("catches"), tasks.job("overruns")

    executor.submit(catches)
    executor.submit(overruns)
    found = outcomes_of(executor, 2)

    assert found[catches.key].kind is OutcomeKind.SUCCEEDED
    assert found[overruns.key].kind is OutcomeKind.TIMED_OUT
    assert found[overruns.key].error_type == "ebsqs.errors.SoftTimeLimitExceeded"
    assert found[overruns.key].error == "soft time limit of 0.2 s exceeded"
    assert all(0.2 <= o.duration < 2 for o in found.values()), found


@pytest.mark.timeout(20)
def test_asyncio_soft_limit_cancels_the_coroutine(
    tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    async def catches() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return

    async def overruns() -> None:
        await asyncio.sleep(10)

    tasks.add(catches, soft_time_limit=0.2)
    tasks.add(overruns, soft_time_limit=0.2)
    executor = started("asyncio", 2)
    catches_job, overruns_job = tasks.job("catches"), tasks.job("overruns")

    executor.submit(catches_job)
    executor.submit(overruns_job)
    found = outcomes_of(executor, 2)

    assert found[catches_job.key].kind is OutcomeKind.SUCCEEDED
    assert found[overruns_job.key].kind is OutcomeKind.TIMED_OUT
    assert found[overruns_job.key].error_type == "ebsqs.errors.SoftTimeLimitExceeded"


@pytest.mark.timeout(20)
def test_thread_does_not_enforce_soft_limits_and_says_so_once(
    tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    def slow() -> None:
        time.sleep(0.3)

    tasks.add(slow, soft_time_limit=0.05)
    executor = started("thread", 2)
    with capture_logs() as logs:
        jobs = [tasks.job("slow"), tasks.job("slow")]
        for job in jobs:
            executor.submit(job)
        found = outcomes_of(executor, 2)

    assert {o.kind for o in found.values()} == {OutcomeKind.SUCCEEDED}
    warnings = [e for e in logs if e["event"] == "soft_time_limit_not_enforced"]
    assert warnings == [
        {
            "event": "soft_time_limit_not_enforced",
            "task": "slow",
            "executor": "thread",
            "log_level": "warning",
        }
    ]


@pytest.mark.timeout(10)
def test_soft_limit_keeps_an_outer_alarm_and_its_handler() -> None:
    rang: list[int] = []

    def outer_handler(signum: int, frame: object) -> None:
        rang.append(signum)

    previous = signal.signal(signal.SIGALRM, outer_handler)
    outer = signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        with soft_time_limit(0.05) as armed, pytest.raises(SoftTimeLimitExceeded):
            assert armed
            time.sleep(5)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        handler = signal.getsignal(signal.SIGALRM)
        with soft_time_limit(60) as armed_past_outer:
            pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)
        signal.signal(signal.SIGALRM, previous)

    assert 25 < remaining <= 30
    assert handler is outer_handler and rang == []
    assert not armed_past_outer  # the outer alarm would ring first: ours stays off


@pytest.mark.timeout(10)
def test_soft_limit_is_not_armed_outside_the_main_thread(tasks: Tasks) -> None:
    def slow() -> None:
        time.sleep(0.5)

    tasks.add(slow, soft_time_limit=0.1)
    executor = InlineExecutor(registry=tasks.registry)
    thread = threading.Thread(target=executor.submit, args=(tasks.job("slow"),))

    thread.start()
    thread.join(timeout=5)

    (outcome,) = executor.collect(0)
    assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.duration >= 0.5


# -- thread ------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_thread_runs_concurrency_jobs_at_the_same_time(
    tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    barrier = threading.Barrier(8, timeout=5)

    def meet() -> None:
        barrier.wait()  # breaks (and the task fails) unless all eight run at once

    tasks.add(meet)
    executor = started("thread", 8)
    for _ in range(8):
        executor.submit(tasks.job("meet"))
    found = outcomes_of(executor, 8)
    assert [o.kind for o in found.values()] == [OutcomeKind.SUCCEEDED] * 8


@pytest.mark.timeout(20)
def test_thread_tasks_share_the_process_broker(
    tasks: Tasks, started: Callable[[str, int], Executor], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ebsqs import producer
    from ebsqs.brokers.memory import MemoryBroker

    monkeypatch.setenv("EBSQS_BROKER_URL", "memory://shared-by-threads")
    producer.broker_for.cache_clear()

    def child(number: int) -> None:
        pass

    child_task = Task(child, name="child", registry=tasks.registry, queue_name="children")
    tasks.registry.register(child_task)

    def fan_out(count: int) -> None:
        for number in range(count):
            child_task.delay(number)

    tasks.add(fan_out)
    executor = started("thread", 8)
    for _ in range(8):
        executor.submit(tasks.job("fan_out", 25))
    found = outcomes_of(executor, 8)

    assert [o.kind for o in found.values()] == [OutcomeKind.SUCCEEDED] * 8, found
    assert MemoryBroker.named("shared-by-threads").stats("children").visible == 200
    producer.broker_for.cache_clear()


# -- process -----------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_process_reuses_pool_processes_each_in_its_own_group(
    tasks: Tasks, started: Callable[[str, int], Executor], tmp_path: Path
) -> None:
    def where(path: str) -> None:
        with open(path, "a") as out:
            out.write(f"{os.getpid()} {os.getpgrp()} {os.getsid(0)}\n")

    tasks.add(where)
    executor = started("process", 1)
    record = tmp_path / "where"
    for _ in range(3):
        executor.submit(tasks.job("where", str(record)))
        outcomes_of(executor, 1)

    lines = set(record.read_text().splitlines())
    assert len(lines) == 1, lines
    pid, group, session = (int(n) for n in lines.pop().split())
    assert pid != os.getpid() and group == pid and session == pid


@pytest.mark.timeout(20)
def test_process_hard_limit_kills_the_whole_tree_and_the_pool_keeps_serving(
    tasks: Tasks, started: Callable[[str, int], Executor], tmp_path: Path
) -> None:
    def runaway(path: str) -> None:
        child = subprocess.Popen(["sleep", "60"])
        Path(path).write_text(str(child.pid))
        while True:
            pass

    def succeed() -> None:
        pass

    tasks.add(runaway, time_limit=0.5)
    tasks.add(succeed)
    executor = started("process", 1)
    grandchild_file = tmp_path / "grandchild"
    job = tasks.job("runaway", str(grandchild_file))

    begun = time.monotonic()
    executor.submit(job)
    (outcome,) = outcomes_of(executor, 1).values()
    took = time.monotonic() - begun

    assert outcome.kind is OutcomeKind.TIMED_OUT and outcome.key == job.key
    assert "hard time limit of 0.5 s exceeded" in (outcome.error or "")
    assert 0.5 <= took < 1.5, took
    grandchild = int(grandchild_file.read_text())
    wait_until(lambda: not alive(grandchild), timeout=5, message="the task's child survived")

    after = tasks.job("succeed")
    executor.submit(after)
    assert outcomes_of(executor, 1)[after.key].kind is OutcomeKind.SUCCEEDED


@pytest.mark.timeout(20)
def test_process_collect_wakes_up_for_the_next_hard_deadline(
    tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    def sleeper() -> None:
        time.sleep(30)

    tasks.add(sleeper, time_limit=0.3)
    executor = started("process", 1)
    executor.submit(tasks.job("sleeper"))

    begun = time.monotonic()
    assert executor.collect(10) == []
    assert time.monotonic() - begun < 2
    assert [o.kind for o in executor.stop_overdue(time.monotonic())] == [OutcomeKind.TIMED_OUT]


@pytest.mark.timeout(20)
def test_process_that_dies_mid_job_is_a_crash_and_is_replaced(
    tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    def suicide() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def succeed() -> None:
        pass

    tasks.add(suicide)
    tasks.add(succeed)
    executor = started("process", 1)
    job = tasks.job("suicide")

    with capture_logs() as logs:
        executor.submit(job)
        (outcome,) = outcomes_of(executor, 1).values()

    assert outcome.kind is OutcomeKind.CRASHED  # redelivered by the worker, never dead-lettered
    assert outcome.error == "worker process died with signal 9 (SIGKILL)"
    assert outcome.error_type == "ebsqs.executors.process.ProcessDied"
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["task_process_died"]
    after = tasks.job("succeed")
    executor.submit(after)
    assert outcomes_of(executor, 1)[after.key].kind is OutcomeKind.SUCCEEDED


@pytest.mark.timeout(20)
def test_process_tasks_ignore_sigterm_sent_to_them(
    tasks: Tasks, started: Callable[[str, int], Executor], tmp_path: Path
) -> None:
    def report_then_wait(pid_file: str, release: str) -> None:
        Path(pid_file).write_text(str(os.getpid()))
        wait_for_file(release)

    tasks.add(report_then_wait)
    executor = started("process", 1)
    pid_file, release = tmp_path / "pid", tmp_path / "release"
    executor.submit(tasks.job("report_then_wait", str(pid_file), str(release)))
    wait_until(pid_file.exists, timeout=5)

    os.kill(int(pid_file.read_text()), signal.SIGTERM)  # e.g. systemd, to the whole cgroup
    os.kill(int(pid_file.read_text()), signal.SIGINT)
    release.touch()

    (outcome,) = outcomes_of(executor, 1).values()
    assert outcome.kind is OutcomeKind.SUCCEEDED


@pytest.mark.timeout(30)
def test_process_pool_dies_with_its_worker(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import time
        from ebsqs.envelope import Envelope
        from ebsqs.executors.execution import Job
        from ebsqs.executors.process import ProcessExecutor
        from ebsqs.registry import TaskRegistry
        from ebsqs.task import Task

        def spin():
            while True:
                pass

        registry = TaskRegistry()
        registry.register(Task(spin, name="spin", registry=registry))
        executor = ProcessExecutor(2, registry)
        executor.start()
        executor.submit(Job("k", Envelope(task="spin"), "q"))
        pids = [slot.process.pid for slot in executor._slots]
        open({str(pids_file)!r}, "w").write(" ".join(map(str, pids)))
        time.sleep(60)
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        wait_until(lambda: pids_file.exists() and pids_file.read_text(), timeout=15)
        pool = [int(pid) for pid in pids_file.read_text().split()]
        assert all(alive(pid) for pid in pool)
        worker.kill()  # no chance to shut its pool down
        worker.wait(timeout=5)
        wait_until(
            lambda: not any(alive(pid) for pid in pool),
            timeout=5,
            message="pool processes outlived their worker",
        )
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


# -- asyncio -----------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_asyncio_runs_many_coroutines_on_one_loop(
    tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    barrier: list[asyncio.Barrier] = []
    threads: set[str] = set()

    async def meet() -> None:
        threads.add(threading.current_thread().name)
        if not barrier:
            barrier.append(asyncio.Barrier(50))
        async with asyncio.timeout(5):
            await barrier[0].wait()

    tasks.add(meet)
    executor = started("asyncio", 50)
    for _ in range(50):
        executor.submit(tasks.job("meet"))
    found = outcomes_of(executor, 50)

    assert {o.kind for o in found.values()} == {OutcomeKind.SUCCEEDED}, found
    assert threads == {"ebsqs-asyncio"}


@pytest.mark.timeout(20)
def test_asyncio_hard_limit_cancels_the_coroutine(
    tasks: Tasks, started: Callable[[str, int], Executor]
) -> None:
    cleaned: list[bool] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.append(True)

    tasks.add(forever, time_limit=0.3)
    executor = started("asyncio", 1)
    job = tasks.job("forever")
    executor.submit(job)

    (outcome,) = outcomes_of(executor, 1).values()
    assert outcome.kind is OutcomeKind.TIMED_OUT and 0.3 <= outcome.duration < 2
    assert cleaned == [True]


# -- choosing executors by name ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("inline", InlineExecutor),
        ("thread", ThreadExecutor),
        ("process", ProcessExecutor),
        ("asyncio", AsyncioExecutor),
    ],
)
def test_builtin_executors_by_name(name: str, kind: type[object], tasks: Tasks) -> None:
    executor = create(name, 4, tasks.registry)
    assert isinstance(executor, kind) and isinstance(executor, Executor)
    assert executor.concurrency == (1 if name == "inline" else 4)


def test_a_plugin_executor_is_found_through_its_entry_point(
    monkeypatch: pytest.MonkeyPatch, tasks: Tasks
) -> None:
    assert "recording" not in available()
    monkeypatch.syspath_prepend(str(PLUGIN_PATH))

    executor = create("recording", 2, tasks.registry)

    assert "recording" in available()
    assert type(executor).__module__ == "ebsqs_test_executor"
    assert isinstance(executor, Executor) and executor.concurrency == 2
