"""Database hygiene: what Django's request cycle does for web requests, done around tasks and
forks, as a middleware (:class:`DatabaseHygiene`, registered by the app's ``ready()``).

- Around every task, in the thread or process that runs it: ``close_old_connections()`` before
  and after, so a connection the previous task broke, or one past ``CONN_MAX_AGE``, is replaced
  instead of failing the next task. As for web requests, a persistent connection
  (``CONN_MAX_AGE`` > 0) that died silently is only noticed with ``CONN_HEALTH_CHECKS = True``.
- After a task failed because its database connection dropped (the server restarted or failed
  over, the network broke, the session was ended), the message is redelivered after a backoff,
  as after a crash (no attempt used, so a task with no retries runs again too; on a fresh
  connection), instead of dead-lettered. See :meth:`DatabaseHygiene.classify`; ``EBSQS =
  {"retry_database_errors": False}`` turns it off.
- In a process about to fork (the supervisor's master, the process executor): every connection
  and cache connection is closed first, so no child starts with a socket it shares.
- In every forked child: connections it inherited anyway (opened by a thread of the parent, or
  between the hook and the fork) are dropped without a word to the server: closing them the
  normal way would send the server a goodbye on a socket the parent still uses and break the
  parent's connection. The child's first query opens its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import TYPE_CHECKING, Any

from ebsqs.contrib.django.conf import django_option
from ebsqs.executors.execution import OutcomeKind
from ebsqs.log import get_logger
from ebsqs.middleware import Middleware

if TYPE_CHECKING:
    from ebsqs.executors.execution import Job, Outcome

log = get_logger(__name__)

#: What Django raises when the connection under a task fails: the server went away or ended the
#: session (OperationalError), or the task used the connection after that (InterfaceError:
#: "connection already closed"). A new attempt on a new connection can succeed. The names are
#: the qualified type names outcomes carry (they travel from a process executor's children).
DATABASE_ERRORS = frozenset({"django.db.utils.OperationalError", "django.db.utils.InterfaceError"})

#: Inherited connections a child could not detach from their socket (no ``fileno()``, such as
#: SQLite's): kept referenced so that garbage collection never runs their close in the child.
_KEPT_AFTER_FORK: list[Any] = []


class DatabaseHygiene(Middleware):
    """Django's connection hygiene around tasks and forks."""

    def before_fork(self) -> None:
        """In the forking process: hold no database or cache connection across the fork."""
        close_all_connections()

    def task_started(self, job: Job) -> None:
        """In the task's thread or process, just before it runs."""
        close_old_connections()

    def task_finished(self, job: Job, outcome: Outcome) -> None:
        """In the task's thread or process, just after it ran, whatever happened.

        A connection that failed under the task is closed here (Django finds it unusable), so
        a retry of the task gets a new one.
        """
        close_old_connections()

    def classify(self, job: Job, outcome: Outcome) -> Outcome:
        """In the loop's thread, before the outcome is settled: a failure on a dropped database
        connection is the environment's, not the task's, unless
        ``EBSQS["retry_database_errors"]`` is False.

        Only the description changes (``redeliver``); the worker then gives the message back
        after a backoff, as after a crash: no attempt is used, so a task with no retries runs
        again too, and on the receive the queue's ``max_receive_count`` allows last it is
        dead-lettered with the reason.
        """
        if (
            outcome.kind is not OutcomeKind.FAILED
            or outcome.error_type not in DATABASE_ERRORS
            or not django_option("retry_database_errors")
        ):
            return outcome
        return dataclasses.replace(outcome, redeliver=True)


#: The one instance, so registering it twice (``ready()`` run again by a test) adds nothing.
DB_HYGIENE = DatabaseHygiene()


@functools.cache
def register_fork_handler() -> None:
    """Have every forked child forget inherited connections (once per process)."""
    os.register_at_fork(after_in_child=forget_inherited_connections)


def close_old_connections() -> None:
    """Django's ``close_old_connections()``, sparing connections inside ``atomic()``.

    A task run eagerly inside a test's transaction must not have that transaction's connection
    closed under it (Django's test client skips the request signals for the same reason).
    """
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()


def close_all_connections() -> None:
    """Close this thread's database connections (and pools) and every cache connection."""
    from django.core.cache import close_caches
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        connection.close()
        # Django 5.1+ connection pools keep sockets (and threads) outside the connection.
        pools = getattr(type(connection), "_connection_pools", None)
        if pools and connection.alias in pools:
            getattr(connection, "close_pool")()  # noqa: B009 - PostgreSQL's wrapper only
    close_caches()


def forget_inherited_connections() -> None:
    """In a forked child: drop every connection object inherited from the parent, silently.

    Runs from ``os.register_at_fork(after_in_child=...)``, so it covers every fork of a
    process where the app is ready. The socket's descriptor is pointed at ``/dev/null`` first;
    closing the connection then only closes that, and whatever goodbye the driver writes goes
    nowhere. The server never hears from the child on the parent's connection.
    """
    from django.db import connections

    dropped = []
    for connection in connections.all(initialized_only=True):
        raw = connection.connection
        if raw is None:
            continue
        dropped.append(connection.alias)
        if _detach_socket(raw):
            with contextlib.suppress(Exception):
                raw.close()
        else:
            _KEPT_AFTER_FORK.append(raw)
        # Django's own bookkeeping: the next query opens a new connection.
        connection.connection = None
        connection.in_atomic_block = False
        connection.savepoint_ids = []
        connection.needs_rollback = False
        connection.closed_in_transaction = False
        connection.run_on_commit = []
    if dropped:
        log.debug("inherited_connections_dropped", aliases=dropped, pid=os.getpid())


def _detach_socket(raw: Any) -> bool:
    """Point the descriptor of a driver connection at ``/dev/null``; False if it has none."""
    try:
        fd = raw.fileno()
    except Exception:  # noqa: BLE001 - no descriptor, or the driver refuses: keep it instead
        return False
    if not isinstance(fd, int) or fd < 0:
        return False
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
    return True
