"""Retry delays: exponential with full jitter, capped (the AWS architecture blog's advice)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delay(n)`` for the n-th retry is uniform in [0, min(cap, base * 2**(n-1))].

    Attributes:
        base: seconds of the first retry's upper bound.
        cap: the largest delay in seconds.
        jitter: draw uniformly below the bound (spreads a thundering herd); off gives the bound.
    """

    base: float = 1.0
    cap: float = 3600.0
    jitter: bool = True

    def delay(self, retry: int) -> float:
        """Seconds to wait before the ``retry``-th retry (1 for the first)."""
        bound = min(self.cap, self.base * 2 ** max(retry - 1, 0))
        return random.uniform(0, bound) if self.jitter else bound
