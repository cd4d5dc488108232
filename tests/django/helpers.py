"""Helpers for the Django tests: an in-process worker, and ``manage.py`` subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ebsqs import executors
from ebsqs.brokers import Broker, from_url
from ebsqs.config import Settings, load_settings
from ebsqs.worker import Worker, WorkerOptions
from tests.waiting import wait_until

PROJECT = Path(__file__).resolve().parent.parent / "fixtures" / "djproject"


def pending(broker: Broker, settings: Settings, queues: Sequence[str]) -> int:
    """Messages of ``queues`` not yet settled (visible, in flight or delayed)."""
    total = 0
    for queue in queues:
        stats = broker.stats(settings.physical_queue(queue))
        total += stats.visible + stats.in_flight + stats.delayed
    return total


def run_worker(
    queues: Sequence[str], executor: str = "inline", concurrency: int = 1, timeout: float = 20
) -> Worker:
    """Run an in-process worker on ``queues`` (current settings) until they are empty."""
    settings = load_settings(wait_seconds=0, backoff_base=0)
    broker = from_url(settings.broker_url)
    worker = Worker(
        broker,
        settings,
        executors.create(executor, concurrency),
        WorkerOptions(queues=tuple(queues), wait_seconds=0),
    )
    worker.start()
    try:

        def step() -> bool:
            worker.loop_once()
            return pending(broker, settings, queues) == 0 and not worker.status().held

        wait_until(step, timeout, interval=0, message="the worker did not empty its queues")
    finally:
        worker.stop()
        worker.drain()
    return worker


@contextmanager
def managed(*args: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``manage.py <args>`` (its output into ``log``); TERM it, then KILL it, at the end."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", *args],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """TERM the process (the supervisor drains), KILL its group if it lingers; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode
