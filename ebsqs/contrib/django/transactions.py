"""Sending after the transaction commits: ``.delay_on_commit()`` and ``send_on_commit``.

A task sent from inside ``transaction.atomic()`` can start on a worker before the transaction
commits, and then not find the row it was sent about; if the transaction rolls back it runs for
nothing. ``task.delay_on_commit(...)`` sends once the transaction commits, through Django's
``transaction.on_commit``, and never if it rolls back. ``EBSQS = {"send_on_commit": True}`` does
the same for every ``.delay()`` made inside ``atomic()``; outside one, sends happen at once.

The transaction waited for is the open one: the default database's if it has one, else that of
the first other database inside ``atomic()``.
"""

from __future__ import annotations

from collections.abc import Callable

from ebsqs.contrib.django.conf import django_option


class DjangoCommitHook:
    """The :class:`ebsqs.task.CommitHook` of Django's databases."""

    def defer(self, send: Callable[[], object]) -> None:
        """Run ``send`` when the open transaction commits (at once outside one)."""
        from django.db import DEFAULT_DB_ALIAS, transaction

        transaction.on_commit(send, using=open_transaction() or DEFAULT_DB_ALIAS)

    def delay_waits_for_commit(self) -> bool:
        """True inside ``atomic()`` when ``EBSQS["send_on_commit"]`` is set."""
        return bool(django_option("send_on_commit")) and open_transaction() is not None


def open_transaction() -> str | None:
    """The alias of the database whose ``atomic()`` block is open (default first), or None."""
    from django.db import DEFAULT_DB_ALIAS, connections

    opened = [c.alias for c in connections.all(initialized_only=True) if c.in_atomic_block]
    if DEFAULT_DB_ALIAS in opened:
        return DEFAULT_DB_ALIAS
    return opened[0] if opened else None


#: The one hook object, so registering it twice adds nothing.
COMMIT_HOOK = DjangoCommitHook()
