"""The embedded broker: one SQLite file, shared by every process on one machine.

This is the default broker when there is no SQS. It keeps the semantics of SQS and of
:class:`~ebsqs.brokers.memory.MemoryBroker`: a received message is invisible for its visibility
timeout and comes back unless it is acknowledged; per-message delays; a receive count; redrive
to the dead-letter queue on the receive after ``max_receive_count``; batches of at most ten.

Concurrency and durability:
    The file is in WAL mode with ``synchronous=NORMAL``: readers never block the writer, and a
    committed operation survives a crash of any process, though the last few commits can be lost
    if the machine itself loses power. Every operation is one short transaction; ``receive``
    takes the write lock (``BEGIN IMMEDIATE``) so two processes never get the same message.
    Long polling sleeps between cheap read-only probes (10 ms growing to 100 ms) and never
    holds a transaction while it waits.

Processes and threads:
    Connections are opened lazily, one per process and thread. A forked child never uses the
    connection it inherited: on first use it closes the inherited idle connections (SQLite
    keeps per-process lock bookkeeping, and a child that merely ignored them would run without
    real file locks, so the parent closing its connection could delete the WAL under the child)
    and opens its own. Fork from a thread that is not inside a broker call; the safest is to
    call :meth:`SQLiteBroker.close` before forking. Use one broker object per file per process.

Differences from SQS, deliberate:
    - Order is strict (by visible time, then send order) and delivery is exactly-once within
      a visibility window; SQS standard queues are best-effort ordered and at-least-once.
    - Counts in ``stats`` are exact; ``purge`` is immediate and can be repeated at once.
    - Messages are kept until deleted: there is no retention period.
    - ``ensure_queue`` leaves an existing queue's settings as they are (SQS refuses a
      conflicting CreateQueue).
    - A receipt stays valid until the message is received again, and ``change_visibility``
      accepts it even after the visibility expired (as the memory broker does); there is no
      12-hour cap counted from the first receive.
    - A message due for redrive whose dead-letter queue was deleted is dropped, with a
      ``message_dropped`` warning (as the memory broker does).
    - Each queue keeps the size limit it was created with (``QueueSettings.max_body_bytes``,
      SQS's ``MaximumMessageSize``), capped by the broker's ``max_body_bytes``; any value is
      taken (SQS takes 1 KiB to 1 MiB). A message's size counts its attributes, as on SQS.
    - Message attributes are kept as text: an ``int`` (an SQS ``Number``) comes back as its
      decimal text, as SQS returns it.

FIFO queues, the supported subset:
    - Queue names must end in ``.fifo`` (and only FIFO queues' may); sends need a
      ``group_id``; per-message delays are refused (SQS refuses them on FIFO queues too).
    - Within a group, messages are delivered one at a time in send order: the next one is
      delivered only after the previous one was deleted or moved to the dead-letter queue. A
      receive therefore returns at most one message per group (SQS can return several).
    - ``dedup_id`` deduplicates for five minutes after the first send, returning the first
      message's id. A send without one deduplicates on the SHA-256 of its body, as SQS does
      on the queues ebsqs creates (with content-based deduplication), and that hash is the
      ``dedup_id`` the message is received with.
    - Throughput modes and high-throughput FIFO limits are not modelled.

Standard queues keep a message's ``group_id`` (the tenant of SQS's fair queues) and return it
on receive; fairness between tenants is not modelled.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from ebsqs.brokers.base import (
    DEDUP_WINDOW_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    BodyLimit,
    OutgoingMessage,
    QueueSettings,
    QueueStats,
    ReceivedMessage,
)
from ebsqs.brokers.checks import (
    check_batch,
    check_fifo_names,
    check_messages,
    check_receive,
    content_dedup_id,
    embedded_body_limit,
)
from ebsqs.errors import (
    BrokerDamaged,
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    QueueDoesNotExist,
)
from ebsqs.log import get_logger

log = get_logger(__name__)

#: Bumped whenever the tables change; stored in ``PRAGMA user_version``.
#: 2: ``queues.max_body_bytes``.
SCHEMA_VERSION = 2
#: How long a statement waits for another process's write lock before giving up.
BUSY_TIMEOUT_SECONDS = 30.0
_POLL_FIRST_SECONDS = 0.01
_POLL_MAX_SECONDS = 0.1
_STALE_RECEIPT = "receipt handle is no longer valid"

_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS queues (
        name TEXT PRIMARY KEY,
        visibility_timeout INTEGER NOT NULL,
        dead_letter_queue TEXT,
        max_receive_count INTEGER NOT NULL,
        fifo INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        max_body_bytes INTEGER NOT NULL DEFAULT {DEFAULT_MAX_BODY_BYTES}
    )""",
    """CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        queue TEXT NOT NULL,
        body TEXT NOT NULL,
        attributes TEXT NOT NULL DEFAULT '{}',
        visible_at REAL NOT NULL,
        sent_at REAL NOT NULL,
        receive_count INTEGER NOT NULL DEFAULT 0,
        receipt TEXT,
        delayed INTEGER NOT NULL DEFAULT 0,
        group_id TEXT,
        dedup_id TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, visible_at, seq)",
    """CREATE INDEX IF NOT EXISTS messages_group ON messages (queue, group_id, seq)
        WHERE group_id IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS fifo_dedup (
        queue TEXT NOT NULL,
        dedup_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (queue, dedup_id)
    )""",
)
#: What turns each older schema into the current one (the tables above are created first, so
#: only columns added to existing tables need a statement here).
_MIGRATIONS = {
    1: (
        "ALTER TABLE queues ADD COLUMN max_body_bytes INTEGER NOT NULL "
        f"DEFAULT {DEFAULT_MAX_BODY_BYTES}",
    ),
}

_INSERT = """INSERT INTO messages
    (id, queue, body, attributes, visible_at, sent_at, delayed, group_id, dedup_id)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_READY_COLUMNS = (
    "seq, id, body, attributes, receive_count, sent_at, group_id, dedup_id FROM messages"
)
_READY = f"""SELECT {_READY_COLUMNS}
    WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq LIMIT ?"""
# A FIFO group is served through its oldest message only: while that one is in flight (or
# delayed) the group is blocked, which keeps the group in order.
_READY_FIFO = f"""SELECT {_READY_COLUMNS}
    WHERE queue = ? AND visible_at <= ? AND (group_id IS NULL OR seq = (
        SELECT MIN(g.seq) FROM messages AS g
        WHERE g.queue = messages.queue AND g.group_id = messages.group_id))
    ORDER BY visible_at, seq LIMIT ?"""
_INSERT_QUEUE = """INSERT OR IGNORE INTO queues
    (name, visibility_timeout, dead_letter_queue, max_receive_count, fifo, created_at,
    max_body_bytes)
    VALUES (?, ?, ?, ?, ?, ?, ?)"""
_PROBE = """SELECT EXISTS (SELECT 1 FROM queues WHERE name = ?),
    EXISTS (SELECT 1 FROM messages WHERE queue = ? AND visible_at <= ?)"""
_CLAIM = """UPDATE messages
    SET visible_at = ?, receive_count = receive_count + 1, receipt = ?, delayed = 0
    WHERE seq = ?"""
_STATS = """SELECT EXISTS (SELECT 1 FROM queues WHERE name = :queue), COUNT(*),
    COALESCE(SUM(delayed = 1 AND visible_at > :now), 0),
    COALESCE(SUM(delayed = 0 AND visible_at > :now), 0)
    FROM messages WHERE queue = :queue"""


@dataclass(frozen=True, slots=True)
class _Queue:
    visibility_timeout: int
    dead_letter_queue: str | None
    max_receive_count: int
    fifo: bool
    max_body_bytes: int

    def is_poison(self, receive_count: int) -> bool:
        """Whether a message received this often moves to the dead-letter queue instead."""
        return self.dead_letter_queue is not None and receive_count >= self.max_receive_count


class _Ready(NamedTuple):
    seq: int
    message_id: str
    body: str
    attributes: str
    receive_count: int
    sent_at: float
    group_id: str | None
    dedup_id: str | None


class SQLiteBroker:
    """A durable broker in one SQLite file, safe for many processes and threads.

    Args:
        path: the database file; relative paths are resolved now, against the current
            directory. Its directory is created if missing.
        max_body_bytes: the largest message accepted on any queue, in UTF-8 bytes (SQS's
            1 MiB by default); each queue's own limit is set by ``ensure_queue``.
        clock: seconds since the epoch; tests inject a fake one to drive delays and visibility.

    Nothing is opened here: each process and thread opens its own connection on first use.
    """

    def __init__(
        self,
        path: str,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.path.abspath(path)
        self.max_body_bytes = max_body_bytes
        self._clock = clock
        self._local = threading.local()
        # Every connection this object opened, with the pid that opened it. Holding them here
        # (not only in thread locals) lets close() reach other threads' connections, and lets a
        # forked child find, and close, its copies of every connection the parent had.
        self._opened: list[tuple[int, sqlite3.Connection]] = []
        # Inherited connections that were inside a transaction at fork time: never touched.
        self._orphans: list[sqlite3.Connection] = []
        self._epoch = 0

    @classmethod
    def from_url(cls, url: str) -> SQLiteBroker:
        """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.

        Raises:
            ConfigurationError: the URL has no file path.
        """
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(
                f"broker URL {url!r} has no file path; use sqlite:///relative.db or "
                "sqlite:////absolute/path.db"
            )
        return cls(path)

    def __repr__(self) -> str:
        return f"SQLiteBroker({self.path!r})"

    # -- connections ---------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This process's and thread's connection, opened on first use."""
        local = self._local
        pid = os.getpid()
        if getattr(local, "pid", None) == pid and getattr(local, "epoch", None) == self._epoch:
            conn: sqlite3.Connection = local.conn
            return conn
        self._release_inherited(pid)
        conn = self._open()
        self._opened.append((pid, conn))
        local.pid, local.epoch, local.conn = pid, self._epoch, conn
        return conn

    def _release_inherited(self, pid: int) -> None:
        """Close the connections a forked child inherited (runs in the child, after the fork).

        SQLite tracks file locks per process and per file; while an inherited connection stays
        open, a new connection in the child reuses that bookkeeping and holds no real lock, so
        the parent closing its own connection would checkpoint and delete the WAL under the
        child. Closing an idle inherited connection only drops the child's copy. One that was
        inside a transaction (another thread of the parent was mid-call) is left alone: rolling
        it back here could rewrite the shared WAL index the parent is still using.
        """
        inherited = [conn for owner, conn in self._opened if owner != pid]
        if not inherited:
            return
        self._opened = [(owner, conn) for owner, conn in self._opened if owner == pid]
        for conn in inherited:
            if conn.in_transaction:
                self._orphans.append(conn)
                continue
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.warning("inherited_connection_close_failed", path=self.path, error=str(exc))

    def _open(self) -> sqlite3.Connection:
        try:
            return self._open_unchecked()
        except (OSError, sqlite3.Error) as exc:
            if _is_busy(exc):
                raise BrokerUnavailable(
                    f"SQLite broker {self.path!r} stayed locked for {BUSY_TIMEOUT_SECONDS:g} s "
                    f"while opening: {exc}"
                ) from exc
            if _is_damaged(exc):
                raise self._damaged(exc) from exc
            raise ConfigurationError(
                f"cannot open the SQLite broker database {self.path!r}: {exc}"
            ) from exc

    def _open_unchecked(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        # check_same_thread=False: only so close() can close other threads' connections.
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_SECONDS,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            journal_mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        if journal_mode != "wal":
            log.warning("sqlite_wal_unavailable", path=self.path, journal_mode=journal_mode)
        log.debug("sqlite_connection_opened", path=self.path, pid=os.getpid())
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have just created it.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"SQLite broker database {self.path!r} has schema version {version}, "
                    f"newer than this ebsqs understands ({SCHEMA_VERSION}); upgrade ebsqs"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            if version > 0:
                # An older file: CREATE ... IF NOT EXISTS kept its tables; add what they lack.
                for old in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[old]:
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if version == 0:
            log.info("sqlite_schema_created", path=self.path, version=SCHEMA_VERSION)
        elif version < SCHEMA_VERSION:
            log.info("sqlite_schema_migrated", path=self.path, old=version, version=SCHEMA_VERSION)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the database's write lock from the start."""
        conn = self._connection()
        with self._errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn SQLite's exceptions into the broker error tree."""
        try:
            yield
        except sqlite3.Error as exc:
            if _is_busy(exc):
                raise BrokerUnavailable(
                    f"SQLite broker {self.path!r} stayed locked for {BUSY_TIMEOUT_SECONDS:g} s: "
                    f"{exc}"
                ) from exc
            if _is_damaged(exc):
                raise self._damaged(exc) from exc
            raise BrokerError(f"SQLite broker {self.path!r} failed: {exc}") from exc

    def _damaged(self, exc: Exception) -> BrokerDamaged:
        """The error for a file SQLite cannot read: a restart reads the same file, so say how
        to get a good one."""
        return BrokerDamaged(
            f"SQLite broker file {self.path!r} is damaged ({exc}): stop every process using "
            f"it, then restore it from a backup or move it aside (`sqlite3 {self.path} "
            ".recover` may save its messages); the next start creates a new, empty one"
        )

    def _read_one(self, sql: str, params: Sequence[object] | dict[str, object]) -> tuple[int, ...]:
        """Run one read-only statement in autocommit mode and return its single row."""
        with self._errors():
            row: tuple[int, ...] = self._connection().execute(sql, params).fetchone()
        return row

    def close(self) -> None:
        """Close this process's connections, in every thread (call when none is in use).

        Connections inherited from a parent process are released too; the next call opens a
        fresh one.
        """
        pid = os.getpid()
        self._release_inherited(pid)
        mine, self._opened = self._opened, []
        self._epoch += 1
        for _, conn in mine:
            conn.close()

    # -- queues --------------------------------------------------------------------------------

    def ensure_queue(self, queue: str, settings: QueueSettings | None = None) -> None:
        """Create the queue, and its dead-letter queue, if missing; existing ones are kept.

        The dead-letter queue gets the default visibility timeout and the queue's FIFO-ness
        and size limit.

        Raises:
            ConfigurationError: a FIFO queue (or its dead-letter queue) not named ``*.fifo``,
                or a standard one that is.
        """
        settings = settings or QueueSettings()
        check_fifo_names(queue, settings)
        dlq = settings.dead_letter_queue
        now = self._clock()
        with self._write() as conn:
            if dlq is not None:
                default = QueueSettings()
                conn.execute(
                    _INSERT_QUEUE,
                    (
                        dlq,
                        default.visibility_timeout,
                        None,
                        default.max_receive_count,
                        settings.fifo,
                        now,
                        settings.max_body_bytes,
                    ),
                )
            conn.execute(
                _INSERT_QUEUE,
                (
                    queue,
                    settings.visibility_timeout,
                    dlq,
                    settings.max_receive_count,
                    settings.fifo,
                    now,
                    settings.max_body_bytes,
                ),
            )

    def body_limit(self, queue: str) -> BodyLimit:
        """The queue's ``max_body_bytes``, capped by the broker's (the broker's if missing)."""
        (queue_bytes,) = self._read_one(
            "SELECT (SELECT max_body_bytes FROM queues WHERE name = ?)", (queue,)
        )
        return embedded_body_limit(queue, queue_bytes, self.max_body_bytes, "SQLite")

    def list_queues(self, prefix: str = "") -> list[str]:
        """Names of the queues whose name starts with ``prefix``, sorted."""
        with self._errors():
            rows = self._connection().execute(
                "SELECT name FROM queues WHERE substr(name, 1, ?) = ? ORDER BY name",
                (len(prefix), prefix),
            )
            return [name for (name,) in rows]

    def delete_queue(self, queue: str) -> None:
        """Delete the queue and its messages.

        Raises:
            QueueDoesNotExist: there is no such queue.
        """
        with self._write() as conn:
            if conn.execute("DELETE FROM queues WHERE name = ?", (queue,)).rowcount == 0:
                raise QueueDoesNotExist(queue)
            conn.execute("DELETE FROM messages WHERE queue = ?", (queue,))
            conn.execute("DELETE FROM fifo_dedup WHERE queue = ?", (queue,))

    def purge(self, queue: str) -> None:
        """Delete every message in the queue, at once.

        Raises:
            QueueDoesNotExist: there is no such queue.
        """
        with self._write() as conn:
            _settings(conn, queue)
            conn.execute("DELETE FROM messages WHERE queue = ?", (queue,))

    def stats(self, queue: str) -> QueueStats:
        """Exact visible / in-flight / delayed counts.

        Raises:
            QueueDoesNotExist: there is no such queue.
        """
        exists, total, delayed, in_flight = self._read_one(
            _STATS, {"queue": queue, "now": self._clock()}
        )
        if not exists:
            raise QueueDoesNotExist(queue)
        return QueueStats(queue, total - delayed - in_flight, in_flight, delayed)

    # -- sending -------------------------------------------------------------------------------

    def send(self, queue: str, message: OutgoingMessage) -> str:
        """Send one message; return its id."""
        return self.send_batch(queue, [message])[0]

    def send_batch(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Send 1..10 messages in one transaction; return their ids in order.

        A FIFO duplicate (within the deduplication window) is not stored again: its id is the
        first message's.

        Raises:
            QueueDoesNotExist: there is no such queue.
            MessageTooLargeError: a message is over the queue's :meth:`body_limit`.
            BrokerError: a bad batch size, delay or attribute, or a FIFO rule broken.
        """
        check_batch(messages)
        with self._write() as conn:
            now = self._clock()
            settings = _settings(conn, queue)
            limit = embedded_body_limit(
                queue, settings.max_body_bytes, self.max_body_bytes, "SQLite"
            )
            check_messages(queue, messages, limit, fifo=settings.fifo)
            if settings.fifo:
                return self._send_fifo(conn, queue, messages, now)
            rows = [_message_row(queue, message, now, message.dedup_id) for message in messages]
            conn.executemany(_INSERT, rows)
        return [row[0] for row in rows]

    def _send_fifo(
        self,
        conn: sqlite3.Connection,
        queue: str,
        messages: Sequence[OutgoingMessage],
        now: float,
    ) -> list[str]:
        """Store the messages that are not duplicates (the FIFO rules were checked)."""
        conn.execute("DELETE FROM fifo_dedup WHERE queue = ? AND expires_at <= ?", (queue, now))
        ids = []
        for message in messages:
            dedup_id = message.dedup_id or content_dedup_id(message.body)
            message_id = _deduplicated(conn, queue, dedup_id)
            if message_id is None:
                row = _message_row(queue, message, now, dedup_id)
                conn.execute(_INSERT, row)
                message_id = row[0]
                conn.execute(
                    "INSERT INTO fifo_dedup VALUES (?, ?, ?, ?)",
                    (queue, dedup_id, message_id, now + DEDUP_WINDOW_SECONDS),
                )
            ids.append(message_id)
        return ids

    # -- receiving -----------------------------------------------------------------------------

    def receive(
        self,
        queue: str,
        max_messages: int,
        wait_seconds: float,
        visibility_timeout: int | None = None,
        *,
        metadata: bool = True,
    ) -> list[ReceivedMessage]:
        """Receive up to ``max_messages``, polling up to ``wait_seconds`` for the first one.

        Args:
            queue: the queue name.
            max_messages: 1..10.
            wait_seconds: 0..20; 0 returns at once.
            visibility_timeout: seconds the messages stay invisible; the queue's by default.
            metadata: ignored: every field is in the row a receive reads anyway.

        Raises:
            QueueDoesNotExist: there is no such queue.
        """
        check_receive(max_messages, wait_seconds, visibility_timeout)
        deadline = time.monotonic() + wait_seconds
        interval = _POLL_FIRST_SECONDS
        while True:
            received = self._receive_once(queue, max_messages, visibility_timeout)
            remaining = deadline - time.monotonic()
            if received or remaining <= 0:
                return received
            time.sleep(min(interval, remaining))
            interval = min(interval * 2, _POLL_MAX_SECONDS)

    def _receive_once(
        self, queue: str, max_messages: int, visibility_timeout: int | None
    ) -> list[ReceivedMessage]:
        # A read-only probe first: idle pollers must not queue up for the write lock.
        exists, ready = self._read_one(_PROBE, (queue, queue, self._clock()))
        if not exists:
            raise QueueDoesNotExist(queue)
        if not ready:
            return []
        with self._write() as conn:
            settings = _settings(conn, queue)
            now = self._clock()
            rows = self._claimable(conn, queue, settings, max_messages, now)
            timeout = (
                settings.visibility_timeout if visibility_timeout is None else visibility_timeout
            )
            receipts = [uuid.uuid4().hex for _ in rows]
            conn.executemany(
                _CLAIM,
                [
                    (now + timeout, receipt, row.seq)
                    for row, receipt in zip(rows, receipts, strict=True)
                ],
            )
        return [
            ReceivedMessage(
                queue=queue,
                message_id=row.message_id,
                receipt=receipt,
                body=row.body,
                receive_count=row.receive_count + 1,
                attributes=json.loads(row.attributes),
                sent_at=row.sent_at,
                group_id=row.group_id,
                dedup_id=row.dedup_id,
            )
            for row, receipt in zip(rows, receipts, strict=True)
        ]

    def _claimable(
        self,
        conn: sqlite3.Connection,
        queue: str,
        settings: _Queue,
        max_messages: int,
        now: float,
    ) -> list[_Ready]:
        """The rows to deliver, in order, after redriving the poison ones met on the way."""
        select = _READY_FIFO if settings.fifo else _READY
        chosen: dict[int, _Ready] = {}
        while len(chosen) < max_messages:
            poison = []
            for row in map(_Ready._make, conn.execute(select, (queue, now, max_messages))):
                if len(chosen) == max_messages:
                    break
                if row.seq in chosen:
                    continue  # chosen in an earlier round, not updated yet
                if settings.is_poison(row.receive_count):
                    poison.append(row)
                else:
                    chosen[row.seq] = row
            if not poison:
                break  # the select saw every ready row up to the limit
            self._redrive(conn, queue, settings, poison)
        return list(chosen.values())

    def _redrive(
        self, conn: sqlite3.Connection, queue: str, settings: _Queue, rows: list[_Ready]
    ) -> None:
        """Move messages received too often to the dead-letter queue, as SQS does."""
        dlq = settings.dead_letter_queue
        target_exists = conn.execute("SELECT 1 FROM queues WHERE name = ?", (dlq,)).fetchone()
        seqs = [(row.seq,) for row in rows]
        if target_exists:
            conn.executemany(
                "UPDATE messages SET queue = ?, receipt = NULL WHERE seq = ?",
                [(dlq, seq) for (seq,) in seqs],
            )
        else:
            conn.executemany("DELETE FROM messages WHERE seq = ?", seqs)
        for row in rows:
            fields = {"queue": queue, "dead_letter_queue": dlq, "message_id": row.message_id}
            if target_exists:
                log.info("message_redriven", receive_count=row.receive_count, **fields)
            else:
                log.warning("message_dropped", reason="dead-letter queue is missing", **fields)

    # -- settling ------------------------------------------------------------------------------

    def ack(self, messages: Sequence[ReceivedMessage]) -> dict[str, str]:
        """Delete received messages. Returns ``{message_id: reason}`` for those that failed."""
        return self._settle(messages, "DELETE FROM messages", ())

    def change_visibility(
        self, messages: Sequence[ReceivedMessage], timeout: int
    ) -> dict[str, str]:
        """Make received messages visible again in ``timeout`` seconds (0: at once).

        Returns ``{message_id: reason}`` for the entries that failed.
        """
        now = self._clock()
        return self._settle(messages, "UPDATE messages SET visible_at = ?", (now + timeout,))

    def _settle(
        self, messages: Sequence[ReceivedMessage], action: str, params: tuple[object, ...]
    ) -> dict[str, str]:
        """Apply ``action`` to each message still held under its receipt, in one transaction."""
        if not messages:
            return {}
        sql = f"{action} WHERE id = ? AND receipt = ? AND queue = ?"
        failed = {}
        with self._write() as conn:
            for message in messages:
                cursor = conn.execute(
                    sql, (*params, message.message_id, message.receipt, message.queue)
                )
                if cursor.rowcount == 0:
                    failed[message.message_id] = _STALE_RECEIPT
        return failed


def _settings(conn: sqlite3.Connection, queue: str) -> _Queue:
    row = conn.execute(
        "SELECT visibility_timeout, dead_letter_queue, max_receive_count, fifo, max_body_bytes "
        "FROM queues WHERE name = ?",
        (queue,),
    ).fetchone()
    if row is None:
        raise QueueDoesNotExist(queue)
    return _Queue(row[0], row[1], row[2], bool(row[3]), row[4])


def _deduplicated(conn: sqlite3.Connection, queue: str, dedup_id: str) -> str | None:
    """The id of the message already sent with ``dedup_id`` within the window, if any."""
    row = conn.execute(
        "SELECT message_id FROM fifo_dedup WHERE queue = ? AND dedup_id = ?", (queue, dedup_id)
    ).fetchone()
    return None if row is None else str(row[0])


def _message_row(
    queue: str, message: OutgoingMessage, now: float, dedup_id: str | None
) -> tuple[str, str, str, str, float, float, bool, str | None, str | None]:
    # Attributes are kept as text, as SQS returns a Number attribute.
    attributes = {name: str(value) for name, value in message.attributes.items()}
    return (
        str(uuid.uuid4()),
        queue,
        message.body,
        json.dumps(attributes, separators=(",", ":")),
        now + message.delay,
        now,
        message.delay > 0,
        message.group_id,
        dedup_id,
    )


#: What SQLite says of a file it cannot read as a database, or whose pages are broken.
_DAMAGED_CODES = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT})
_DAMAGED_TEXTS = ("file is not a database", "database disk image is malformed")


def _is_damaged(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _DAMAGED_CODES
    return any(text in str(exc) for text in _DAMAGED_TEXTS)


def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc)
