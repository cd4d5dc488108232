"""Per-task stats the worker loop keeps for heartbeats and metrics, stepped on the memory broker."""

from __future__ import annotations

import pytest

from ebsqs import task
from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings
from ebsqs.counters import REJECTED, TaskStats
from ebsqs.envelope import Envelope, encode
from ebsqs.executors.inline import InlineExecutor
from ebsqs.registry import TaskRegistry
from ebsqs.worker import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(10)


class Boom(Exception):
    pass


def run_all(registry: TaskRegistry, bodies: list[str]) -> Worker:
    broker = MemoryBroker()
    broker.ensure_queue("q", QueueSettings(dead_letter_queue="q-dlq"))
    for body in bodies:
        broker.send("q", OutgoingMessage(body))
    settings = Settings(broker_url="memory://unused", backoff_base=0)
    worker = Worker(
        broker,
        settings,
        InlineExecutor(registry=registry),
        WorkerOptions(queues=("q",), wait_seconds=0),
        registry=registry,
    )
    worker.start()
    for _ in range(20):
        worker.loop_once()
    return worker


def body(name: str, max_retries: int = 0) -> str:
    return encode(Envelope(task=name, max_retries=max_retries))


def counts(stats: TaskStats) -> tuple[int, int, int, int, int]:
    return (
        stats.succeeded,
        stats.failed,
        stats.retried,
        stats.dead_lettered,
        stats.attempts,
    )


def test_outcomes_are_counted_per_task() -> None:
    registry = TaskRegistry()
    attempts: dict[str, int] = {}

    @task(name="ok", registry=registry)
    def ok() -> None:
        pass

    @task(name="flaky", registry=registry, max_retries=1, retry_on=(Boom,))
    def flaky() -> None:
        attempts["flaky"] = attempts.get("flaky", 0) + 1
        if attempts["flaky"] == 1:
            raise Boom()

    @task(name="broken", registry=registry)
    def broken() -> None:
        raise ValueError("no")

    worker = run_all(
        registry,
        [body("ok"), body("ok"), body("flaky", max_retries=1), body("broken"), body("nope")],
    )
    tasks = worker.counters.tasks
    assert counts(tasks["ok"]) == (2, 0, 0, 0, 2)
    assert counts(tasks["flaky"]) == (1, 0, 1, 0, 2)  # both attempts have a duration
    assert counts(tasks["broken"]) == (0, 1, 0, 1, 1)
    assert counts(tasks[REJECTED]) == (0, 0, 0, 1, 0)  # an unknown task never runs
    assert worker.counters.total("dead_lettered") == 2  # the rejected message counts once


def test_totals_match_the_per_task_sums() -> None:
    registry = TaskRegistry()
    task(name="ok", registry=registry)(lambda: None)
    worker = run_all(registry, [body("ok")] * 7)
    assert worker.counters.total("succeeded") == worker.counters.tasks["ok"].succeeded == 7
