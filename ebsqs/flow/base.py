"""What a flow store is: the :class:`FlowStore` protocol and its error.

A store offers atomic operations, each a single round trip:

- :meth:`FlowStore.take_slot`: a rate limit as GCRA with reservations. Each caller is told when
  its turn is (the *slot*, ``interval`` after the one before) and the slot is kept for it under
  a ticket (the task id); a ticket asking again gets the same slot, used up once due. A deferred
  task is released for exactly as long as it must wait, so 200 tasks against 10/s come back
  spread over 20 seconds instead of all at once.
- :meth:`FlowStore.acquire` / :meth:`FlowStore.release`: concurrency slots as leases with a
  lifetime, so a holder that died without releasing frees its slot when the lease runs out.
- :meth:`FlowStore.claim` / :meth:`FlowStore.unclaim` / :meth:`FlowStore.get`: a value kept for
  a time, set only if absent (unique sends, completed unique tasks).
"""

from __future__ import annotations

from typing import Protocol

from ebsqs.errors import EbsqsError

#: How long a ticket's slot is kept past its time: a deferred message may come back late (its
#: worker busy, its receive slow); after this it takes a new slot.
TICKET_GRACE = 300.0


class FlowStoreError(EbsqsError):
    """The flow store could not be reached or failed (flow control then fails open)."""


class FlowStore(Protocol):
    """Atomic operations on flow control's state; ``now`` is epoch seconds."""

    def take_slot(self, key: str, interval: float, ticket: str, now: float, early: float) -> float:
        """The start time of ``ticket``'s slot under the rate ``key`` (one start per
        ``interval`` seconds); a slot due by ``now + early`` is used up by this call."""
        ...

    def acquire(self, key: str, limit: int, holder: str, ttl: float, now: float) -> bool:
        """Take one of ``limit`` slots for ``holder`` for ``ttl`` seconds; False when full."""
        ...

    def release(self, key: str, holder: str) -> None:
        """Give ``holder``'s slot back (nothing if it has none)."""
        ...

    def claim(self, key: str, value: str, ttl: float, now: float) -> str | None:
        """Keep ``value`` under ``key`` for ``ttl`` seconds unless a value is kept already:
        None when this call claimed it, else the value kept."""
        ...

    def unclaim(self, key: str, value: str) -> None:
        """Forget ``key`` if it still holds ``value`` (a send that failed after its claim)."""
        ...

    def get(self, key: str, now: float) -> str | None:
        """The value kept under ``key``, or None."""
        ...
