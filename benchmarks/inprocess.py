"""CPU per task of an ebsqs ``Worker`` against a plain boto3 loop, alternating in one process.

``python -m benchmarks.inprocess MESSAGES ROUNDS LEVEL`` (the endpoint and credentials from the
environment, as for ``ebsqs``) fills a fresh queue for each run, drains it with the plain loop of
:mod:`benchmarks.plain`, then with a ``Worker`` built as ``ebsqs worker`` builds it (inline
executor, logging configured at LEVEL, JSON into stderr), and prints the CPU seconds per task of
each run as one JSON object on stdout. Measured in one process, the two share its warm imports,
its allocator and the machine's moment, so the ratio moves far less between runs than one of two
processes measured from outside: it shows what ebsqs's own per-task work costs.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import boto3

from benchmarks import plain
from benchmarks.tasks import noop
from ebsqs import log
from ebsqs.brokers import from_url
from ebsqs.config import load_settings
from ebsqs.envelope import Envelope, encode
from ebsqs.executors import create
from ebsqs.registry import registry
from ebsqs.worker import Worker, WorkerOptions


def plain_drain(client: Any, url: str, count: int) -> float:
    """CPU seconds per task of :func:`benchmarks.plain.consume`'s loop on a full queue."""
    started = time.process_time()
    plain.consume_with(client, url, count, wait_seconds=1)
    return (time.process_time() - started) / count


def ebsqs_drain(queue: str, count: int) -> float:
    """CPU seconds per task of an inline ``Worker`` (every thread of it) on a full queue."""
    settings = load_settings(broker_url="sqs://")
    worker = Worker(
        from_url(settings.broker_url),
        settings,
        create("inline", 1, registry),
        WorkerOptions(queues=(queue,), wait_seconds=1, max_tasks=count, ack_wait=settings.ack_wait),
    )
    worker.start()
    started = time.process_time()
    worker.run()
    spent = time.process_time() - started
    if worker.counters.total("succeeded") != count:
        raise RuntimeError(f"the worker ran {worker.counters.total('succeeded')} of {count} tasks")
    return spent / count


def main(argv: Sequence[str]) -> None:
    count, rounds, level = int(argv[0]), int(argv[1]), argv[2]
    log.configure("json", level, role="worker")
    admin = boto3.client("sqs")
    client = boto3.client("sqs")
    bodies = [encode(Envelope(task=noop.name, args=(i,))) for i in range(count)]
    runs: dict[str, list[float]] = {"plain": [], "ebsqs": []}
    for _ in range(rounds):
        for kind in runs:
            name = f"bench-inprocess-{kind}-{uuid.uuid4().hex[:8]}"
            url = admin.create_queue(QueueName=name)["QueueUrl"]
            try:
                plain.send(admin, url, bodies)
                cpu = (
                    plain_drain(client, url, count) if kind == "plain" else ebsqs_drain(name, count)
                )
                runs[kind].append(cpu)
            finally:
                admin.delete_queue(QueueUrl=url)
    print(json.dumps(runs), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
