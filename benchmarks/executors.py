"""Executor scaling: how close to linear the thread and process executors get.

* I/O-bound: tasks that each sleep 20 ms, run by one ``ebsqs worker --executor thread`` at
  concurrency 1, 8 and 32. Reported as speedup over concurrency 1 and as % of linear.
* CPU-bound: pure-Python tasks run by ``--executor process`` with 1 and 2 pool processes
  (meant for a machine with 2 cores). Reported as the speedup of 2 over 1.

Each run is a real worker process on a fresh queue with its backlog sent beforehand; its rate is
measured from the first receive to the empty queue, watching the broker's counts, so the worker's
start-up (imports, client creation) is left out. Only ratios are printed: absolute rates depend on
the machine and the broker.

``make bench`` calls :func:`run` with a fauxqs endpoint; by hand,
``python -m benchmarks.executors ENDPOINT_URL`` (any SQS endpoint) or
``python -m benchmarks.executors sqlite:////tmp/bench.db``, with ``--quick`` for a smoke run.

This module is also the workers' app (``--app benchmarks.executors``): it defines the two tasks.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks import Result
from ebsqs import task
from ebsqs.brokers import MAX_BATCH, Broker, OutgoingMessage, from_url
from ebsqs.config import load_settings
from ebsqs.envelope import Envelope, encode
from ebsqs.producer import ensure_queue

ROOT = Path(__file__).resolve().parent.parent
APP = "benchmarks.executors"

#: The I/O-bound workload: this many tasks, each sleeping this long.
SLEEP_TASKS = 2000
SLEEP_SECONDS = 0.02
#: Concurrency 1 runs a smaller backlog: its rate is steady, and 2,000 tasks would take 40 s.
SLEEP_TASKS_AT_1 = 400
#: The CPU-bound workload: this many tasks of this many loop iterations (about 45 ms each).
CPU_TASKS = 80
CPU_ITERATIONS = 1_000_000


@task
def sleep_briefly(seconds: float) -> None:
    """The I/O-bound task."""
    time.sleep(seconds)


@task
def burn(iterations: int) -> int:
    """The CPU-bound task: pure-Python arithmetic, holding the GIL throughout."""
    total = 0
    for number in range(iterations):
        total += number * number % 7
    return total


@dataclass(frozen=True)
class Workload:
    """One measured run: a backlog of one task, and the worker that drains it."""

    task: str
    args: tuple[object, ...]
    count: int
    executor: str
    concurrency: int


def run(endpoint: str, *, quick: bool = False) -> list[Result]:
    """Measure both workloads against a broker; return ratios.

    Args:
        endpoint: an SQS endpoint (``http://127.0.0.1:PORT``: the workers use ``sqs://`` with
            ``AWS_ENDPOINT_URL_SQS`` set to it), or a broker URL (``sqlite:///...``).
        quick: a smoke-sized run (a tenth of the tasks).
    """
    scale = 10 if quick else 1
    with _broker_environment(endpoint) as env:
        broker = from_url(env["EBSQS_BROKER_URL"])
        try:
            return _measure_all(broker, env, scale)
        finally:
            broker.close()


def _measure_all(broker: Broker, env: Mapping[str, str], scale: int) -> list[Result]:
    sleeping = {
        concurrency: _rate(
            broker,
            env,
            Workload(
                sleep_briefly.name,
                (SLEEP_SECONDS,),
                (SLEEP_TASKS_AT_1 if concurrency == 1 else SLEEP_TASKS) // scale,
                "thread",
                concurrency,
            ),
        )
        for concurrency in (1, 8, 32)
    }
    burning = {
        workers: _rate(
            broker,
            env,
            Workload(burn.name, (CPU_ITERATIONS,), CPU_TASKS // scale, "process", workers),
        )
        for workers in (1, 2)
    }
    results = []
    for concurrency in (8, 32):
        speedup = sleeping[concurrency] / sleeping[1]
        # Share of the threads' time spent in the tasks' sleeps: per-task overheads amortised
        # over many threads can push the speedup over concurrency 1 past linear; this cannot.
        busy = sleeping[concurrency] * SLEEP_SECONDS / concurrency
        results.append(
            Result(
                f"thread, 20 ms sleeps: speedup at concurrency {concurrency} over 1",
                speedup,
                detail=f"{speedup / concurrency:.0%} of linear; threads asleep in tasks "
                f"{busy:.0%} of the time",
            )
        )
    # The same work in two bare processes, side by side: what this machine gives (shared or
    # throttled cores give less than 2), so the executor's own cost is the gap between the two.
    plain = _plain_cpu_speedup(CPU_TASKS // scale)
    results.append(
        Result(
            "process, CPU-bound: speedup of 2 pool processes over 1",
            burning[2] / burning[1],
            detail=f"{burning[2] / burning[1] / 2:.0%} of linear; {os.cpu_count()} CPUs",
        )
    )
    results.append(Result("plain processes, same CPU-bound work: speedup of 2 over 1", plain))
    return results


def _burn_many(count: int) -> None:
    for _ in range(count):
        burn(CPU_ITERATIONS)


def _plain_cpu_speedup(tasks: int) -> float:
    """Speedup of two bare forked processes over one, on the CPU-bound workload."""
    context = multiprocessing.get_context("fork")
    began = time.monotonic()
    _burn_many(tasks)
    one = time.monotonic() - began
    processes = [context.Process(target=_burn_many, args=(tasks // 2,)) for _ in range(2)]
    began = time.monotonic()
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return one / (time.monotonic() - began)


def _rate(broker: Broker, env: Mapping[str, str], workload: Workload) -> float:
    """Tasks per second one worker drains a fresh backlog at (start-up left out)."""
    settings = load_settings(broker_url=env["EBSQS_BROKER_URL"])
    queue = f"bench-executors-{uuid.uuid4().hex[:12]}"
    ensure_queue(broker, settings, queue)
    body = encode(Envelope(task=workload.task, args=workload.args))
    for start in range(0, workload.count, MAX_BATCH):
        size = min(MAX_BATCH, workload.count - start)
        broker.send_batch(queue, [OutgoingMessage(body)] * size)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ebsqs",
            "worker",
            "--app",
            APP,
            "--queues",
            queue,
            "--wait",
            "1",
            "--executor",
            workload.executor,
            "--concurrency",
            str(workload.concurrency),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.DEVNULL,
    )
    try:
        began = _wait_for(lambda: _waiting(broker, queue) < workload.count, worker)
        ended = _wait_for(lambda: _remaining(broker, queue) == 0, worker)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        broker.delete_queue(queue)
        broker.delete_queue(settings.dead_letter_queue_of_physical(queue))
    return workload.count / (ended - began)


def _remaining(broker: Broker, queue: str) -> int:
    """Messages not yet acked: waiting, running or held by the worker."""
    stats = broker.stats(queue)
    return stats.visible + stats.in_flight + stats.delayed


def _waiting(broker: Broker, queue: str) -> int:
    """Messages no worker has received yet."""
    return broker.stats(queue).visible


def _wait_for(
    condition: Callable[[], bool], worker: subprocess.Popen[bytes], timeout: float = 120
) -> float:
    """Poll ``condition`` every 10 ms; return the monotonic time it first held."""
    give_up = time.monotonic() + timeout
    while not condition():
        if worker.poll() is not None:
            raise RuntimeError(f"the benchmark worker exited with code {worker.returncode}")
        if time.monotonic() > give_up:
            raise TimeoutError("the benchmark worker did not drain its queue in time")
        time.sleep(0.01)
    return time.monotonic()


@contextmanager
def _broker_environment(target: str) -> Iterator[dict[str, str]]:
    """The environment for this process's broker and the workers', set for the duration."""
    if "://" in target and not target.startswith("http"):
        changes = {"EBSQS_BROKER_URL": target}
    else:
        changes = {
            "EBSQS_BROKER_URL": "sqs://",
            "AWS_ENDPOINT_URL_SQS": target,
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            # A local emulator accepts any credentials; real ones are never needed here.
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        }
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield dict(os.environ)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{ROOT / 'bench-executors.db'}"
    for result in run(target, quick="--quick" in sys.argv):
        print(f"{result.name}: {result.value:.2f}  ({result.detail})")
