"""The host store, and the lookup from the ``flow_store`` setting to a store (see
:mod:`ebsqs.flow.base` for what a store does).

The host store (:class:`HostStore`) is one SQLite file in WAL mode shared by every process of
the host: the master is not in the path (it never talks to the store), children of one master and
of several masters see the same limits, and the file outlives restarts, so a unique task's claim
survives a deploy. Stores open their connections lazily in the process that uses them (never
shared across a fork).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ebsqs.errors import ConfigurationError
from ebsqs.flow.base import TICKET_GRACE, FlowStore, FlowStoreError

#: Seconds a call waits for another process's write before it fails (and flow control fails
#: open): the loop's thread waits here.
BUSY_SECONDS = 2.0
#: One call in this many also deletes every expired row of the host store.
PURGE_ONE_IN = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rates (key TEXT PRIMARY KEY, tat REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tickets (
    key TEXT NOT NULL, ticket TEXT NOT NULL, slot REAL NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (key, ticket));
CREATE TABLE IF NOT EXISTS leases (
    key TEXT NOT NULL, holder TEXT NOT NULL, pid INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (key, holder));
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL NOT NULL);
"""


class HostStore:
    """The per-host store: SQLite in WAL mode, one short write transaction per call.

    A concurrency lease also names its holder's pid: a full limit first drops leases whose
    process is gone (a child killed while running its task), so a slot never waits out its
    lease for a dead holder.

    Args:
        path: the database file (created, with its folder, on first use).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on this thread's connection of this process."""
        connection = self._connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise FlowStoreError(f"flow store {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        # One connection per thread and process: an inherited one (after a fork) is left alone.
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.executescript(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise FlowStoreError(f"flow store {self.path}: {exc}") from exc
            local.connection, local.pid = connection, os.getpid()
        connection = local.connection
        assert isinstance(connection, sqlite3.Connection)
        return connection

    def _maybe_purge(self, db: sqlite3.Connection, now: float) -> None:
        if random.randrange(PURGE_ONE_IN) == 0:  # spreading work, not secrecy
            for table in ("rates", "tickets", "leases", "claims"):
                db.execute(f"DELETE FROM {table} WHERE expires < ?", (now,))  # the four names above

    def take_slot(self, key: str, interval: float, ticket: str, now: float, early: float) -> float:
        """See :meth:`FlowStore.take_slot`."""
        with self._write() as db:
            self._maybe_purge(db, now)
            row = db.execute(
                "SELECT slot FROM tickets WHERE key = ? AND ticket = ? AND expires >= ?",
                (key, ticket, now),
            ).fetchone()
            if row is not None:
                slot = float(row[0])
                if slot <= now + early:
                    db.execute("DELETE FROM tickets WHERE key = ? AND ticket = ?", (key, ticket))
                return slot
            row = db.execute("SELECT tat FROM rates WHERE key = ?", (key,)).fetchone()
            slot = max(float(row[0]) if row else now, now)
            tat = slot + interval
            db.execute(
                "INSERT OR REPLACE INTO rates (key, tat, expires) VALUES (?, ?, ?)",
                (key, tat, tat + interval),
            )
            if slot > now + early:
                db.execute(
                    "INSERT OR REPLACE INTO tickets VALUES (?, ?, ?, ?)",
                    (key, ticket, slot, slot + TICKET_GRACE),
                )
            return slot

    def acquire(self, key: str, limit: int, holder: str, ttl: float, now: float) -> bool:
        """See :meth:`FlowStore.acquire`."""
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE key = ? AND expires < ?", (key, now))
            rows = db.execute("SELECT holder, pid FROM leases WHERE key = ?", (key,)).fetchall()
            if holder not in {row[0] for row in rows} and len(rows) >= limit:
                dead = [row[0] for row in rows if not _alive(int(row[1]))]
                db.executemany(
                    "DELETE FROM leases WHERE key = ? AND holder = ?", [(key, h) for h in dead]
                )
                if len(rows) - len(dead) >= limit:
                    return False
            db.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                (key, holder, os.getpid(), now + ttl),
            )
            return True

    def release(self, key: str, holder: str) -> None:
        """See :meth:`FlowStore.release`."""
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE key = ? AND holder = ?", (key, holder))

    def claim(self, key: str, value: str, ttl: float, now: float) -> str | None:
        """See :meth:`FlowStore.claim`."""
        with self._write() as db:
            self._maybe_purge(db, now)
            row = db.execute(
                "SELECT value FROM claims WHERE key = ? AND expires >= ?", (key, now)
            ).fetchone()
            if row is not None:
                return str(row[0])
            db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?)", (key, value, now + ttl))
            return None

    def unclaim(self, key: str, value: str) -> None:
        """See :meth:`FlowStore.unclaim`."""
        with self._write() as db:
            db.execute("DELETE FROM claims WHERE key = ? AND value = ?", (key, value))

    def get(self, key: str, now: float) -> str | None:
        """See :meth:`FlowStore.get`."""
        with self._write() as db:
            row = db.execute(
                "SELECT value FROM claims WHERE key = ? AND expires >= ?", (key, now)
            ).fetchone()
        return None if row is None else str(row[0])


def _alive(pid: int) -> bool:
    """Whether a process of this host is alive (a zombie counts as gone: it holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    return True


def default_host_path() -> Path:
    """The host store's file when ``flow_host_store`` names none: one per user and host."""
    return Path(tempfile.gettempdir()) / f"ebsqs-flow-{os.getuid()}.sqlite3"


@functools.cache
def host_store(path: str) -> HostStore:
    """The host store at ``path`` ("" for :func:`default_host_path`), one object per process."""
    return HostStore(path or default_host_path())


@functools.cache
def store_for(url: str, host_path: str = "") -> FlowStore:
    """The store a ``flow_store`` setting names, one object per process and setting.

    ``host`` (the default): the host store; ``sqlite:///path``: a host store at that path;
    ``redis://...`` / ``rediss://...``: Redis (the ``redis`` extra); ``django`` (or
    ``django:<alias>``): the Django database (``ebsqs.contrib.django`` installed and migrated).

    Raises:
        ConfigurationError: an unknown scheme, or the store's library is missing.
    """
    if url in ("", "host"):
        return host_store(host_path)
    if url.startswith("sqlite:///"):
        return host_store(url.removeprefix("sqlite://"))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from ebsqs.flow.redis_store import RedisStore  # the optional library, only when asked

        return RedisStore(url)
    if url == "django" or url.startswith("django:"):
        from ebsqs.flow.django_store import DjangoStore  # Django only when asked

        return DjangoStore(url.partition(":")[2] or "default")
    raise ConfigurationError(
        f"flow_store {url!r}: use 'host', 'sqlite:///path', 'redis://host:6379/0' or 'django'"
    )
