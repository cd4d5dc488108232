"""Two supervisors (two "hosts") schedule one periodic task on a fauxqs FIFO queue.

Each runs ``ebsqs supervise`` as its own process tree with its own status directory (so its
own state file), and both send every tick of ``every=timedelta(seconds=1)``; the FIFO
deduplication id ``<task>:<scheduled time>`` collapses the copies. Judged on the ledger the
task writes (``tests/fixtures/periodic_tasks.py``): every scheduled second of the window ran,
and ran once, including after one of the two masters stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsqs import producer
from ebsqs.brokers import QueueSettings
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.periodic.ticks import iso
from tests import servers
from tests.faults.harness import EbsqsProcess
from tests.faults.ledger import Ledger
from tests.fixtures import periodic_tasks
from tests.integration.processes import sqs_env
from tests.waiting import wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.fauxqs]

APP = "tests.fixtures.periodic_tasks"
TICK = periodic_tasks.tick.name


@pytest.fixture
def fifo_queue(fauxqs_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    servers.apply_sqs_env(monkeypatch, fauxqs_server)
    producer.broker_for.cache_clear()
    queue = servers.unique_queue_name("periodic", fifo=True)
    broker = SQSBroker()
    broker.ensure_queue(queue, QueueSettings(visibility_timeout=30, fifo=True))
    yield queue
    broker.close()
    producer.broker_for.cache_clear()


def start_host(name: str, queue: str, endpoint: str, tmp_path: Path) -> EbsqsProcess:
    """``ebsqs supervise`` with one child, its status (and state) file in a folder of its own."""
    home = tmp_path / name
    home.mkdir()
    env = sqs_env(
        endpoint,
        **{periodic_tasks.LEDGER_ENV: str(tmp_path / "ledger.txt")},
        EBSQS_DEFAULT_QUEUE=queue,
    )
    flags = ["--app", APP, "--queues", queue, "--workers", "1", "--wait", "1"]
    flags += ["--status-file", str(home / "status.json")]
    return EbsqsProcess("supervise", flags, env, tmp_path / f"{name}.log")


def events(process: EbsqsProcess, event: str) -> list[dict[str, object]]:
    found = []
    for line in process.log_path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


def seconds(start: dt.datetime, count: int) -> list[str]:
    return [iso(start + dt.timedelta(seconds=i)) for i in range(count)]


def test_two_hosts_run_each_tick_once_and_none_is_lost_when_one_stops(
    fifo_queue: str, fauxqs_server: str, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "ledger.txt")
    with (
        start_host("a", fifo_queue, fauxqs_server, tmp_path) as a,
        start_host("b", fifo_queue, fauxqs_server, tmp_path) as b,
    ):
        wait_until(
            lambda: all(events(p, "periodic_scheduler_started") for p in (a, b)),
            30,
            interval=0.1,
            message=lambda: f"{a.describe()}\n{b.describe()}",
        )
        # The window starts once both schedulers run: every second of it is sent by both.
        first = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=2)
        both = seconds(first, 4)
        wait_until(lambda: set(both) <= set(ledger.finished()), 30, interval=0.1,
                   message=lambda: f"ran: {sorted(ledger.finished())}")  # fmt: skip
        # A stops (it drains, and schedules nothing more); B alone carries on, losing nothing.
        a.signal(signal.SIGTERM)
        assert a.process.wait(30) == 0
        after = seconds(first + dt.timedelta(seconds=len(both)), 4)
        wait_until(lambda: set(after) <= set(ledger.finished()), 30, interval=0.1,
                   message=lambda: f"ran: {sorted(ledger.finished())}")  # fmt: skip
        # Both sent the window's first ticks: the duplicates SQS dropped were really sent.
        sent_by_a = {str(r["scheduled_at"]) for r in events(a, "periodic_tick_sent")}
        sent_by_b = {str(r["scheduled_at"]) for r in events(b, "periodic_tick_sent")}
        assert set(both) <= sent_by_a & sent_by_b
        # Let one more tick run, so a late copy of a window tick would have shown by now.
        last = iso(first + dt.timedelta(seconds=len(both) + len(after) + 1))
        wait_until(lambda: last in ledger.finished(), 30, interval=0.1)
    window = [*both, *after]
    finished = ledger.finished()
    assert {key: finished[key] for key in window} == dict.fromkeys(window, 1)
    assert ledger.duplicates() == {}
