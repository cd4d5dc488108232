"""Ticks: one due time of one periodic task, and which of them a scheduler sends.

A tick is named by its task and its *scheduled* time, never the time it is sent, so every
scheduler on every host names it the same: ``<task>:<ISO time>`` is its FIFO deduplication id
and its unique row in the Django store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass

from ebsqs.periodic.registry import PeriodicTask

#: SQS's rule for deduplication ids: 1 to 128 printable ASCII characters.
_SQS_ID = re.compile(r"[!-~]{1,128}")


@dataclass(frozen=True, slots=True, order=True)
class Tick:
    """One due time of one task.

    Attributes:
        scheduled_at: the due time (aware, UTC, whole seconds).
        task: the task's registered name.
    """

    scheduled_at: dt.datetime
    task: str

    @property
    def iso(self) -> str:
        """The due time as ``2026-12-03T15:50:00Z``."""
        return iso(self.scheduled_at)

    @property
    def dedup_id(self) -> str:
        """``<task>:<ISO time>``, the FIFO deduplication id of every copy of this tick. A task
        name that SQS would refuse there (too long, not ASCII) is replaced by its SHA-256."""
        plain = f"{self.task}:{self.iso}"
        if _SQS_ID.fullmatch(plain):
            return plain
        digest = hashlib.sha256(self.task.encode()).hexdigest()[:64]
        return f"{digest}:{self.iso}"


def iso(moment: dt.datetime) -> str:
    """An aware time in UTC as ISO 8601 with a ``Z``, to the second."""
    return moment.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    """The inverse of :func:`iso`."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.UTC)


def missed_ticks(
    entry: PeriodicTask, last: dt.datetime | None, started: dt.datetime
) -> tuple[list[Tick], bool]:
    """The ticks a scheduler starting at ``started`` sends for those that fell since ``last``
    (the latest tick known to have been handled), by the task's ``missed`` policy, oldest
    first; and whether it leaves older missed ticks out.

    ``skip`` sends none; ``last`` sends the latest; ``all`` sends them all, capped at the
    task's ``catch_up`` (the latest ones). Nothing was missed when ``last`` is unknown (a
    first start): the schedule begins at ``started``. Ticks are found backwards from
    ``started``, so a long gap costs no more than the cap.
    """
    if last is None:
        return [], False
    wanted = {"skip": 0, "last": 1, "all": entry.catch_up}[entry.missed]
    ticks: list[Tick] = []
    # The latest tick at or before ``started`` (ticks fall on whole seconds).
    moment = entry.schedule.previous_before(
        started.replace(microsecond=0) + dt.timedelta(seconds=1)
    )
    while moment > last and len(ticks) < wanted:
        ticks.append(Tick(moment, entry.name))
        moment = entry.schedule.previous_before(moment)
    ticks.reverse()
    return ticks, moment > last
