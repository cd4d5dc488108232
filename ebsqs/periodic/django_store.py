"""Ticks as database rows: the unique (task, scheduled_at) row is claimed before the send.

Per tick, each scheduler tries one INSERT in its own transaction; the unique constraint lets
one win, and only the winner sends. Then it marks the row sent (one UPDATE). A scheduler that
dies between its claim and that mark leaves a row claimed and not sent: after
:data:`RECLAIM_AFTER` seconds any scheduler takes it over (an UPDATE that only one can win,
since it checks the claim it read) and sends it again. On a FIFO queue the tick's deduplication
id makes that second send harmless (rows are taken over only while their tick is younger than
:data:`RECLAIM_UNTIL`, inside SQS's five-minute window); on a standard queue it means the tick
may run twice when the first scheduler died after its send and before its mark.

Imported only when Django is set up and ``ebsqs.contrib.django`` is installed; its model is
looked up in Django's app registry (``ebsqs.PeriodicTick``), as Django code refers to another
app's models, since the core does not import ``ebsqs.contrib``. Used from the
scheduler's thread, which holds the fork guard while it talks to the database and closes its
connection after each use (so no connection of the master's is copied into a child).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from django.apps import apps
from django.db import IntegrityError, connections, router, transaction
from django.db.models import Max, Model

from ebsqs.periodic.ticks import Tick

T = TypeVar("T")
#: Seconds after which a claimed tick never marked sent may be claimed again.
RECLAIM_AFTER = 60.0
#: Age of a tick past which it is no longer taken over (its copies would escape FIFO dedup).
RECLAIM_UNTIL = 240.0
#: Rows kept this long (each task's latest row is always kept).
KEEP = dt.timedelta(days=7)
#: Seconds a statement may wait on the database (PostgreSQL statement and lock timeouts).
TIMEOUT = 2.0


class DjangoStore:
    """Ticks claimed as rows of ``ebsqs.contrib.django.models.PeriodicTick``.

    Args:
        alias: the database (default: where the router writes ``PeriodicTick``).
        claimer: who claims, written in each row (default ``host:pid``).
    """

    exclusive = True

    def __init__(self, alias: str | None = None, claimer: str | None = None) -> None:
        self.model: type[Model] = apps.get_model("ebsqs", "PeriodicTick")
        self.alias = alias or router.db_for_write(self.model)
        self.claimer = claimer or f"{socket.gethostname()}:{os.getpid()}"

    def last(self, task: str) -> dt.datetime | None:
        found = self._run(
            lambda rows: rows.filter(task=task).aggregate(last=Max("scheduled_at"))["last"]
        )
        return found.astimezone(dt.UTC) if found is not None else None

    def claim(self, tick: Tick, now: dt.datetime) -> bool:
        try:
            self._run(
                lambda rows: rows.create(
                    task=tick.task,
                    scheduled_at=tick.scheduled_at,
                    claimed_by=self.claimer,
                    claimed_at=now,
                )
            )
        except IntegrityError:
            return False  # another scheduler's INSERT won: it sends
        return True

    def sent(self, tick: Tick, now: dt.datetime) -> None:
        self._run(
            lambda rows: rows.filter(task=tick.task, scheduled_at=tick.scheduled_at).update(
                sent_at=now
            )
        )

    def reclaim(self, now: dt.datetime) -> list[Tick]:
        def take(rows: Any) -> list[Tick]:
            stale = list(
                rows.filter(
                    sent_at__isnull=True,
                    claimed_at__lt=now - dt.timedelta(seconds=RECLAIM_AFTER),
                    scheduled_at__gt=now - dt.timedelta(seconds=RECLAIM_UNTIL),
                ).values_list("id", "task", "scheduled_at", "claimed_at")
            )
            taken = []
            for row_id, task, scheduled_at, claimed_at in stale:
                # Only one scheduler's UPDATE matches the claim it read.
                won = rows.filter(id=row_id, claimed_at=claimed_at, sent_at__isnull=True).update(
                    claimed_by=self.claimer, claimed_at=now
                )
                if won:
                    taken.append(Tick(scheduled_at.astimezone(dt.UTC), task))
            return taken

        return self._run(take)

    def prune(self, now: dt.datetime, tasks: list[str]) -> None:
        def delete(rows: Any) -> None:
            for task in tasks:
                latest = rows.filter(task=task).aggregate(last=Max("scheduled_at"))["last"]
                if latest is not None:
                    rows.filter(task=task, scheduled_at__lt=min(latest, now - KEEP)).delete()

        self._run(delete)

    def _run(self, work: Callable[[Any], T]) -> T:
        """``work`` on the rows in one bounded transaction; the connection closed after."""
        connection = connections[self.alias]
        try:
            with transaction.atomic(using=self.alias):
                _limit(connection)
                return work(self.model._default_manager.using(self.alias))
        finally:
            connection.close()


def _limit(connection: Any) -> None:
    milliseconds = int(TIMEOUT * 1000)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"SET LOCAL statement_timeout = {milliseconds}")
            cursor.execute(f"SET LOCAL lock_timeout = {milliseconds}")
        elif connection.vendor == "sqlite":
            cursor.execute(f"PRAGMA busy_timeout = {milliseconds}")
