"""The durable outbox: commit-to-send latency through a live relay, and its idle cost.

On fauxqs and PostgreSQL (127.0.0.1:5432, trust auth), with the fixture project
(``tests/fixtures/djproject``, ``settings_outbox``) on a database made for the run:

1. A relay runs as the supervisor runs it: :func:`ebsqs.contrib.django.outbox.run_relay` in a
   thread of its own, with its own database connection and a ``LISTEN`` one. Every statement it
   sends to the database is counted (a Django execute wrapper on its connection).
2. This process commits one transaction with one ``.delay()`` every ``--spacing`` seconds (so
   the relay is idle before each one) and a thread long-polls the queue straight from fauxqs.
   Latency is from the commit returning to the message being received: commit-to-send plus one
   receive, so an upper bound of commit-to-send. p50 and p95 are printed.
3. Idle cost: the relay's statements over ``--idle`` seconds with the table empty, a minute.

Usage: ``python -m benchmarks.outbox [--count 200] [--spacing 0.1] [--idle 30]``, or as the
last module of ``python -m benchmarks`` (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from benchmarks import Result
from ebsqs import log
from tests import postgres, servers

PROJECT = servers.ROOT / "tests" / "fixtures" / "djproject"
ADMIN_DSN = postgres.DSN


@dataclass(frozen=True, slots=True)
class Scale:
    """How big a run is."""

    count: int = 200  # transactions timed
    spacing: float = 0.1  # seconds between them
    idle: float = 30.0  # seconds of the idle window


QUICK = Scale(count=50, spacing=0.1, idle=10.0)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.outbox``: start fauxqs, run, print."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outbox", description=__doc__)
    parser.add_argument("--count", type=int, default=Scale.count, help="transactions to time")
    parser.add_argument("--spacing", type=float, default=Scale.spacing, help="seconds between")
    parser.add_argument("--idle", type=float, default=Scale.idle, help="seconds of idle window")
    args = parser.parse_args(argv)
    scale = Scale(args.count, args.spacing, args.idle)
    log.configure("console", "warning")  # as `python -m benchmarks` does: results, not logs
    with servers.fauxqs_server() as endpoint:
        results = measure(endpoint, scale)
    print(f"outbox: {scale.count} transactions, one .delay() each, every {scale.spacing} s,")
    print("  through a relay thread (PostgreSQL, LISTEN); the LISTEN connection costs no query")
    for result in results:
        print(f"  {result.name}: {result.value:.1f}  {result.goal or ''}  ({result.detail})")
    return 0 if all(result.met is not False for result in results) else 1


def run(endpoint: str, quick: bool = False) -> list[Result]:
    """What ``python -m benchmarks`` calls (last: it sets Django up in its process); nothing,
    saying why, when PostgreSQL does not answer."""
    import psycopg

    try:
        psycopg.connect(ADMIN_DSN).close()
    except psycopg.OperationalError as exc:
        print(f"  not available: no PostgreSQL on 127.0.0.1:5432 ({exc})")
        return []
    return measure(endpoint, QUICK if quick else Scale())


def measure(endpoint: str, scale: Scale) -> list[Result]:
    """Make a database, set the fixture project up on it, measure, drop the database."""
    import psycopg

    name = f"ebsqs_outbox_bench_{os.getpid()}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        return _measure(endpoint, name, scale)
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _measure(endpoint: str, database: str, scale: Scale) -> list[Result]:
    queue = f"outbox-bench-{uuid.uuid4().hex[:8]}"
    env = {
        **servers.sqs_env_vars(endpoint),
        "DJANGO_SETTINGS_MODULE": "djproject.settings_outbox",
        "DJPROJECT_POSTGRES": database,
        "DJPROJECT_SQLITE": str(Path(tempfile.mkdtemp()) / "default.sqlite3"),
        "EBSQS_DEFAULT_QUEUE": queue,
    }
    os.environ.update(env)
    sys.path[:0] = [str(PROJECT)]
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction

    from benchmarks.tasks import noop

    call_command("migrate", database="postgres", verbosity=0)
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName=queue)["QueueUrl"]

    received: dict[str, float] = {}
    done = threading.Event()
    receiver = threading.Thread(target=receive, args=(sqs, url, received, done), daemon=True)
    receiver.start()
    counted: list[float] = []
    stop = threading.Event()
    relay = threading.Thread(target=run_counted_relay, args=(counted, stop), daemon=True)
    relay.start()
    try:
        time.sleep(1.0)  # the relay's start (its connections, LISTEN) stays out of the timings
        committed: dict[str, float] = {}
        for i in range(scale.count):
            with transaction.atomic(using="postgres"):
                task_id = noop.delay(i)
            committed[task_id] = time.perf_counter()
            time.sleep(scale.spacing)
        deadline = time.monotonic() + 30
        while len(received) < scale.count and time.monotonic() < deadline:
            time.sleep(0.1)
        latencies = sorted((received[t] - committed[t]) * 1000 for t in committed if t in received)
        time.sleep(1.0)
        before = len(counted)
        time.sleep(scale.idle)
        idle = (len(counted) - before) * 60 / scale.idle
    finally:
        stop.set()
        done.set()
        relay.join(10)
        receiver.join(5)
    return results(scale, latencies, idle)


def receive(sqs: object, url: str, received: dict[str, float], done: threading.Event) -> None:
    """Long-poll the queue straight from fauxqs; note when each task id first arrived."""
    while not done.is_set():
        answer = sqs.receive_message(  # type: ignore[attr-defined]
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        )
        now = time.perf_counter()
        for message in answer.get("Messages", []):
            received.setdefault(json.loads(message["Body"])["id"], now)
            sqs.delete_message(  # type: ignore[attr-defined]
                QueueUrl=url, ReceiptHandle=message["ReceiptHandle"]
            )


def run_counted_relay(counted: list[float], stop: threading.Event) -> None:
    """The relay loop, as the supervisor's thread runs it, counting its statements."""
    from django.db import connections

    from ebsqs.config import load_settings
    from ebsqs.contrib.django import outbox

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        counted.append(time.monotonic())
        return execute(sql, params, many, context)

    options = outbox.outbox_options()
    relay = outbox.Relay(load_settings(), options.alias, max_backoff=options.max_backoff)
    waker = outbox.Waker(options.alias, outbox.poll_interval(options.alias, options))
    try:
        with connections[options.alias].execute_wrapper(count):
            outbox.run_relay(relay, waker, stop_after(stop, waker))
    finally:
        waker.close()
        connections[options.alias].close()


def stop_after(stop: threading.Event, waker: Any) -> threading.Event:
    """``stop``, which also nudges the waker when set (from another thread)."""

    def nudge_when_set() -> None:
        stop.wait()
        waker.nudge()

    threading.Thread(target=nudge_when_set, daemon=True).start()
    return stop


def results(scale: Scale, latencies: list[float], idle: float) -> list[Result]:
    """The report's lines: p50 (goal under 100 ms), p95, the idle statements a minute."""
    if not latencies:
        return [Result("commit to received, p50 ms", float("inf"), "<= 100", "nothing arrived")]
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
    arrived = f"{len(latencies)}/{scale.count} arrived"
    return [
        Result("commit to received, p50 ms", p50, "<= 100", arrived),
        Result("commit to received, p95 ms", p95, None, f"max {latencies[-1]:.1f} ms"),
        Result("idle relay, statements a minute", idle, None, f"over {scale.idle:.0f} s"),
    ]


if __name__ == "__main__":
    sys.exit(main())
