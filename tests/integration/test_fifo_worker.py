"""A worker on a FIFO queue whose server hands out several messages of a group per receive.

Real SQS (and moto's server, used here: one consumer, a handful of messages) returns up to ten
messages of one group in order in a single receive. The worker must then run them one at a
time, in that order, even on an executor that runs tasks side by side, and when one of them
goes back to the queue (a retry), the ones behind it must go back too, unrun.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from ebsqs import middleware, producer, task
from ebsqs.brokers import QueueSettings
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.config import Settings
from ebsqs.context import current
from ebsqs.executors.execution import Job
from ebsqs.executors.inline import InlineExecutor
from ebsqs.executors.thread import ThreadExecutor
from ebsqs.registry import TaskRegistry
from ebsqs.worker import Worker, WorkerOptions
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

#: (key, attempt, started, finished), appended by the tasks from the executor's threads.
runs: list[tuple[str, int, float, float]] = []
lock = threading.Lock()


@pytest.fixture
def fifo_queue(sqs_env: str, unique_queue: object) -> Iterator[tuple[SQSBroker, str]]:
    producer.broker_for.cache_clear()
    runs.clear()
    broker = SQSBroker()
    queue = unique_queue(fifo=True)  # type: ignore[operator]
    dlq = Settings().dead_letter_queue_of_physical(queue)
    broker.ensure_queue(queue, QueueSettings(dead_letter_queue=dlq, fifo=True))
    yield broker, queue
    broker.close()
    producer.broker_for.cache_clear()


def test_one_group_runs_in_order_one_at_a_time_on_a_thread_pool(
    fifo_queue: tuple[SQSBroker, str],
) -> None:
    broker, queue = fifo_queue
    reg = TaskRegistry()

    @task(name="step", registry=reg, max_retries=1, retry_on=(ValueError,))
    def step(key: str) -> None:
        started = time.monotonic()
        time.sleep(0.02)  # long enough for overlapping runs to show
        if key == "k3" and current().attempt == 1:
            raise ValueError("first attempt of k3 fails")
        with lock:
            runs.append((key, current().attempt, started, time.monotonic()))

    settings = Settings(broker_url="sqs://", backoff_base=0, auto_create_queues=False)
    keys = [f"k{i}" for i in range(8)]
    other = [f"o{i}" for i in range(4)]
    for group, members in (("G", keys), ("H", other)):
        options = producer.SendOptions(queue, group_id=group)
        calls = [producer.Call((key,)) for key in members]
        producer.send_now(step, calls, options, settings=settings)
    worker = Worker(
        broker,
        settings,
        ThreadExecutor(4, registry=reg),
        WorkerOptions(queues=(queue,), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    try:
        wait_until(
            lambda: worker.loop_once() or len(runs) == len(keys) + len(other),
            45,
            interval=0,
            message=lambda: f"ran {runs}",
        )
    finally:
        worker.stop()
        worker.drain()
    in_g = [run for run in runs if run[0].startswith("k")]
    assert [key for key, *_ in in_g] == keys  # in order, k3 on its second attempt
    assert dict((key, attempt) for key, attempt, *_ in in_g)["k3"] == 2
    for before, after in itertools.pairwise(in_g):
        assert after[2] >= before[3], f"{after[0]} started before {before[0]} finished"
    assert sorted(key for key, *_ in runs if key.startswith("o")) == other


def test_a_deferred_head_keeps_the_rest_of_its_group_from_starting_in_the_same_pass(
    fifo_queue: tuple[SQSBroker, str],
) -> None:
    """A middleware defers a group's head: what follows it in hand must go back unrun, not
    start in the same pass over the messages waiting (the same path as a retry collected
    between two starts, which failed once in CI on a thread pool)."""
    broker, queue = fifo_queue
    reg = TaskRegistry()

    @task(name="step", registry=reg)
    def step(key: str) -> None:
        with lock:
            runs.append((key, current().attempt, 0.0, 0.0))

    class DeferOnce(middleware.Middleware):
        deferred = False

        def before_start(self, job: Job) -> middleware.Decision:
            if job.envelope.args == ("k0",) and not self.deferred:
                self.deferred = True
                return middleware.defer(0, "not yet")
            return middleware.RUN

    saved = list(middleware.MIDDLEWARE)
    middleware.MIDDLEWARE[:] = [DeferOnce()]
    settings = Settings(broker_url="sqs://", auto_create_queues=False)
    keys = [f"k{i}" for i in range(4)]
    producer.send_now(
        step,
        [producer.Call((key,)) for key in keys],
        producer.SendOptions(queue, group_id="G"),
        settings=settings,
    )
    worker = Worker(
        broker,
        settings,
        InlineExecutor(registry=reg),
        WorkerOptions(queues=(queue,), wait_seconds=0),
        registry=reg,
    )
    worker.start()
    try:
        wait_until(
            lambda: worker.loop_once() or len(runs) == len(keys),
            45,
            interval=0,
            message=lambda: f"ran {runs}",
        )
    finally:
        worker.stop()
        worker.drain()
        middleware.MIDDLEWARE[:] = saved
    assert [key for key, *_ in runs] == keys
