"""Sending after the transaction commits: ``.delay_on_commit()`` and ``send_on_commit``.

A task sent from inside ``transaction.atomic()`` can start on a worker before the transaction
commits, and then not find the row it was sent about; if the transaction rolls back it runs for
nothing. ``task.delay_on_commit(...)`` sends once the transaction commits, through Django's
``transaction.on_commit``, and never if it rolls back. ``EBSQS = {"send_on_commit": True}`` does
the same for every ``.delay()`` made inside ``atomic()``; outside one, sends happen at once.

The transaction waited for is the open one: the default database's if it has one, else that of
the first other database inside ``atomic()``.

With the durable outbox on (``EBSQS = {"outbox": True}``) and a transaction open on its database,
neither waits: the send is written to the outbox in that transaction at once
(:mod:`ebsqs.contrib.django.outbox`), so it commits or rolls back with it and survives the
process dying after the commit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ebsqs.contrib.django.conf import django_option
from ebsqs.contrib.django.outbox import keeping_alias
from ebsqs.middleware import Middleware


class SendOnCommit(Middleware):
    """Sends wait for the open transaction of Django's databases to commit."""

    def send_later(self, *, on_commit: bool) -> Callable[[Callable[[], object]], None] | None:
        """``.delay_on_commit()`` always waits for the open transaction (it runs at once
        outside one); a plain ``.delay()`` inside ``atomic()`` waits too when
        ``EBSQS["send_on_commit"]`` is set. With the outbox on and a transaction open on its
        database, neither waits: the send goes to the outbox now, in that transaction."""
        from django.db import DEFAULT_DB_ALIAS

        if keeping_alias() is not None:
            return None  # the producer sends now, into the outbox, in the open transaction
        alias = open_transaction()
        if not on_commit and (alias is None or not django_option("send_on_commit")):
            return None
        return functools.partial(_on_commit, alias or DEFAULT_DB_ALIAS)


def _on_commit(alias: str, send: Callable[[], object]) -> None:
    from django.db import transaction

    transaction.on_commit(send, using=alias)


def open_transaction() -> str | None:
    """The alias of the database whose ``atomic()`` block is open (default first), or None."""
    from django.db import DEFAULT_DB_ALIAS, connections

    opened = [c.alias for c in connections.all(initialized_only=True) if c.in_atomic_block]
    if DEFAULT_DB_ALIAS in opened:
        return DEFAULT_DB_ALIAS
    return opened[0] if opened else None


#: The one instance, so registering it twice adds nothing.
SEND_ON_COMMIT = SendOnCommit()
