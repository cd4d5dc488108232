"""Flow control's store in the Django database (``flow_store = "django"``): every process that
uses the same database shares the limits. Each operation is one short transaction that locks the
limit's row (``SELECT ... FOR UPDATE``), a few queries; it needs ``ebsqs.contrib.django`` in
``INSTALLED_APPS`` and its migrations applied. Runs in the thread that calls it, on that thread's
connection (the worker loop's, or the web request's at ``.delay()``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

from django.apps import apps
from django.core.exceptions import AppRegistryNotReady
from django.db import DatabaseError, close_old_connections, transaction

from ebsqs.errors import ConfigurationError
from ebsqs.flow.base import TICKET_GRACE, FlowStoreError

#: The longest key a row takes; longer ones are digested.
MAX_KEY = 255


def _key(text: str) -> str:
    if len(text) <= MAX_KEY:
        return text
    return f"{text[:200]}#{hashlib.sha256(text.encode()).hexdigest()[:40]}"


@contextlib.contextmanager
def _failing_open() -> Iterator[None]:
    try:
        yield
    except DatabaseError as exc:
        close_old_connections()  # a broken connection is replaced before the next call
        raise FlowStoreError(f"flow store (Django database): {exc}") from exc


def _locked(entries: Any, alias: str, key: str) -> Any:
    """The row of ``key``, created if missing and locked until the transaction ends."""
    rows = entries.objects.using(alias)
    rows.bulk_create([entries(key=key, expires_at=0.0)], ignore_conflicts=True)
    return rows.select_for_update().get(key=key)


class DjangoStore:
    """See :class:`~ebsqs.flow.base.FlowStore`.

    The models (``ebsqs.FlowEntry``, ``ebsqs.FlowLease``) are looked up through Django's app
    registry when the store is made: the core does not import ``ebsqs.contrib``.

    Args:
        alias: the database (``flow_store = "django:reports"`` for the alias ``reports``).
    """

    def __init__(self, alias: str = "default") -> None:
        self.alias = alias
        try:
            self.entries = apps.get_model("ebsqs", "FlowEntry")
            self.leases = apps.get_model("ebsqs", "FlowLease")
        except (LookupError, AppRegistryNotReady) as exc:
            raise ConfigurationError(
                "flow_store 'django' needs 'ebsqs.contrib.django' in INSTALLED_APPS, Django set "
                f"up, and `manage.py migrate ebsqs` run ({exc})"
            ) from exc

    def _rows(self) -> Any:
        return self.entries.objects.using(self.alias)

    def _held(self) -> Any:
        return self.leases.objects.using(self.alias)

    def take_slot(self, key: str, interval: float, ticket: str, now: float, early: float) -> float:
        """See :meth:`FlowStore.take_slot`."""
        ticket_key = _key(f"{key}|ticket|{ticket}")
        with _failing_open(), transaction.atomic(using=self.alias):
            # The limit's row, locked: every caller of this limit waits its turn here.
            rate = _locked(self.entries, self.alias, _key(key))
            kept = self._rows().filter(key=ticket_key, expires_at__gte=now).first()
            if kept is not None:
                if kept.number <= now + early:
                    kept.delete()
                return float(kept.number)
            slot = max(rate.number if rate.expires_at >= now else now, now)
            rate.number, rate.expires_at = slot + interval, slot + 2 * interval
            rate.save(update_fields=["number", "expires_at"])
            if slot > now + early:
                self._rows().update_or_create(
                    key=ticket_key,
                    defaults={"number": slot, "expires_at": slot + TICKET_GRACE},
                )
            return slot

    def acquire(self, key: str, limit: int, holder: str, ttl: float, now: float) -> bool:
        """See :meth:`FlowStore.acquire`."""
        key, holder = _key(key), _key(holder)
        with _failing_open(), transaction.atomic(using=self.alias):
            _locked(self.entries, self.alias, _key(f"{key}|leases"))
            self._held().filter(key=key, expires_at__lt=now).delete()
            held = self._held().filter(key=key)
            if not held.filter(holder=holder).exists() and held.count() >= limit:
                return False
            self._held().update_or_create(
                key=key, holder=holder, defaults={"expires_at": now + ttl}
            )
            return True

    def release(self, key: str, holder: str) -> None:
        """See :meth:`FlowStore.release`."""
        with _failing_open():
            self._held().filter(key=_key(key), holder=_key(holder)).delete()

    def claim(self, key: str, value: str, ttl: float, now: float) -> str | None:
        """See :meth:`FlowStore.claim`."""
        key = _key(key)
        with _failing_open(), transaction.atomic(using=self.alias):
            self._rows().filter(key=key, expires_at__lt=now).delete()
            # ON CONFLICT DO NOTHING: a concurrent claim's insert wins or this one does.
            self._rows().bulk_create(
                [self.entries(key=key, value=value, expires_at=now + ttl)], ignore_conflicts=True
            )
            kept = self._rows().get(key=key).value
        return None if kept == value else kept

    def unclaim(self, key: str, value: str) -> None:
        """See :meth:`FlowStore.unclaim`."""
        with _failing_open():
            self._rows().filter(key=_key(key), value=value).delete()

    def get(self, key: str, now: float) -> str | None:
        """See :meth:`FlowStore.get`."""
        with _failing_open():
            kept = self._rows().filter(key=_key(key), expires_at__gte=now).first()
        return None if kept is None else str(kept.value)
