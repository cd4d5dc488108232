"""The keeper: a thread beside the worker loop that keeps held messages alive.

About once a second (sooner when a running task's hard limit falls) the keeper:

1. settles tasks past a hard limit that their executor cannot enforce (see
   :class:`~ebsqs.executors.base.Capabilities`): the message is settled as timed out, so it is
   retried or dead-lettered by the task's policy instead of coming back to run again, and the
   worker is told to end its process;
2. sends deletes that waited ``ack_wait`` (0.1 s by default) to fill a batch;
3. extends the visibility of every held message before it expires, running or not.

The keeper never sends heartbeats: its work goes through the network and can stall behind an
outage, so heartbeats have a thread of their own (:mod:`.pulse`). It never decides what becomes
of a message beyond the overrun: it hands outcomes to the loop's settle path, the one place that
acks, retries or dead-letters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ebsqs.executors.base import Capabilities
from ebsqs.executors.execution import Outcome, OutcomeKind
from ebsqs.log import get_logger
from ebsqs.worker.held import Held, HeldMessages
from ebsqs.worker.pulse import Periodic
from ebsqs.worker.settle import Settler

log = get_logger(__name__)

#: Seconds between keeper passes (heartbeat and visibility extension).
KEEPER_INTERVAL = 1.0


class Keeper(Periodic):
    """The keeper thread of one worker. Build it in the worker's process; :meth:`start` it."""

    thread_name = "ebsqs-keeper"
    event = "keeper"

    def __init__(
        self,
        held: HeldMessages,
        settler: Settler,
        capabilities: Capabilities,
        visibility_timeout: int,
        settle: Callable[[Sequence[Outcome]], None],
        on_overrun: Callable[[], None],
    ) -> None:
        """
        Args:
            held: the worker's held messages.
            settler: the worker's settler (for deletes and visibility changes).
            capabilities: what the worker's executor enforces.
            visibility_timeout: seconds each extension hides a message for.
            settle: the loop's settle path, given the outcomes of overrun tasks.
            on_overrun: called after an overrun was settled: the process must be replaced.
        """
        self.held = held
        self.settler = settler
        self.capabilities = capabilities
        self.visibility_timeout = visibility_timeout
        self.settle = settle
        self.on_overrun = on_overrun
        super().__init__()

    def wait(self) -> float:
        """Until the next pass: a second, or sooner when a running task's hard limit falls or
        a waiting delete is due."""
        wait = KEEPER_INTERVAL
        soonest = self.held.soonest_deadline()
        if soonest is not None:
            wait = min(wait, max(soonest - time.monotonic(), 0.0) + 0.05)
        ack_due = self.settler.ack_due_in()
        if ack_due is not None:
            wait = min(wait, ack_due + 0.01)
        return wait

    def tick(self) -> None:
        """One pass (see :meth:`pass_once`)."""
        self.pass_once()

    def pass_once(self) -> None:
        """One pass: overruns, waiting deletes, visibility."""
        self.settle_overruns()
        self.settler.flush_acks(older_than=self.settler.ack_wait)
        self.extend_visibility()

    def settle_overruns(self) -> None:
        """Settle, as timed out, tasks past a hard limit their executor cannot enforce.

        The process is then replaced (``on_overrun``): at once when the loop's own thread runs
        the task (inline), after a drain otherwise (other tasks may finish; the runaway thread
        dies with the process).
        """
        now = time.monotonic()
        overrun = [h for h in self.held.overrun(now) if not self._stoppable(h)]
        if not overrun:
            return
        for held in overrun:
            assert held.job is not None and held.started_at is not None
            log.error(
                "task_overran",
                task=held.job.envelope.task,
                task_id=held.job.envelope.id,
                time_limit=held.job.time_limit,
                duration=round(now - held.started_at, 3),
            )
        self.settle([_timed_out(h, now) for h in overrun])
        self.on_overrun()

    def _stoppable(self, held: Held) -> bool:
        return held.job is not None and self.capabilities.stops_overdue(held.job)

    def extend_visibility(self) -> None:
        """Push back the visibility of every held message that expires soon."""
        now = time.monotonic()
        timeout = self.visibility_timeout
        due = self.held.expiring(now, margin=max(timeout / 3, 2 * KEEPER_INTERVAL))
        if due:
            self.settler.extend(due, timeout, now)


def _timed_out(held: Held, now: float) -> Outcome:
    limit = held.job.time_limit if held.job else None
    return Outcome(
        held.key,
        OutcomeKind.TIMED_OUT,
        now - (held.started_at or now),
        error=f"ran past its hard time limit of {limit} s",
    )
