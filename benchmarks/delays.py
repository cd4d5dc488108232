"""What a long delay costs in SQS requests: parking (the default) against 15-minute hops.

A day cannot be waited out, and no local SQS server has a clock a test can move, so this runs
the real worker loop on the memory broker with a clock moved by hand: each time nothing is due,
the clock jumps to the moment the message is next visible. The broker counts what SQS would
bill: sends, visibility changes, deletes, and the receives that brought the message (an idle
queue's empty polls are the idle cost, measured in ``latency``). The message is sent as the
producer sends it: with SQS's longest delay, 15 minutes, and its due time in the body.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks import Result
from ebsqs import task
from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.config import Settings
from ebsqs.envelope import Envelope, encode
from ebsqs.executors.inline import InlineExecutor
from ebsqs.registry import TaskRegistry
from ebsqs.worker import Worker, WorkerOptions
from tests.clock import FakeClock
from tests.counting import CountingBroker

DAY = 86400.0


@contextmanager
def _moved_clock() -> Iterator[FakeClock]:
    """``time.time`` replaced by a clock moved by hand (the due time is wall-clock)."""
    real = time.time
    clock = FakeClock(real())
    time.time = clock  # type: ignore[assignment]
    try:
        yield clock
    finally:
        time.time = real  # type: ignore[assignment]


def requests_for(delay: float, park: bool) -> tuple[int, int]:
    """(requests, dead letters) for one message delayed ``delay`` seconds, until it has run."""
    registry = TaskRegistry()
    runs: list[float] = []
    with _moved_clock() as clock:
        task(name="bench.later", registry=registry)(lambda: runs.append(clock()))
        broker = CountingBroker(clock)
        broker.ensure_queue("q", QueueSettings(dead_letter_queue="q-dlq"))
        broker.ensure_queue("q-dlq", QueueSettings())
        due = clock() + delay
        body = encode(Envelope(task="bench.later", due=due))
        broker.send("q", OutgoingMessage(body, delay=900))
        worker = Worker(
            broker,
            Settings(broker_url="memory://", park_delays=park),
            InlineExecutor(registry=registry),
            WorkerOptions(queues=("q",), wait_seconds=0),
            registry=registry,
        )
        worker.start()
        try:
            while not runs:
                for _ in range(2):
                    worker.loop_once()
                worker.flush(timeout=10)
                waiting = [m.visible_at for m in broker._queues["q"].messages.values()]
                if not runs and waiting:
                    clock.now = max(clock.now, min(waiting)) + 0.01
                if clock.now > due + 3600:
                    raise RuntimeError("the delayed message never ran")
        finally:
            worker.drain()
        return sum(broker.requests.values()), broker.stats("q-dlq").visible


def run(endpoint: str, quick: bool = False) -> list[Result]:
    """Requests per day of delay, parked and hopped, for a 1-day and a 7-day delay."""
    del endpoint  # nothing here talks to SQS (see the module's docstring)
    results = []
    for days in (1,) if quick else (1, 7):
        parked, parked_dead = requests_for(days * DAY, park=True)
        hopped, hopped_dead = requests_for(days * DAY, park=False)
        results.append(
            Result(
                f"{days}-day delay: requests per day, parked",
                parked / days,
                "<= 8",
                f"{parked} requests in all, {parked_dead} dead letters",
            )
        )
        results.append(
            Result(
                f"{days}-day delay: requests, parked / 15-minute hops",
                parked / hopped,
                detail=f"hops: {hopped} requests, {hopped_dead} dead letters",
            )
        )
    return results
