"""One ``ebsqs worker`` process against a plain boto3 loop, side by side.

Four ratios, on the same endpoint in one run:

(a) Throughput and CPU seconds per 1,000 tasks of an ``ebsqs worker`` subprocess (inline
    executor, no-op tasks, ``--log-level warning``) against ``benchmarks.plain``'s consumer
    subprocess (receive ten with a long poll, parse, call a no-op, ``delete_message_batch``), on
    identical pre-loaded queues. Both are watched from outside the same way: the clock and the
    process's user+system CPU (psutil) are read when the queue is first seen being consumed and
    when it is first seen empty, polling queue counts every 20 ms. Interpreter start-up and
    imports are therefore left out of both. Runs alternate (ABBA) and medians are compared. The
    worker is measured once more with ``--log-level info --log-format json`` into /dev/null.
(b) SQS requests per task under load: a deep queue filled with ``delay_many`` and drained by an
    ``ebsqs worker`` subprocess, both talking through ``benchmarks.counting_proxy``, which counts
    requests on the wire by action (no hook inside the measured process; every request counts,
    start-up included). The same is done for the plain producer and consumer as a check of the
    method (its floor is 0.3: send, receive and delete in tens).
(c) ``delay_many`` enqueue rate against a plain ``send_message_batch`` loop, in this process,
    sending bodies of the same size (the plain loop sends pre-encoded ebsqs bodies, so the ratio
    charges ebsqs with all of its encoding and checking).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import psutil

from benchmarks import VERBOSE, Drain, Result, median_drain, plain, report
from benchmarks.counting_proxy import counting_proxy
from benchmarks.tasks import noop
from ebsqs import producer
from ebsqs.config import load_settings
from ebsqs.envelope import Envelope, encode
from tests import servers

ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.02
RUN_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Scale:
    """How big a run is."""

    messages: int
    rounds: int
    enqueue_rounds: int


FULL = Scale(messages=10_000, rounds=3, enqueue_rounds=5)
QUICK = Scale(messages=500, rounds=1, enqueue_rounds=1)


class Bench:
    """Queues, bodies and consumer runs against one endpoint."""

    def __init__(self, endpoint: str, scale: Scale) -> None:
        self.endpoint = endpoint
        self.scale = scale
        self.client: Any = boto3.client("sqs", endpoint_url=endpoint)
        self.bodies = [encode(Envelope(task=noop.name, args=(i,))) for i in range(scale.messages)]
        # Subprocesses: pointed at the endpoint, with no EBSQS_* settings of the caller's.
        self.env = {
            name: value
            for name, value in servers.subprocess_env(endpoint).items()
            if not name.startswith("EBSQS_")
        } | {"EBSQS_BROKER_URL": "sqs://"}

    def queue(self, kind: str) -> tuple[str, str]:
        """A new empty queue: (name, URL)."""
        name = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
        return name, self.client.create_queue(QueueName=name)["QueueUrl"]

    def preload(self, url: str) -> None:
        """Fill a queue with the no-op bodies, four senders at once (not measured)."""
        chunks = [self.bodies[i : i + 500] for i in range(0, len(self.bodies), 500)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda chunk: plain.send(self.client, url, chunk), chunks))

    def counts(self, url: str) -> tuple[int, int]:
        """(visible, in flight)."""
        attributes = self.client.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return (
            int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        )

    def plain_consumer(self, kind: str = "plain") -> Drain:
        _, url = self.queue(kind)
        self.preload(url)
        command = [sys.executable, "-m", "benchmarks.plain", "consume", url, str(len(self.bodies))]
        try:
            return self._drain(command, url)
        finally:
            self.client.delete_queue(QueueUrl=url)

    def worker(self, log_level: str = "warning") -> Drain:
        """An ``ebsqs worker``; at info level its JSON log lines go to /dev/null."""
        name, url = self.queue(f"worker-{log_level}")
        self.preload(url)
        command = worker_command(name, len(self.bodies), log_level)
        try:
            return self._drain(command, url, discard_logs=log_level != "warning")
        finally:
            self.client.delete_queue(QueueUrl=url)

    def _drain(self, command: list[str], url: str, discard_logs: bool = False) -> Drain:
        """Start a consumer on a full queue; time and CPU from first consumption to empty."""
        total = len(self.bodies)
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stderr=subprocess.DEVNULL if discard_logs else errors,
            )
            try:
                watched = psutil.Process(process.pid)
                started, cpu0 = self._observe(url, lambda c: c != (total, 0), watched, process)
                ended, cpu1 = self._observe(url, lambda c: c == (0, 0), watched, process)
                code = process.wait(timeout=RUN_TIMEOUT)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            if code != 0:
                errors.seek(0)
                tail = errors.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{' '.join(command[2:4])} exited with {code}:\n{tail}")
        return Drain(total, ended - started, cpu1 - cpu0)

    def _observe(
        self,
        url: str,
        condition: Callable[[tuple[int, int]], bool],
        watched: psutil.Process,
        process: subprocess.Popen[bytes],
    ) -> tuple[float, float]:
        """Poll until the queue's counts meet ``condition``; then the clock and the CPU."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while not condition(self.counts(url)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"consumer stopped or stalled; queue at {self.counts(url)}")
            time.sleep(POLL_SECONDS)
        now = time.monotonic()
        cpu = watched.cpu_times()
        return now, cpu.user + cpu.system


def worker_command(queue: str, tasks: int, log_level: str) -> list[str]:
    """``ebsqs worker`` on ``queue`` that exits after ``tasks`` tasks."""
    return [
        sys.executable, "-m", "ebsqs", "worker", "--app", "benchmarks.tasks", "--queues", queue,
        "--max-tasks", str(tasks), "--log-level", log_level, "--log-format", "json",
    ]  # fmt: skip


# -- (a) -------------------------------------------------------------------------------------


def consumers(bench: Bench) -> list[Result]:
    """Throughput and CPU per 1,000 tasks: worker / plain loop, in rotating order."""
    runners: dict[str, Callable[[], Drain]] = {
        "plain loop": bench.plain_consumer,
        "worker": bench.worker,
        "worker, info logs": lambda: bench.worker("info"),
    }
    runs: dict[str, list[Drain]] = {label: [] for label in runners}
    labels = list(runners)
    bench.plain_consumer()  # warm-up, not counted: the first run on a fresh server is slower
    for round_number in range(bench.scale.rounds):
        # Rotate the order so that drift in the server or the machine hits every kind alike.
        shift = round_number % len(labels)
        for label in labels[shift:] + labels[:shift]:
            measured = runners[label]()
            runs[label].append(measured)
            report(label, measured)
    plain_runs, worker_runs, info_runs = runs.values()
    base, work, info = median_drain(plain_runs), median_drain(worker_runs), median_drain(info_runs)
    return [
        Result(
            "throughput, worker / plain loop",
            work.rate / base.rate,
            ">= 0.9",
            f"{work.rate:.0f} vs {base.rate:.0f} msg/s",
        ),
        Result(
            "CPU s per 1,000 tasks, worker / plain loop",
            work.cpu_per_1000 / base.cpu_per_1000,
            "<= 1.3",
            f"{work.cpu_per_1000:.3f} vs {base.cpu_per_1000:.3f} CPU s",
        ),
        Result(
            "  the same with info logging (JSON to /dev/null): throughput",
            info.rate / base.rate,
            None,
            f"{info.rate:.0f} msg/s",
        ),
        Result(
            "  the same with info logging: CPU per 1,000 tasks",
            info.cpu_per_1000 / base.cpu_per_1000,
            None,
            f"{info.cpu_per_1000:.3f} CPU s",
        ),
    ]


# -- (b) -------------------------------------------------------------------------------------


def requests_per_task(bench: Bench) -> list[Result]:
    """Requests on the wire per task: ``delay_many`` + ``ebsqs worker``, and the plain pair.

    Counts do not vary from run to run, so one run of at most 5,000 tasks is enough.
    """
    total = min(len(bench.bodies), 5000)
    with counting_proxy(bench.endpoint) as (proxy, counter):
        env = {**bench.env, "AWS_ENDPOINT_URL_SQS": proxy}
        name, url = bench.queue("requests")
        with _endpoint(proxy):
            noop.send_with(queue_name=name).delay_many((i,) for i in range(total))
        worker = worker_command(name, total, "warning")
        subprocess.run(worker, cwd=ROOT, env=env, timeout=RUN_TIMEOUT, check=True)
        ebsqs_counts = counter.snapshot()
        bench.client.delete_queue(QueueUrl=url)

        counter.reset()
        _, url = bench.queue("requests-plain")
        plain.send(boto3.client("sqs", endpoint_url=proxy), url, bench.bodies[:total])
        consumer = [sys.executable, "-m", "benchmarks.plain", "consume", url, str(total)]
        subprocess.run(consumer, cwd=ROOT, env=env, timeout=RUN_TIMEOUT, check=True)
        plain_counts = counter.snapshot()
        bench.client.delete_queue(QueueUrl=url)
    return [
        Result(
            "SQS requests per task (delay_many + worker)",
            sum(ebsqs_counts.values()) / total,
            "<= 0.35",
            _breakdown(ebsqs_counts, total),
        ),
        Result(
            "  plain send + consume loops, same count",
            sum(plain_counts.values()) / total,
            None,
            _breakdown(plain_counts, total),
        ),
    ]


def _breakdown(counts: Counter[str], total: int) -> str:
    return ", ".join(f"{action} {count / total:.3f}" for action, count in counts.most_common())


@contextmanager
def _endpoint(url: str) -> Iterator[None]:
    """Point this process's producer at ``url`` for a while (it reads the env when it sends)."""
    saved = os.environ.get("AWS_ENDPOINT_URL_SQS")
    os.environ["AWS_ENDPOINT_URL_SQS"] = url
    producer.broker_for.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL_SQS", None)
        else:
            os.environ["AWS_ENDPOINT_URL_SQS"] = saved
        producer.broker_for.cache_clear()


# -- (c) -------------------------------------------------------------------------------------


def enqueue(bench: Bench) -> list[Result]:
    """``delay_many`` against a plain ``send_message_batch`` loop, in this process."""
    total = len(bench.bodies)
    calls = [(i,) for i in range(total)]
    producer.broker_for.cache_clear()
    ebsqs_broker = producer.broker_for(load_settings().broker_url)

    def send_plain() -> tuple[float, float]:
        _, url = bench.queue("enqueue-plain")
        try:
            return _timed(lambda: plain.send(bench.client, url, bench.bodies))
        finally:
            bench.client.delete_queue(QueueUrl=url)

    def send_ebsqs() -> tuple[float, float]:
        name, url = bench.queue("enqueue-ebsqs")
        ebsqs_broker.stats(name)  # the producer caches the queue's URL, as in a long-lived app
        try:
            return _timed(lambda: noop.send_with(queue_name=name).delay_many(calls))
        finally:
            bench.client.delete_queue(QueueUrl=url)

    send_ebsqs()  # warm up: the client, botocore's loaders
    ebsqs_runs: list[tuple[float, float]] = []
    plain_runs: list[tuple[float, float]] = []
    for round_number in range(bench.scale.enqueue_rounds):
        pair: list[Callable[[], None]] = [
            lambda: plain_runs.append(send_plain()),
            lambda: ebsqs_runs.append(send_ebsqs()),
        ]
        for step in pair if round_number % 2 == 0 else reversed(pair):
            step()
        if VERBOSE:
            print(
                f"    enqueue: ebsqs {total / ebsqs_runs[-1][0]:.0f} msg/s, "
                f"plain {total / plain_runs[-1][0]:.0f} msg/s",
                flush=True,
            )
    ebsqs_seconds = statistics.median(run[0] for run in ebsqs_runs)
    plain_seconds = statistics.median(run[0] for run in plain_runs)
    ebsqs_cpu = statistics.median(run[1] for run in ebsqs_runs)
    plain_cpu = statistics.median(run[1] for run in plain_runs)
    return [
        Result(
            "enqueue rate, delay_many / plain send_message_batch",
            plain_seconds / ebsqs_seconds,
            ">= 0.9",
            f"{total / ebsqs_seconds:.0f} vs {total / plain_seconds:.0f} msg/s",
        ),
        Result(
            "  CPU per 1,000 sends, delay_many / plain",
            ebsqs_cpu / plain_cpu,
            None,
            f"{ebsqs_cpu * 1000 / total:.3f} vs {plain_cpu * 1000 / total:.3f} CPU s",
        ),
    ]


def _timed(action: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``action``."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


# -- entry -----------------------------------------------------------------------------------


def run(endpoint: str, *, quick: bool = False) -> list[Result]:
    """Every worker measure against ``endpoint`` (a fauxqs server)."""
    scale = QUICK if quick else FULL
    print(
        f"  {scale.messages} no-op tasks per run, {scale.rounds} alternating rounds, medians; "
        "ebsqs worker with the inline executor and --log-level warning unless said",
        flush=True,
    )
    bench = Bench(endpoint, scale)
    return [*consumers(bench), *requests_per_task(bench), *enqueue(bench)]
