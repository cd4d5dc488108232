"""The master's snapshot in the database, for the dashboard's workers and tasks pages.

:class:`SnapshotPublisher` is a master extension (see :mod:`ebsqs.supervisor.extension`) that
``manage.py process_queue`` (and ``manage.py ebsqs supervise``) adds when this app is
installed: at most every :data:`INTERVAL` seconds it writes the master's status document
(:func:`ebsqs.ops.status.document`) to its row of :class:`~ebsqs.contrib.django.models.
MasterSnapshot`, and deletes rows nobody wrote for :data:`EXPIRE_AFTER` (masters that died
without removing theirs).

It runs in the master's loop, so a write never holds it for long: PostgreSQL gets a statement
and lock timeout of :data:`TIMEOUT` for the write, SQLite a busy timeout as long; the
connection's own connect timeout (``OPTIONS``) is the operator's. A failed write is logged once
(``dashboard_publish_failed``) and dropped; the next one tries again. The connection is closed
after each write, so the master holds none between them (nor across a fork).
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Callable
from typing import Any

from django.db import DatabaseError, connections, router, transaction

from ebsqs.contrib.django.models import MasterSnapshot
from ebsqs.log import get_logger
from ebsqs.ops.status import document
from ebsqs.supervisor.extension import Extension
from ebsqs.supervisor.snapshot import SupervisorSnapshot

log = get_logger(__name__)

#: Seconds between writes of one master's row.
INTERVAL = 5.0
#: Seconds after which a row nobody wrote is deleted.
EXPIRE_AFTER = 600.0
#: Seconds a write may take before the database gives it up.
TIMEOUT = 2.0


class SnapshotPublisher(Extension):
    """Writes the master's status document to its row every :data:`INTERVAL` seconds."""

    def __init__(
        self,
        heartbeat_timeout: float,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.interval = interval
        self.clock = clock
        self.host = socket.gethostname()
        self._last = float("-inf")
        self._failing = False

    def on_ready(self, snapshot: SupervisorSnapshot) -> None:
        self.publish(snapshot)

    def on_tick(self, snapshot: SupervisorSnapshot) -> None:
        if self.clock() - self._last >= self.interval:
            self.publish(snapshot)

    def on_stopping(self, snapshot: SupervisorSnapshot, graceful: bool) -> None:
        self.publish(snapshot)

    def on_stopped(self, snapshot: SupervisorSnapshot, exit_code: int) -> None:
        """Delete this master's row: no one should read a dead master's snapshot."""
        self._guarded(lambda alias: MasterSnapshot.objects.using(alias).filter(
            key=self.key(snapshot)).delete())  # fmt: skip

    def key(self, snapshot: SupervisorSnapshot) -> str:
        return f"{self.host}:{snapshot.pid}"

    def publish(self, snapshot: SupervisorSnapshot) -> None:
        """Write the row now (and expire old rows); failures are logged once and dropped."""
        now = self.clock()
        self._last = now
        doc = document(snapshot, heartbeat_timeout=self.heartbeat_timeout, now=now)
        doc["host"] = self.host
        self._guarded(lambda alias: self._write(alias, snapshot, doc, now))

    def _write(self, alias: str, snapshot: SupervisorSnapshot, doc: Any, now: float) -> None:
        at = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
        rows = MasterSnapshot.objects.using(alias)
        rows.update_or_create(
            key=self.key(snapshot),
            defaults={"host": self.host, "pid": snapshot.pid, "document": doc, "updated_at": at},
        )
        rows.filter(updated_at__lt=at - datetime.timedelta(seconds=EXPIRE_AFTER)).delete()

    def _guarded(self, write: Callable[[str], object]) -> None:
        alias = router.db_for_write(MasterSnapshot)
        connection = connections[alias]
        try:
            with transaction.atomic(using=alias):
                _limit(connection)
                write(alias)
        except (DatabaseError, OSError) as exc:
            if not self._failing:
                self._failing = True
                log.error("dashboard_publish_failed", error_type=type(exc).__name__, error=str(exc))
            return
        finally:
            connection.close()
        if self._failing:
            self._failing = False
            log.info("dashboard_publish_recovered")


def _limit(connection: Any) -> None:
    """Bound how long the write may wait on the database (inside its transaction)."""
    milliseconds = int(TIMEOUT * 1000)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"SET LOCAL statement_timeout = {milliseconds}")
            cursor.execute(f"SET LOCAL lock_timeout = {milliseconds}")
        elif connection.vendor == "sqlite":
            cursor.execute(f"PRAGMA busy_timeout = {milliseconds}")
