"""Tasks that hung a process of this host, so the next process runs them last and alone.

A task with no time limit, on an executor that cannot stop it (inline, thread), may hold the GIL
(one long C call): then nothing else in its process runs, heartbeats and the keeper included,
until the master kills the process at its heartbeat timeout. What the process held behind it
lapses unrun and comes back, with the hung task, to the next process, time after time, until
the receive limit sends the lot to the dead-letter queue.

So a process about to start such a task that came back (received before) first sends a
heartbeat naming it (:meth:`ebsqs.worker.loop.Worker._start_pending`); the master, killing a
child that went silent while its last heartbeat named a task, adds the task's id to this
host's :class:`SuspectFile`. A message of a task listed there runs only once nothing else
waits or runs in its process, and nothing is fetched behind it.

The file lives beside the poll tokens (one per supervisor, removed when it exits): one task id
per line, appended. Children read it only for a message that came back, at most once per change
of the file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ebsqs.log import get_logger

log = get_logger(__name__)

#: The file's name in the supervisor's poll-token directory.
FILE_NAME = "suspects"


class SuspectFile:
    """The task ids that hung a process of this supervisor.

    Args:
        directory: the supervisor's poll-token directory.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / FILE_NAME
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the last read
        self._ids: frozenset[str] = frozenset()

    def add(self, task_id: str) -> None:
        """Record ``task_id`` (from the master); a failure is logged, never raised."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, f"{task_id}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("suspect_not_recorded", task_id=task_id, error=str(exc))

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.ids()

    def ids(self) -> frozenset[str]:
        """The ids recorded so far (read again only when the file changed)."""
        try:
            stat = self.path.stat()
        except OSError:
            return self._ids
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            with contextlib.suppress(OSError):
                text = self.path.read_text()
                self._ids = frozenset(text[: text.rfind("\n") + 1].split())
                self._seen = seen
        return self._ids
