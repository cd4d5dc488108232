"""The Django store on PostgreSQL: two schedulers, one unique row per tick.

Two schedulers (two "hosts") step through the same seconds at the same moment, each from its
own thread (so each with its own connection, their INSERTs racing), on a *standard* queue of a
memory broker: nothing there collapses copies, so every message counted was sent once.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator

import pytest
from django.db import connections

from ebsqs.contrib.django.models import PeriodicTick
from ebsqs.periodic.django_store import RECLAIM_AFTER, DjangoStore
from ebsqs.periodic.scheduler import Scheduler
from tests.periodic.rig import Clock, Fleet, iso_seconds

pytestmark = [pytest.mark.timeout(60), pytest.mark.postgres]

T0 = 1_800_000_000.0  # a whole second


@pytest.fixture(autouse=True)
def _no_ticks(pg_alias: str) -> Iterator[None]:
    """Each test starts and ends with no tick rows."""
    PeriodicTick.objects.using(pg_alias).all().delete()
    yield
    PeriodicTick.objects.using(pg_alias).all().delete()


def in_step(schedulers: list[Scheduler], step: str) -> None:
    """Run ``step`` of every scheduler at once, each in a thread of its own."""
    barrier = threading.Barrier(len(schedulers))
    errors: list[Exception] = []

    def run(scheduler: Scheduler) -> None:
        barrier.wait(10)
        try:
            getattr(scheduler, step)()
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not errors, errors


def rows(alias: str) -> list[tuple[str, str | None]]:
    found = PeriodicTick.objects.using(alias).order_by("scheduled_at")
    return [(r.scheduled_at.strftime("%H:%M:%S"), r.claimed_by) for r in found if r.sent_at]


def test_two_schedulers_send_each_tick_once_through_unique_rows(pg_alias: str) -> None:
    fleet = Fleet("ticks")  # a standard queue: allowed with this store
    clock = Clock(T0)
    hosts = [fleet.scheduler(DjangoStore(pg_alias, f"host-{n}"), clock) for n in "ab"]
    in_step(hosts, "start_plans")
    for second in range(1, 7):
        clock.now = T0 + second + 0.2
        in_step(hosts, "run_once")
    assert fleet.sent() == iso_seconds(T0 + 1, 6)  # six seconds, each sent once
    claimed = PeriodicTick.objects.using(pg_alias)
    assert claimed.count() == 6 and not claimed.filter(sent_at__isnull=True).exists()


def test_a_claim_never_marked_sent_is_taken_over_by_one_scheduler(pg_alias: str) -> None:
    fleet = Fleet("ticks")
    clock = Clock(T0)
    abandoned = dt.datetime.fromtimestamp(T0 - RECLAIM_AFTER - 5, dt.UTC)
    PeriodicTick.objects.using(pg_alias).create(
        task=fleet.task.name, scheduled_at=abandoned, claimed_by="dead-host", claimed_at=abandoned
    )
    hosts = [fleet.scheduler(DjangoStore(pg_alias, f"host-{n}"), clock) for n in "ab"]
    in_step(hosts, "start_plans")  # missed="skip": nothing is caught up
    assert fleet.sent() == []
    clock.now = T0 + 0.5
    in_step(hosts, "run_once")
    assert fleet.sent() == iso_seconds(T0 - RECLAIM_AFTER - 5, 1)  # once, not twice
    row = PeriodicTick.objects.using(pg_alias).get(scheduled_at=abandoned)
    assert row.sent_at is not None and row.claimed_by in {"host-a", "host-b"}


def test_missed_all_catches_up_from_the_rows_once_across_schedulers(pg_alias: str) -> None:
    fleet = Fleet("ticks", missed="all")
    clock = Clock(T0)
    hosts = [fleet.scheduler(DjangoStore(pg_alias, f"host-{n}"), clock) for n in "ab"]
    in_step(hosts, "start_plans")
    clock.now = T0 + 1.1
    in_step(hosts, "run_once")
    assert fleet.sent() == iso_seconds(T0 + 1, 1)
    # Every scheduler is down until T0 + 5.5; the rows say the last tick that ran was T0 + 1.
    clock.now = T0 + 5.5
    restarted = [fleet.scheduler(DjangoStore(pg_alias, f"host-{n}"), clock) for n in "cd"]
    in_step(restarted, "start_plans")
    assert fleet.sent() == iso_seconds(T0 + 2, 4)  # seconds 2 to 5, each once
