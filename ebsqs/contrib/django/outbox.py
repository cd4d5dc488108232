"""The durable outbox: sends made inside a transaction are rows of that transaction.

With ``EBSQS = {"outbox": True}``, a ``.delay()`` (or ``.delay_on_commit()``) made while a
transaction is open on ``EBSQS["outbox_database"]`` (``"default"``) does not talk to SQS: the
producer encodes the messages as it would send them, and :class:`Outbox` (a middleware,
:meth:`~ebsqs.middleware.Middleware.keeper`) writes one :class:`~ebsqs.contrib.django.
models.OutboxMessage` row per message in that transaction. A rollback takes them away; a commit
makes them durable, whatever happens to the process next. Outside a transaction on that
database, sends go to SQS at once, as without the outbox: there is nothing to be atomic with,
and the caller sees a failed send as an exception.

:class:`Relay` sends the rows: it claims up to ten, sends them with
:func:`ebsqs.producer.send_messages`, deletes the rows sent and keeps the others with their
error and a backoff. What it sends is what the producer encoded: the same body (so the same task
id), group and FIFO deduplication id, whichever relay sends it and however often. A relay that
dies after a send and before its delete leaves the rows to be sent again: a duplicate with the
same task id (which FIFO queues drop within five minutes, and the worker's unique-task check
skips elsewhere), never a loss.

Who may send, when several relays run (one per supervisor, and ``manage.py ebsqs outbox relay``):

- PostgreSQL: each claims rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` inside a transaction
  that lasts until its deletes, so two relays never hold the same row. FIFO rows are claimed
  only by the relay that holds a transaction-level advisory lock, so one relay at a time keeps
  a FIFO group's order.
- Other databases: a lease row (:class:`~ebsqs.contrib.django.models.OutboxLease`); the relay
  that holds it sends, the others wait; a lease not renewed for :data:`LEASE_SECONDS` passes on.

A FIFO row whose send failed holds back the later rows of its group until it is sent.

Waking up: on PostgreSQL the write also runs ``pg_notify`` in the transaction, which PostgreSQL
delivers at commit to the relay's ``LISTEN`` connection (psycopg 3): a relay that waits sends
within milliseconds of the commit, and looks at the table every ``outbox_poll_interval``
seconds (5) besides, in case a notification was missed. Elsewhere (and on psycopg2) the relay
only looks, every second (every 5 s on psycopg2). An idle look is one ``EXISTS`` query.

Which thread and which side of the fork: :class:`RelayService` runs the relay in a daemon
thread of the supervisor's master (see :mod:`ebsqs.ops.depth` for why threads of a master are
built with care). Its broker and SQS clients are built in the master's main thread before the
first fork, and the database code is exercised there once (then closed), so the thread imports
nothing a fork could catch half done. The thread's database connections (Django's, and the
listener) are its own; in each forked child their sockets are pointed at ``/dev/null`` so the
child can never write on them (:meth:`RelayService._forget_in_child`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ebsqs.backoff import Backoff
from ebsqs.brokers import MAX_DELAY_SECONDS, Broker, OutgoingMessage, from_url, prepared
from ebsqs.brokers.base import MAX_BATCH, is_fifo
from ebsqs.config import Settings
from ebsqs.contrib.django.conf import django_option
from ebsqs.contrib.django.db import _detach_socket
from ebsqs.errors import ConfigurationError, EbsqsError, PartialBatchError
from ebsqs.log import get_logger
from ebsqs.middleware import Keeper, Middleware
from ebsqs.producer import send_messages
from ebsqs.supervisor.extension import Extension

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import QuerySet

    from ebsqs.contrib.django.models import OutboxMessage
    from ebsqs.supervisor.config import SupervisorConfig
    from ebsqs.supervisor.snapshot import SupervisorSnapshot

log = get_logger(__name__)

#: The PostgreSQL channel a commit notifies and relays listen on.
CHANNEL = "ebsqs_outbox"
#: Seconds between looks at the table: PostgreSQL (woken by notifications too), others.
POLL_POSTGRES = 5.0
POLL_OTHER = 1.0
#: Seconds a relay's lease lasts without renewal (databases without SKIP LOCKED).
LEASE_SECONDS = 30.0
#: The advisory lock (an arbitrary 64-bit key) whose holder relays FIFO rows on PostgreSQL.
FIFO_LOCK = 0x65627371736F7862  # "ebsqsoxb"
#: Longest error text kept on a row.
ERROR_CHARS = 2000


@dataclass(frozen=True, slots=True)
class OutboxOptions:
    """The outbox's settings (``EBSQS["outbox*"]``), read when used.

    Attributes:
        enabled: ``EBSQS["outbox"]``.
        alias: the database of the outbox table (``EBSQS["outbox_database"]``).
        poll_interval: seconds between the relay's looks at the table, or None for the
            database's default (:data:`POLL_POSTGRES`, :data:`POLL_OTHER`).
        max_backoff: the longest wait, in seconds, of a row after a failed send.
    """

    enabled: bool = False
    alias: str = "default"
    poll_interval: float | None = None
    max_backoff: float = 60.0


def outbox_options() -> OutboxOptions:
    """The outbox's settings, read now.

    Raises:
        ConfigurationError: a value of the wrong type, or a database alias Django does not know.
    """
    from django.db import connections

    alias = django_option("outbox_database")
    if not isinstance(alias, str) or alias not in connections:
        raise ConfigurationError(
            f"EBSQS['outbox_database'] is {alias!r}, which is not a key of DATABASES"
        )
    poll, cap = django_option("outbox_poll_interval"), django_option("outbox_max_backoff")
    for name, value, optional in (
        ("outbox_poll_interval", poll, True),
        ("outbox_max_backoff", cap, False),
    ):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigurationError(f"EBSQS[{name!r}] must be a positive number, got {value!r}")
    return OutboxOptions(bool(django_option("outbox")), alias, poll, float(cap))


def keeping_alias() -> str | None:
    """The outbox's database when the outbox is on and a transaction is open there, else None:
    then sends are kept in that transaction (and ``.delay_on_commit()`` need not wait)."""
    if not django_option("outbox"):
        return None
    from django.db import connections

    alias = outbox_options().alias
    return alias if connections[alias].in_atomic_block else None


# -- the sending side: rows written in the sender's transaction ---------------------------------


class Outbox(Middleware):
    """Keeps outgoing messages in the open transaction of the outbox's database."""

    def keeper(self, queue: str) -> Keeper | None:
        """Write the messages to the outbox in the open transaction, or None (the producer
        sends now): the outbox is off, or no transaction is open on its database."""
        alias = keeping_alias()
        if alias is None:
            return None
        return functools.partial(write, alias, queue)


def write(
    alias: str,
    queue: str,
    messages: Sequence[OutgoingMessage],
    task_ids: Sequence[str],
    now: float | None = None,
) -> None:
    """Insert one row per message on ``alias`` (in its open transaction, if any); on
    PostgreSQL, notify the relays, which hear it when the transaction commits."""
    from django.db import connections

    from ebsqs.contrib.django.models import OutboxMessage

    now = time.time() if now is None else now
    rows = [
        OutboxMessage(
            queue=queue,
            fifo=is_fifo(queue),
            task_id=task_id,
            body=message.body,
            attributes=dict(message.attributes),
            group_id=message.group_id,
            dedup_id=message.dedup_id,
            created_at=now,
            # The due time, not the delay: a row that waits in the outbox is not delayed twice.
            due_at=now + message.delay,
            next_attempt_at=now,
        )
        for message, task_id in zip(messages, task_ids, strict=True)
    ]
    OutboxMessage.objects.using(alias).bulk_create(rows)
    connection = connections[alias]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [CHANNEL])


#: The one instance, so registering it twice adds nothing.
OUTBOX = Outbox()


# -- the relay --------------------------------------------------------------------------------


@dataclass
class PassResult:
    """What one relay pass did.

    Attributes:
        claimed: rows it took (at most ten).
        sent: rows sent and deleted.
        failed: rows kept with an error and a backoff.
        latencies: seconds from each sent row's write to its send.
        leased_elsewhere: another relay holds the lease, so this one sent nothing.
    """

    claimed: int = 0
    sent: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    leased_elsewhere: bool = False


class Relay:
    """Sends the outbox's rows to the broker, ten at a time (in the thread that calls it).

    Args:
        settings: the broker URL and how missing queues are created.
        alias: the outbox's database.
        broker: where to send (default: the settings' broker, built on first use).
        max_backoff: the longest wait of a row after a failed send.
        holder: this relay's name in the lease (default ``host:pid:thread``).
        clock: epoch seconds.
    """

    def __init__(
        self,
        settings: Settings,
        alias: str,
        *,
        broker: Broker | None = None,
        max_backoff: float = 60.0,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.alias = alias
        self.broker = broker
        self.backoff = Backoff(base=1.0, cap=max_backoff)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.clock = clock
        #: The Django connection this relay last used (see RelayService._forget_in_child).
        self.connection: BaseDatabaseWrapper | None = None

    def drain(self) -> PassResult:
        """Pass after pass while passes claim full batches; the sum of them."""
        total = PassResult()
        while True:
            result = self.relay_once()
            total.claimed += result.claimed
            total.sent += result.sent
            total.failed += result.failed
            total.latencies += result.latencies
            total.leased_elsewhere = result.leased_elsewhere
            if result.claimed < MAX_BATCH or result.sent == 0:
                return total

    def relay_once(self) -> PassResult:
        """Claim up to ten due rows, send them, delete those sent, back the others off.

        Raises:
            DatabaseError: the database failed; nothing was deleted (a row already sent will
                be sent again).
        """
        from django.db import connections

        self.connection = connections[self.alias]
        # One cheap statement (in autocommit) when there is nothing to do, which is most looks
        # at the table of an idle site: no transaction, lock or lease for nothing.
        if not _due(self.alias, self.clock()).exists():
            return PassResult()
        if self.connection.vendor == "postgresql":
            return self._relay_locked()
        return self._relay_leased()

    def _relay_locked(self) -> PassResult:
        """PostgreSQL: the rows stay locked (SKIP LOCKED for other relays) until deleted."""
        from django.db import transaction

        assert self.connection is not None
        with transaction.atomic(using=self.alias), self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [FIFO_LOCK])
            fifo = bool(cursor.fetchone()[0])
            now = self.clock()
            rows = list(
                _claimable(self.alias, now, fifo=fifo).select_for_update(skip_locked=True)[
                    :MAX_BATCH
                ]
            )
            return self._send_and_settle(rows)

    def _relay_leased(self) -> PassResult:
        """Elsewhere: only the lease's holder reads rows; the send runs outside a transaction
        (SQLite would hold its write lock through it)."""
        if not self._hold_lease():
            return PassResult(leased_elsewhere=True)
        rows = list(_claimable(self.alias, self.clock(), fifo=True)[:MAX_BATCH])
        return self._send_and_settle(rows)

    def _hold_lease(self) -> bool:
        """Take or renew the lease; whether this relay holds it now."""
        from django.db import IntegrityError, transaction
        from django.db.models import Q

        from ebsqs.contrib.django.models import OutboxLease

        now = self.clock()
        leases = OutboxLease.objects.using(self.alias)
        mine = Q(holder=self.holder) | Q(expires_at__lt=now)
        expires = now + LEASE_SECONDS
        if leases.filter(mine, name="relay").update(holder=self.holder, expires_at=expires):
            return True
        try:
            with transaction.atomic(using=self.alias):
                leases.create(name="relay", holder=self.holder, expires_at=expires)
        except IntegrityError:
            return False  # held by another relay
        return True

    def _send_and_settle(self, rows: list[OutboxMessage]) -> PassResult:
        from django.db import transaction

        result = PassResult(claimed=len(rows))
        if not rows:
            return result
        errors = self._send(rows)
        now = self.clock()
        sent = [row for row in rows if row.id not in errors]
        # Inside the claim's transaction on PostgreSQL (no savepoint needed), else its own.
        with transaction.atomic(using=self.alias, savepoint=False):
            self._settle(sent, [row for row in rows if row.id in errors], errors, now)
        result.sent, result.failed = len(sent), len(rows) - len(sent)
        result.latencies = [now - row.created_at for row in sent]
        if sent:
            log.debug("outbox_batch_sent", sent=len(sent), latency_ms=_ms(result.latencies))
        return result

    def _send(self, rows: list[OutboxMessage]) -> dict[int, str]:
        """Send rows grouped by queue, in id order; ``{row id: error}`` for those not sent."""
        if self.broker is None:
            self.broker = from_url(self.settings.broker_url)
        by_queue: dict[str, list[OutboxMessage]] = {}
        for row in rows:
            by_queue.setdefault(row.queue, []).append(row)
        now = self.clock()
        errors: dict[int, str] = {}
        for queue, batch in by_queue.items():
            messages = [outgoing_of(row, now) for row in batch]
            try:
                send_messages(
                    self.broker,
                    self.settings,
                    queue,
                    messages,
                    task_ids=[row.task_id for row in batch],
                )
            except PartialBatchError as exc:
                errors.update({batch[i].id: why for i, why in exc.failed.items()})
            except EbsqsError as exc:  # nothing of this queue's batch was sent
                errors.update(dict.fromkeys((row.id for row in batch), f"{exc}"))
        return errors

    def _settle(
        self,
        sent: list[OutboxMessage],
        failed: list[OutboxMessage],
        errors: dict[int, str],
        now: float,
    ) -> None:
        from ebsqs.contrib.django.models import OutboxMessage

        rows = OutboxMessage.objects.using(self.alias)
        if sent:
            rows.filter(id__in=[row.id for row in sent]).delete()
        for row in failed:
            attempts = row.attempts + 1
            rows.filter(id=row.id).update(
                attempts=attempts,
                last_error=errors[row.id][:ERROR_CHARS],
                next_attempt_at=now + self.backoff.delay(attempts),
            )
        if failed:  # one line a pass, not one a row: an outage fails every row
            log.warning(
                "outbox_send_failed",
                rows=len(failed),
                task_ids=[row.task_id for row in failed],
                queues=sorted({row.queue for row in failed}),
                attempts=max(row.attempts for row in failed) + 1,
                error=errors[failed[0].id],
            )


def outgoing_of(row: OutboxMessage, now: float) -> OutgoingMessage:
    """The message a row holds, its delay worked out from its due time and ``now``: what is
    left of it, and never more than it was at the call (a relay whose clock is behind the
    sender's adds no delay)."""
    left = min(row.due_at - now, row.due_at - row.created_at)
    remaining = 0 if row.fifo else min(max(round(left), 0), MAX_DELAY_SECONDS)
    return OutgoingMessage(
        body=row.body,
        delay=remaining,
        attributes=dict(row.attributes or {}),
        group_id=row.group_id,
        dedup_id=row.dedup_id,
    )


def _claimable(alias: str, now: float, *, fifo: bool) -> QuerySet[OutboxMessage]:
    """Due rows in id order; FIFO rows only if ``fifo``, and none behind an earlier row of its
    group that waits out a backoff."""
    from django.db.models import Exists, OuterRef, Q

    from ebsqs.contrib.django.models import OutboxMessage

    rows = OutboxMessage.objects.using(alias)
    due = _due(alias, now)
    if not fifo:
        return due.filter(fifo=False).order_by("id")
    held_back = rows.filter(
        fifo=True,
        queue=OuterRef("queue"),
        group_id=OuterRef("group_id"),
        id__lt=OuterRef("id"),
        attempts__gt=0,
        next_attempt_at__gt=now,
    )
    return due.exclude(Q(fifo=True) & Exists(held_back)).order_by("id")


def _due(alias: str, now: float) -> QuerySet[OutboxMessage]:
    """Rows whose time to be tried has come: every row never tried (so a web host's clock
    ahead of the relay's delays nothing), and those whose backoff has passed."""
    from django.db.models import Q

    from ebsqs.contrib.django.models import OutboxMessage

    rows = OutboxMessage.objects.using(alias)
    return rows.filter(Q(attempts=0) | Q(next_attempt_at__lte=now))


def _ms(seconds: Sequence[float]) -> int:
    return round(max(seconds, default=0.0) * 1000)


# -- waking up --------------------------------------------------------------------------------


class Waker:
    """What a relay waits on between passes: a notification (PostgreSQL's ``LISTEN``), a
    :meth:`nudge` (a stop), or the poll interval, whichever comes first.

    Args:
        alias: the outbox's database; on PostgreSQL a connection of its own listens.
        poll_interval: the longest wait.
    """

    def __init__(self, alias: str, poll_interval: float) -> None:
        self.alias = alias
        self.poll_interval = poll_interval
        self.listener: Any = None  # a psycopg 3 connection, PostgreSQL only
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._failing = False
        self._unavailable = False

    def nudge(self) -> None:
        """End the current (or next) wait at once; safe in a signal handler."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write, b"!")

    def wait(self) -> None:
        """Wait until notified, nudged, or the poll interval passed."""
        watched = [self._read]
        listener = self.listen()
        if listener is not None:
            watched.append(listener.fileno())
        ready, _, _ = select.select(watched, [], [], self.poll_interval)
        if self._read in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._read, 4096)
        if listener is not None and listener.fileno() in ready:
            try:
                _consume_notifications(listener)
            except Exception as exc:  # noqa: BLE001 - any driver failure: listen again later
                self._lost(exc)

    def listen(self) -> Any:
        """The listening connection, (re)made if needed; None off PostgreSQL or while it
        cannot be made (the poll interval still wakes the relay)."""
        if self.listener is not None:
            return self.listener
        from django.db import connections

        connection = connections[self.alias]
        if connection.vendor != "postgresql" or self._unavailable:
            return None
        try:
            import psycopg
        except ImportError:  # a project on psycopg2: no LISTEN, the poll interval alone
            self._unavailable = True
            log.warning(
                "outbox_listen_unavailable",
                reason="LISTEN needs psycopg 3 (pip install 'psycopg[binary]')",
                poll_interval=self.poll_interval,
            )
            return None
        try:
            params = connection.get_connection_params()
            self.listener = psycopg.connect(**params, autocommit=True)
            self.listener.execute(f"LISTEN {CHANNEL}")
        except Exception as exc:  # noqa: BLE001 - any failure: poll meanwhile, retry later
            self._lost(exc)
            return None
        if self._failing:
            self._failing = False
            log.info("outbox_listen_recovered")
        return self.listener

    def _lost(self, exc: Exception) -> None:
        if self.listener is not None:
            with contextlib.suppress(Exception):
                self.listener.close()
            self.listener = None
        if not self._failing:
            self._failing = True
            log.warning("outbox_listen_failed", error_type=type(exc).__name__, error=str(exc))

    def forget(self) -> None:
        """In a forked child: close the child's copies of the nudge pipe (the listener's socket
        is the caller's to detach); the waker is not used there."""
        self._close_pipe()

    def close(self) -> None:
        """Close the listener and the nudge pipe."""
        if self.listener is not None:
            with contextlib.suppress(Exception):
                self.listener.close()
            self.listener = None
        self._close_pipe()

    def _close_pipe(self) -> None:
        # Once only: a number closed here may belong to another file later.
        for fd in (self._read, self._write):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read = self._write = -1


def _consume_notifications(listener: Any) -> None:
    """Read what the listening connection received: notifications, or its end.

    A session the server ends sends an error first, then closes; libpq reads the error
    without complaint and fails only on reading the end, so reading goes on while the socket
    stays readable (a few rounds; a flood of notifications is left to the next wait).

    Raises:
        psycopg.OperationalError: the connection is gone.
    """
    pgconn = listener.pgconn
    for _ in range(3):
        pgconn.consume_input()
        while pgconn.notifies() is not None:
            pass
        if pgconn.status != 0:  # CONNECTION_OK
            raise ConnectionError("the listening connection is no longer usable")
        readable, _, _ = select.select([listener.fileno()], [], [], 0)
        if not readable:
            return


def poll_interval(alias: str, options: OutboxOptions) -> float:
    """The configured poll interval, or the default of the outbox's database."""
    from django.db import connections

    if options.poll_interval is not None:
        return options.poll_interval
    return POLL_POSTGRES if connections[alias].vendor == "postgresql" else POLL_OTHER


def run_relay(relay: Relay, waker: Waker, stop: threading.Event) -> None:
    """Drain, wait, drain ... until ``stop`` is set; the pass after it is the last.

    A pass that fails (the database is down) is logged once per change of state and tried
    again after a wait; its connection is closed so the next pass opens a new one.
    """
    failing = False
    waker.listen()  # before the first pass: a commit after that pass wakes the next one
    log.info(
        "outbox_relay_started",
        database=relay.alias,
        holder=relay.holder,
        poll_interval=waker.poll_interval,
        listening=waker.listener is not None,
    )
    while True:
        last = stop.is_set()  # a pass begun after the stop, so it sees every commit before it
        try:
            relay.drain()
        except Exception as exc:  # noqa: BLE001 - the relay must outlive any database failure
            if relay.connection is not None:
                with contextlib.suppress(Exception):
                    relay.connection.close()
            if not failing:
                failing = True
                log.error("outbox_relay_failed", error_type=type(exc).__name__, error=str(exc))
        else:
            if failing:
                failing = False
                log.info("outbox_relay_recovered")
        if last:
            break
        waker.wait()
    if relay.connection is not None:
        with contextlib.suppress(Exception):
            relay.connection.close()
    log.info("outbox_relay_stopped", database=relay.alias)


# -- in the supervisor ------------------------------------------------------------------------


def relays(config: SupervisorConfig) -> list[Extension]:
    """The relay a master runs when the outbox is on (registered by this app's ``ready()``
    with :func:`~ebsqs.supervisor.extension.add_service`)."""
    options = outbox_options()
    if not options.enabled:
        return []
    return [RelayService(config.settings, options)]


class RelayService(Extension):
    """Runs a :class:`Relay` in a daemon thread of the master, from ready to stop.

    Args:
        settings: the master's settings (the broker URL).
        options: the outbox's settings.
    """

    def __init__(self, settings: Settings, options: OutboxOptions) -> None:
        self.settings = settings
        self.options = options
        self.relay = Relay(settings, options.alias, max_backoff=options.max_backoff)
        self.waker: Waker | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_starting(self, snapshot: SupervisorSnapshot) -> None:
        """In the master's main thread, before the first fork: build the broker and its
        clients, and run the database code once, so the thread imports nothing later."""
        try:
            self.relay.broker = prepared(self.settings.broker_url)
            _warm_up(self.options.alias)
        except Exception as exc:  # noqa: BLE001 - the thread tries again, and logs its failures
            log.warning(
                "outbox_relay_prepare_failed", error_type=type(exc).__name__, error=str(exc)
            )

    def on_ready(self, snapshot: SupervisorSnapshot) -> None:
        """The first children are forked: start the thread (once)."""
        if self._thread is not None:
            return
        self.waker = Waker(self.options.alias, poll_interval(self.options.alias, self.options))
        os.register_at_fork(after_in_child=self._forget_in_child)
        # In a copy of the master's context, so the relay's log lines carry its role and pid.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(run_relay, self.relay, self.waker, self._stop),
            name="ebsqs-outbox",
            daemon=True,
        )
        self._thread.start()

    def on_stopping(self, snapshot: SupervisorSnapshot, graceful: bool) -> None:
        """A stop began: the relay makes a last pass and ends (it does not wait for it)."""
        self._stop.set()
        if self.waker is not None:
            self.waker.nudge()

    def on_stopped(self, snapshot: SupervisorSnapshot, exit_code: int) -> None:
        """Wait a little for the last pass; one stuck on the network dies with the process."""
        self._stop.set()
        if self._thread is None or self.waker is None:
            return
        self.waker.nudge()
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.waker.close()

    def _forget_in_child(self) -> None:
        """In a forked child: the relay thread's sockets, copied by the fork, are pointed at
        ``/dev/null``, so nothing in the child can write on the master's connections."""
        raw = getattr(self.relay.connection, "connection", None)
        listener = self.waker.listener if self.waker is not None else None
        for driver in (raw, listener):
            if driver is not None:
                with contextlib.suppress(Exception):
                    _detach_socket(driver)
        if self.waker is not None:  # the nudge pipe is the master's
            self.waker.forget()


def _warm_up(alias: str) -> None:
    """Connect to the outbox's database once, query the table, and close: the code a relay
    pass runs is imported now, in this (the master's main) thread."""
    from django.db import connections

    from ebsqs.contrib.django.models import OutboxMessage

    try:
        OutboxMessage.objects.using(alias).filter(id=0).exists()
        if connections[alias].vendor == "postgresql":
            with contextlib.suppress(ImportError):  # psycopg2 projects poll (see Waker)
                import psycopg  # noqa: F401 - imported here, not first in the relay's thread
    finally:
        connections[alias].close()
