"""Acceptance of the executors: real ``ebsqs worker`` processes over HTTP SQS.

moto's server serves one consumer per queue and a handful of messages (it slows with queue
depth, and two concurrent receivers can be handed the same message); fauxqs (and the SQLite
broker) serve the 500-message backlog. Tasks record their own
executions (``tests/fixtures/exec_tasks.py``), so what is counted is what ran.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack

import pytest

from ebsqs.brokers import MAX_BATCH
from ebsqs.worker.sender import SENDER_THREADS
from tests.fixtures import exec_tasks, worker_tasks
from tests.integration.processes import APP, Backend, WorkerProcess
from tests.servers import ROOT
from tests.waiting import wait_until

EXEC_APP = "tests.fixtures.exec_tasks"
PLUGIN_PATH = ROOT / "tests" / "fixtures" / "executor_plugin"


def start_worker(backend: Backend, queue: str, *flags: str, **env: str) -> WorkerProcess:
    """``ebsqs worker`` on ``queue`` with both fixture apps and its own log file."""
    return WorkerProcess(
        ["--app", f"{APP},{EXEC_APP}", "--queues", queue, "--wait", "1", *flags],
        {**backend.env, worker_tasks.RECORD_ENV: str(backend.record_file), **env},
        backend.tmp_path / f"worker-{queue}.log",
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class InFlightSampler:
    """Samples a queue's stats from a thread while a test runs; keeps every sample."""

    def __init__(self, backend: Backend, queue: str, interval: float = 0.05) -> None:
        self.samples: list[tuple[int, int, int]] = []
        self._backend, self._queue, self._interval = backend, queue, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.samples.append(self._backend.counts(self._queue))


# -- 1. a task longer than the visibility timeout runs exactly once --------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_task_longer_than_its_visibility_timeout_runs_once_with_every_executor(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    # 9 s of work against a 2 s visibility timeout (the 90 s vs 20 s, scaled), one
    # worker per executor, all at once; each queue has one consumer, which moto handles.
    cases = {
        "inline": worker_tasks.slow,
        "thread": worker_tasks.slow,
        "process": worker_tasks.slow,
        "asyncio": exec_tasks.async_nap,
    }
    queues = {name: unique_queue() for name in cases}
    for name, task in cases.items():
        backend.create(queues[name])
        task.send_with(queue_name=queues[name]).delay(name, 9)

    with ExitStack() as stack:
        workers = {
            name: stack.enter_context(
                start_worker(backend, queues[name], "--executor", name, "--visibility-timeout", "2")
            )
            for name in cases
        }
        everything = lambda: "\n".join(w.describe() for w in workers.values())  # noqa: E731
        wait_until(
            lambda: all(f"start {name}" in backend.executions() for name in cases),
            timeout=20,
            message=everything,
        )
        # From here to the end of each task, its message must stay in flight: a redelivery
        # would show as visible, or as a second start line.
        samplers = {
            name: stack.enter_context(InFlightSampler(backend, queues[name], interval=0.25))
            for name in cases
        }
        wait_until(
            lambda: all(f"done {name}" in backend.executions() for name in cases),
            timeout=20,
            message=everything,
        )
        for name in cases:
            wait_until(lambda name=name: backend.counts(queues[name]) == (0, 0, 0), timeout=10)
        for name, worker in workers.items():
            assert worker.stop() == 0, worker.describe()
            assert len(worker.events("task_succeeded")) == 1, (name, worker.describe())

    assert Counter(backend.executions()) == Counter(
        line for name in cases for line in (f"start {name}", f"done {name}")
    )
    for name, sampler in samplers.items():
        in_flight = [s for s in sampler.samples if s == (0, 1, 0)]
        assert len(in_flight) >= 10, (name, sampler.samples)
        assert {visible for visible, _, _ in sampler.samples} == {0}, (name, sampler.samples)


# -- 2. a hard time limit stops a runaway task in a process ------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_process_executor_kills_a_runaway_task_at_its_hard_limit_and_keeps_serving(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    dead = backend.dead_letter_queue(queue)
    backend.create(queue)

    exec_tasks.spin.send_with(queue_name=queue).delay("runaway")  # time_limit=2, max_retries=1

    with start_worker(backend, queue, "--executor", "process") as worker:
        stopped_after = []
        for attempt in (1, 2):
            line = wait_until(
                lambda attempt=attempt: [
                    e for e in backend.executions() if e.startswith("runaway")
                ][attempt - 1 : attempt],
                timeout=20,
                message=worker.describe,
            )[0]
            _, pid, started = line.split()
            wait_until(lambda pid=pid: not alive(int(pid)), timeout=5, message=worker.describe)
            stopped_after.append(time.time() - float(started))
        wait_until(lambda: backend.counts(dead)[0] == 1, timeout=20, message=worker.describe)

        worker_tasks.record.send_with(queue_name=queue).delay("served after the kills")
        wait_until(
            lambda: "served after the kills" in backend.executions(),
            timeout=20,
            message=worker.describe,
        )
        assert worker.stop() == 0, worker.describe()

    assert all(2 <= took < 3 for took in stopped_after), stopped_after
    assert [e["time_limit"] for e in worker.events("task_killed")] == [2, 2]
    assert len(worker.events("task_retried")) == 1  # the retry policy: one retry, then...
    [letter] = backend.dead_letters(queue)  # ...the dead-letter queue
    assert letter.attributes["ebsqs-reason"] == "retries exhausted"
    assert letter.attributes["ebsqs-error-type"] == "timed_out"
    assert backend.counts(queue) == (0, 0, 0)


# -- 3. eight sleeping tasks on eight threads --------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_thread_executor_runs_eight_one_second_tasks_at_once(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)
    exec_tasks.timed_nap.send_with(queue_name=queue).delay_many((f"nap-{n}", 1.0) for n in range(8))

    with start_worker(backend, queue, "--executor", "thread", "--concurrency", "8") as worker:
        wait_until(lambda: len(backend.executions()) == 8, timeout=20, message=worker.describe)
        assert worker.stop() == 0, worker.describe()

    spans = [line.split() for line in backend.executions()]
    first_start = min(float(start) for _, start, _ in spans)
    last_end = max(float(end) for _, _, end in spans)
    assert sorted(label for label, _, _ in spans) == sorted(f"nap-{n}" for n in range(8))
    assert last_end - first_start < 1.5, spans


# -- 4. the worker holds no more than it can start plus one batch ------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("backend", "executor", "concurrency"),
    [("fauxqs", "thread", 4), ("fauxqs", "process", 2), ("sqlite", "thread", 4)],
    indirect=["backend"],
)
def test_in_flight_never_exceeds_concurrency_plus_one_batch_on_a_backlog_of_500(
    backend: Backend, executor: str, concurrency: int, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)
    exec_tasks.sleep_briefly.send_with(queue_name=queue).delay_many((0.02,) for _ in range(500))
    assert backend.counts(queue)[0] == 500

    flags = ("--executor", executor, "--concurrency", str(concurrency))
    with InFlightSampler(backend, queue) as sampler, start_worker(backend, queue, *flags) as worker:
        wait_until(
            lambda: backend.counts(queue) == (0, 0, 0),
            timeout=60,
            interval=0.2,
            message=lambda: f"{backend.counts(queue)}; {worker.describe()}",
        )
        assert worker.stop() == 0, worker.describe()

    in_flight = [s[1] for s in sampler.samples]
    assert len(worker.events("task_succeeded")) == 500
    # Held (received, not settled): at most concurrency + 10. Finished messages whose delete
    # is still under way count as in flight on the server too: at most a batch filling up and
    # one batch per sender thread (the worker's own bound is checked exactly in the unit tests).
    deleting = MAX_BATCH * (1 + SENDER_THREADS)
    assert max(in_flight) <= concurrency + 10 + deleting, sorted(in_flight)[-20:]
    assert max(in_flight) >= concurrency, "the sampler never saw the worker busy"


# -- 5. a third-party executor chosen by name --------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_executor_registered_through_an_entry_point_runs_tasks(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)
    worker_tasks.record.send_with(queue_name=queue).delay_many((f"plugin-{n}",) for n in range(3))
    path = os.pathsep.join(filter(None, [str(PLUGIN_PATH), os.environ.get("PYTHONPATH")]))

    with start_worker(backend, queue, "--executor", "recording", PYTHONPATH=path) as worker:
        wait_until(lambda: len(backend.executions()) == 3, timeout=20, message=worker.describe)
        wait_until(lambda: backend.counts(queue) == (0, 0, 0), timeout=10)
        assert worker.stop() == 0, worker.describe()

    assert sorted(backend.executions()) == [f"plugin-{n}" for n in range(3)]
    assert len(worker.events("recording_executor_started")) == 1
    assert len(worker.events("recording_executor_ran")) == 3


# -- drain -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["moto"], indirect=True)
def test_sigterm_to_every_process_lets_a_process_task_finish_and_leaves_none_behind(
    backend: Backend, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue()
    backend.create(queue)
    worker_tasks.slow.send_with(queue_name=queue).delay("drained", 2)

    flags = ("--executor", "process", "--concurrency", "2")
    with start_worker(backend, queue, *flags) as worker:
        wait_until(lambda: "start drained" in backend.executions(), timeout=20)
        [started] = worker.events("process_pool_started")
        # As systemd does (KillMode=control-group): SIGTERM to every process, pool included.
        for pid in started["pids"]:
            os.kill(pid, signal.SIGTERM)
        assert worker.stop() == 0, worker.describe()

    assert backend.executions() == ["start drained", "done drained"]
    assert backend.counts(queue) == (0, 0, 0)
    assert len(started["pids"]) == 2
    wait_until(lambda: not any(alive(pid) for pid in started["pids"]), timeout=5)
