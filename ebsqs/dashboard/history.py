"""The queues page's own poller: depth samples of the last hour, for the sparklines.

Samples are taken when a page asks for them (:meth:`History.sample_if_due`), at most once per
:data:`INTERVAL` whoever asks, so the broker cost does not grow with the number of open pages:
each sample reads every configured queue and its dead-letter queue, two requests per queue
(``GetQueueAttributes`` on SQS), so ``2 * N`` requests per 30 s, ``4 * N`` a minute for ``N``
queues, and nothing while no page is open. The open page asks again every
:data:`INTERVAL` (see ``dashboard.js``).

A history is plain data (:meth:`to_json`, :meth:`from_json`) so that the Django views can keep
it in Django's cache, shared by every process behind that cache; ``ebsqs dashboard`` keeps one
in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Seconds between samples.
INTERVAL = 30.0
#: Seconds of samples kept (and drawn).
WINDOW = 3600.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One queue's depth at one moment; ``error`` says why a sample failed (then counts are 0).

    Attributes:
        at: wall-clock time (``time.time()``).
        visible: messages waiting.
        in_flight: messages received, not yet deleted.
        delayed: messages not yet visible.
        dead_letters: messages in its dead-letter queue, or None without one.
        error: why the broker could not be read, or None.
    """

    at: float
    visible: int = 0
    in_flight: int = 0
    delayed: int = 0
    dead_letters: int | None = None
    error: str | None = None


Sampler = Callable[[float], Mapping[str, Sample]]


class History:
    """Samples per queue over the last :data:`WINDOW` seconds (thread-safe)."""

    def __init__(self, samples: Mapping[str, Sequence[Sample]] | None = None) -> None:
        self._samples: dict[str, list[Sample]] = {q: list(s) for q, s in (samples or {}).items()}
        self._lock = threading.Lock()

    def last_at(self) -> float | None:
        """When the latest sample was taken, or None before the first."""
        with self._lock:
            times = [s[-1].at for s in self._samples.values() if s]
        return max(times) if times else None

    def sample_if_due(self, now: float, sampler: Sampler, interval: float = INTERVAL) -> bool:
        """Call ``sampler(now)`` and keep its samples, unless the last one is under
        ``interval`` old. True if a sample was taken."""
        with self._lock:
            times = [s[-1].at for s in self._samples.values() if s]
            if times and now - max(times) < interval:
                return False
            fresh = sampler(now)
            for queue, sample in fresh.items():
                kept = [s for s in self._samples.get(queue, []) if now - s.at <= WINDOW]
                self._samples[queue] = [*kept, sample]
            return True

    def samples(self, queue: str) -> list[Sample]:
        """The queue's samples, oldest first."""
        with self._lock:
            return list(self._samples.get(queue, []))

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {q: [asdict(s) for s in samples] for q, samples in self._samples.items()}

    @classmethod
    def from_json(cls, data: Any) -> History:
        """A history from :meth:`to_json`'s output; anything malformed starts afresh."""
        if not isinstance(data, dict):
            return cls()
        try:
            return cls({str(q): [Sample(**s) for s in samples] for q, samples in data.items()})
        except TypeError:
            return cls()


def backlog_age(samples: Sequence[Sample], now: float) -> tuple[float, bool] | None:
    """How long messages have been waiting, from the samples: None if none wait now.

    Returns ``(seconds, bounded)``: with ``bounded`` the oldest waiting message is at most that
    old (the queue was seen empty that long ago); without, messages have waited at least that
    long (since the first sample, which already saw some). SQS reports no oldest-message age
    through its queue attributes (only CloudWatch does), so this is what a poller can know.
    """
    if not samples or samples[-1].visible == 0 or samples[-1].error:
        return None
    for sample in reversed(samples):
        if sample.visible == 0 and not sample.error:
            return now - sample.at, True
    return now - samples[0].at, False


def sparkline(values: Sequence[float], width: int = 120, height: int = 24) -> str:
    """An inline SVG polyline of ``values`` (the last hour, oldest first)."""
    if not values:
        return f'<svg class="spark" width="{width}" height="{height}" role="img"></svg>'
    if len(values) == 1:  # one sample so far: a flat line, not an invisible point
        values = [values[0], values[0]]
    top = max(max(values), 1.0)
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - 1 - (value / top) * (height - 2):.1f}"
        for i, value in enumerate(values)
    )
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="waiting over the last hour, up to {int(top)}">'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/>'
        "</svg>"
    )
