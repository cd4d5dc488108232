"""Two real masters (two "hosts") schedule one periodic task through the Django store.

Each runs ``manage.py ebsqs supervise`` as its own process tree, with its own status file, on the
fixture project with ``djproject.settings_periodic`` (its router puts ``PeriodicTick`` rows in
this suite's PostgreSQL database). The task (``tests/fixtures/periodic_tasks.py``) runs every
second on a *standard* fauxqs queue, so nothing but the unique ``(task, scheduled_at)`` row can
stop the two schedulers' copies from both running. Judged on the ledger the task writes (what
ran) and on the rows (who claimed each tick), cross-checked with each master's
``periodic_tick_sent`` log: every scheduled second of the window ran exactly once, each was
claimed by one master and sent by that one, both masters took part, and after one master
stopped the other alone carried on, still once per tick.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from ebsqs.contrib.django.models import PeriodicTick
from ebsqs.periodic.ticks import iso
from tests.django.conftest import djproject_env
from tests.django.helpers import managed
from tests.faults.conftest import rig  # noqa: F401 - the fault suite's rig: queue and ledger
from tests.faults.harness import Rig
from tests.waiting import wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.postgres, pytest.mark.fauxqs]

# Not imported: importing the app would register its periodic tasks in this process too.
APP = "tests.fixtures.periodic_tasks"
TICK = f"{APP}.tick"
SETTINGS = "djproject.settings_periodic"
#: Seconds of the window in which both masters schedule (at least; see below), and after.
BOTH = 6
AFTER = 4
SECOND = dt.timedelta(seconds=1)


@pytest.fixture(autouse=True)
def _no_ticks(pg_alias: str) -> Iterator[None]:
    """Each test starts and ends with no tick rows."""
    PeriodicTick.objects.using(pg_alias).all().delete()
    yield
    PeriodicTick.objects.using(pg_alias).all().delete()


def start_master(
    name: str, the_rig: Rig, endpoint: str
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """``manage.py ebsqs supervise`` with one child, its status file in a folder of its own."""
    home = the_rig.tmp_path / name
    home.mkdir()
    carried = {
        k: v
        for k, v in the_rig.env(endpoint, EBSQS_DEFAULT_QUEUE=the_rig.queue).items()
        if k.startswith(("AWS_", "EBSQS_"))
    }
    env = djproject_env(**carried, DJANGO_SETTINGS_MODULE=SETTINGS)
    argv = ["ebsqs", "supervise", "--app", APP, "--queues", the_rig.queue, "--workers", "1"]
    argv += ["--wait", "1", "--status-file", str(home / "status.json"), "--log-format", "json"]
    return managed(*argv, env=env, log=the_rig.tmp_path / f"{name}.log")


def events(log: Path, event: str) -> list[dict[str, object]]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


def claims(alias: str) -> dict[str, str | None]:
    """``{tick: who claimed it}`` of the rows marked sent (a row is unique per tick)."""
    rows = PeriodicTick.objects.using(alias).filter(task=TICK, sent_at__isnull=False)
    return {iso(row.scheduled_at): row.claimed_by for row in rows}


def seconds(start: dt.datetime, count: int) -> list[str]:
    return [iso(start + i * SECOND) for i in range(count)]


def test_two_masters_claim_each_tick_once_on_a_standard_queue_and_one_carries_on(
    rig: Rig,  # noqa: F811 - the fixture imported above
    fauxqs_server: str,
    pg_alias: str,
) -> None:
    rig.create(visibility=30)
    ledger = rig.ledger
    logs = {name: rig.tmp_path / f"{name}.log" for name in "ab"}

    def state() -> str:
        tails = "\n".join(
            f"--- {name}:\n" + "\n".join(path.read_text().splitlines()[-15:])
            for name, path in logs.items()
        )
        return f"ran: {sorted(ledger.finished().items())}\nclaims: {claims(pg_alias)}\n{tails}"

    with (
        start_master("a", rig, fauxqs_server) as a,
        start_master("b", rig, fauxqs_server) as b,
    ):
        host = socket.gethostname()
        claimer = {"a": f"{host}:{a.pid}", "b": f"{host}:{b.pid}"}  # the store's host:pid
        wait_until(
            lambda: all(events(path, "periodic_scheduler_started") for path in logs.values()),
            45,
            interval=0.1,
            message=state,
        )
        # The window starts once both schedulers run. It lasts BOTH seconds, or longer until
        # each master has claimed some of its ticks (who wins a tick's INSERT is a race).
        first = dt.datetime.now(dt.UTC).replace(microsecond=0) + 2 * SECOND

        def shared() -> list[str]:
            ran, claimed = ledger.finished(), claims(pg_alias)
            window, moment = [], first
            while iso(moment) in ran and iso(moment) in claimed:
                window.append(iso(moment))
                moment += SECOND
            took_part = {claimed[key] for key in window}
            return window if len(window) >= BOTH and len(took_part) >= 2 else []

        both = wait_until(shared, 25, interval=0.2, message=state)
        # A stops (it drains, and schedules nothing more); B alone carries on.
        a.send_signal(signal.SIGTERM)
        assert a.wait(30) == 0, state()
        stopped = dt.datetime.now(dt.UTC)
        after = seconds(stopped.replace(microsecond=0) + SECOND, AFTER)
        wait_until(lambda: set(after) <= set(ledger.finished()), 30, interval=0.1, message=state)
        # One more tick, so a second copy of a window tick would have run by now.
        last = iso(stopped.replace(microsecond=0) + (AFTER + 2) * SECOND)
        wait_until(lambda: last in ledger.finished(), 30, interval=0.1, message=state)
        sent_by = {
            name: {str(r["scheduled_at"]) for r in events(path, "periodic_tick_sent")}
            for name, path in logs.items()
        }
    # Every second from the window's first to its last, across A's stop, ran exactly once.
    end = stopped.replace(microsecond=0) + AFTER * SECOND  # the scheduled time of after[-1]
    window = seconds(first, int((end - first).total_seconds()) + 1)
    finished = ledger.finished()
    assert {key: finished[key] for key in window} == dict.fromkeys(window, 1), state()
    assert ledger.duplicates() == {}, state()  # the edges too
    # Each tick's row was claimed by one of the two masters, and that master alone sent it.
    claimed = claims(pg_alias)
    assert {key: claimed.get(key) for key in window} == {
        key: next((claimer[n] for n in "ab" if key in sent_by[n]), None) for key in window
    }, (sent_by, state())
    assert not sent_by["a"] & sent_by["b"], sent_by
    # Both took part while both ran; after A stopped, B claimed every tick.
    assert {claimed[key] for key in both} == set(claimer.values()), (claimer, state())
    assert {claimed[key] for key in after} == {claimer["b"]}, (claimer, state())
