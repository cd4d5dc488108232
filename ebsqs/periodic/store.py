"""Where a scheduler records the ticks it handled: what decides who sends, and what was missed.

- :class:`FileStore` (FIFO queues, no Django): every scheduler sends every tick, and SQS's
  FIFO deduplication collapses the copies; the store only remembers, per host, the latest tick
  of each task, so a restart knows what it missed.
- :class:`~ebsqs.periodic.django_store.DjangoStore`: one row per tick, claimed by INSERT; only
  the scheduler whose INSERT wins sends.

Both are used only by the scheduler's thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ebsqs.periodic.ticks import Tick, parse_iso

#: The state file's name, in the directory of the master's status file.
STATE_FILE = "periodic-state.json"


class Store(Protocol):
    """What the scheduler asks of a store."""

    #: Whether this store alone keeps a tick from running twice (no FIFO queue needed).
    exclusive: bool

    def last(self, task: str) -> dt.datetime | None:
        """The latest tick of ``task`` known to have been handled, or None."""
        ...

    def claim(self, tick: Tick, now: dt.datetime) -> bool:
        """Whether this scheduler should send ``tick`` (False: another one has it)."""
        ...

    def sent(self, tick: Tick, now: dt.datetime) -> None:
        """``tick`` was sent."""
        ...

    def reclaim(self, now: dt.datetime) -> list[Tick]:
        """Ticks another scheduler claimed and never marked sent, now this one's to send."""
        ...

    def prune(self, now: dt.datetime, tasks: list[str]) -> None:
        """Forget old ticks (keeping each task's latest)."""
        ...


class FileStore:
    """The latest tick of each task, in a JSON file shared by this host's masters.

    Writes take an exclusive ``flock`` and keep the later of two times, so several masters
    with one state directory never move a task back. It knows nothing of other hosts.

    Args:
        path: the state file.
    """

    exclusive = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def last(self, task: str) -> dt.datetime | None:
        text = self._read().get(task)
        return parse_iso(text) if text else None

    def claim(self, tick: Tick, now: dt.datetime) -> bool:
        return True  # every copy is sent; the FIFO queue keeps one

    def sent(self, tick: Tick, now: dt.datetime) -> None:
        with self._locked():
            state = self._read()
            known = state.get(tick.task)
            if known is None or parse_iso(known) < tick.scheduled_at:
                state[tick.task] = tick.iso
                temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                temporary.write_text(json.dumps(state, sort_keys=True))
                os.replace(temporary, self.path)

    def reclaim(self, now: dt.datetime) -> list[Tick]:
        return []

    def prune(self, now: dt.datetime, tasks: list[str]) -> None:
        """Nothing to prune: one time per task."""

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
