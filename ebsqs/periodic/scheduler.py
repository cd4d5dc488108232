"""The scheduler: a master extension whose thread sends each periodic task's ticks.

Every master of every host runs one, and each tick still runs once:

- on a FIFO queue every scheduler sends its copy of a tick with the deduplication id
  ``<task>:<scheduled time>``, and SQS keeps the first copy of any sent within five minutes of
  each other. Schedulers wake on the tick by the wall clock, so copies leave within a second or
  two of one another (hosts' clocks kept by NTP); a copy is never sent more than
  :data:`SEND_UNTIL` after its tick, so copies stay inside that window;
- with Django (``ebsqs.contrib.django`` installed) a scheduler sends only the ticks whose
  unique row it claimed (:mod:`ebsqs.periodic.django_store`), on any queue;
- on a standard queue without Django nothing can collapse the copies: the master refuses to
  start (exit code ``BOOT``), naming both ways out.

Threads and forks: the master's loop never waits on the broker or the database; the thread
does. Its broker and boto3 clients are built in the master's main thread before the first fork
(:meth:`Scheduler.on_starting`), and the thread starts once the pool is ready (as
:mod:`ebsqs.ops.depth` does, for the same reason: a lock held by a thread at a fork stays held
in the child). While the thread talks to the database it holds a fork guard, so a fork waits
for that statement (at most :data:`FORK_WAIT`) and no open connection is copied into a child;
it holds it for its first send too, which may import modules lazily (under import locks).
A stopping master stops scheduling at once.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ebsqs import producer
from ebsqs.brokers import prepared
from ebsqs.brokers.base import is_fifo
from ebsqs.errors import ConfigurationError
from ebsqs.log import get_logger
from ebsqs.periodic.registry import PeriodicRegistry, PeriodicTask, periodic_registry
from ebsqs.periodic.store import STATE_FILE, FileStore, Store
from ebsqs.periodic.ticks import Tick, iso, missed_ticks
from ebsqs.producer import Call, SendOptions
from ebsqs.supervisor.config import SupervisorConfig
from ebsqs.supervisor.extension import Extension
from ebsqs.supervisor.snapshot import SupervisorSnapshot

log = get_logger(__name__)

#: Seconds after its due time past which a tick is not sent (FIFO dedup lasts five minutes;
#: this leaves a minute for the copies of other hosts). A late tick is a missed one.
SEND_UNTIL = 240.0
#: Longest wait between two passes (taking over abandoned claims, pruning).
MAX_WAIT = 30.0
#: Seconds between looks for abandoned claims in the Django store (one SELECT).
RECLAIM_EVERY = 30.0
#: Seconds between prunings of the Django store.
PRUNE_EVERY = 3600.0
#: Longest a fork waits for the thread's database work (a statement is bounded by the store's
#: timeout; a connect that hangs is not): past it the fork goes on, and the worst a child can do
#: is end the copied connection, failing that one statement, which is tried again.
FORK_WAIT = 2.0
#: Seconds between attempts after a failure (the store unreachable at start, say), and between
#: attempts to send a failed tick again.
RETRY_WAIT = 5.0


@dataclass
class _Plan:
    """One task's place in the schedule (the thread's own state)."""

    entry: PeriodicTask
    next_at: dt.datetime
    retry: list[tuple[Tick, bool]] = field(default_factory=list)  # (tick, claim won)


class Scheduler(Extension):
    """Sends the ticks of every periodic task, from a thread of the master. It keeps its own
    time (not the master's ticks), and a HUP, which reloads the children's code, leaves its
    schedules as they were read at start.

    Args:
        config: the master's settings and where its status file lives (the state file goes
            beside it).
        registry: the periodic tasks (default: those ``@periodic`` recorded).
        store: how ticks are claimed and remembered (default: Django's rows when the app is
            installed, else the host's state file).
        clock: wall-clock seconds.
    """

    def __init__(
        self,
        config: SupervisorConfig,
        registry: PeriodicRegistry = periodic_registry,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.settings = config.settings
        self.registry = registry
        self.store = store
        self.clock = clock
        self._plans: dict[str, _Plan] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._held_for_fork = False
        self._warm = False  # a first send went out
        self._last_prune = float("-inf")
        self._last_reclaim = float("-inf")

    # -- the master's events (its main thread) -----------------------------------------------

    def on_starting(self, snapshot: SupervisorSnapshot) -> None:
        """Choose the store, refuse what cannot run once, and build the broker before any fork.

        Raises:
            ConfigurationError: a periodic task's queue is a standard queue and there is no
                Django store; the master stops before its first fork, with exit code 3
                (``master_boot_failed``, after ``periodic_refused``).
        """
        entries = self.registry.entries()
        if not entries or self.settings.eager:
            return
        if self.store is None:
            self.store = _django_store() or FileStore(self._state_path())
        unsafe = [e for e in entries if not self.store.exclusive and not is_fifo(self._queue(e))]
        if unsafe:
            names = ", ".join(f"{e.name} (queue {self._queue(e)!r})" for e in unsafe)
            log.critical(
                "periodic_refused",
                tasks=names,
                error="a standard SQS queue cannot collapse the copies every supervisor sends",
                fix="send periodic tasks to a FIFO queue (queue_name='....fifo'), or install "
                "ebsqs.contrib.django so ticks are claimed as database rows",
            )
            raise ConfigurationError(f"periodic tasks on a standard queue: {names}")
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._after_fork_in_parent,
            after_in_child=self._forget_in_child,
        )
        try:
            prepared(self.settings.broker_url, producer.broker_for)
        except Exception as exc:  # noqa: BLE001 - the thread's first send (guarded) builds them
            log.warning("periodic_broker_failed", error_type=type(exc).__name__, error=str(exc))

    def on_ready(self, snapshot: SupervisorSnapshot) -> None:
        """Start the thread, once the first children are forked."""
        if self.store is None or self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="ebsqs-periodic", daemon=True)
        self._thread.start()

    def on_stopping(self, snapshot: SupervisorSnapshot, graceful: bool) -> None:
        """A stopping master schedules nothing more."""
        self._stop.set()

    def on_stopped(self, snapshot: SupervisorSnapshot, exit_code: int) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)  # a send that hangs dies with the process (a daemon thread)

    def _before_fork(self) -> None:
        """Master side, before a fork: wait (at most :data:`FORK_WAIT`) for the thread's
        database work, so no open connection is copied into the child."""
        self._held_for_fork = self._guard.acquire(timeout=FORK_WAIT)

    def _after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._guard.release()

    def _forget_in_child(self) -> None:
        """After a fork, in the child: a fresh guard (the copied one is held by the fork)."""
        self._guard = threading.Lock()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        """The thread: plan (again, until the store answers), then send ticks as they fall due.
        A failing store or broker is logged and tried again; it never ends the thread."""
        while not self._stop.is_set():
            try:
                if not self._plans:
                    self.start_plans()
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - logged; tried again after a pause
                log.error(
                    "periodic_scheduler_failed", error_type=type(exc).__name__, error=str(exc)
                )
                self._stop.wait(RETRY_WAIT)
                continue
            self._stop.wait(self._wait())

    def start_plans(self) -> None:
        """Send what the tasks' ``missed`` policies ask for, and plan each task's next tick."""
        assert self.store is not None
        started = self._now()
        entries = self.registry.entries()
        with self._guard:  # every answer first: a failure here leaves nothing half planned
            lasts = {entry.name: self.store.last(entry.name) for entry in entries}
        for entry in entries:
            last = lasts[entry.name]
            ticks, left_out = missed_ticks(entry, last, started)
            if ticks or left_out:
                log.info(
                    "periodic_ticks_missed",
                    task=entry.name,
                    policy=entry.missed,
                    last=iso(last) if last else None,
                    catching_up=len(ticks),
                    more_left_out=left_out,
                )
            plan = _Plan(entry, entry.schedule.next_after(started))
            self._plans[entry.name] = plan
            for tick in ticks:
                self._fire(plan, tick, started)
        log.info("periodic_scheduler_started", tasks=len(self._plans), at=iso(started))

    def run_once(self) -> None:
        """Send every tick now due (and failed ones still worth sending); take over abandoned
        claims; prune now and then."""
        assert self.store is not None
        now = self._now()
        for plan in self._plans.values():
            if self._stop.is_set():
                return
            retry, plan.retry = plan.retry, []
            for tick, claimed in retry:
                self._fire(plan, tick, now, claimed=claimed)
            self._advance(plan, now)
        if self.store.exclusive and self.clock() - self._last_reclaim >= RECLAIM_EVERY:
            self._last_reclaim = self.clock()
            with self._guard:
                taken = self.store.reclaim(now)
            for tick in taken:
                log.warning("periodic_tick_reclaimed", task=tick.task, scheduled_at=tick.iso)
                if tick.task in self._plans:
                    self._fire(self._plans[tick.task], tick, now, claimed=True)
        if self.clock() - self._last_prune >= PRUNE_EVERY:
            self._last_prune = self.clock()
            with self._guard:
                self.store.prune(now, list(self._plans))

    def _advance(self, plan: _Plan, now: dt.datetime) -> None:
        """Send the ticks of ``plan`` due by ``now``; ticks too late to send count as missed."""
        schedule = plan.entry.schedule
        if (now - plan.next_at).total_seconds() > SEND_UNTIL:  # the thread was held up
            last = plan.next_at - dt.timedelta(seconds=1)
            ticks, _ = missed_ticks(plan.entry, last, now)
            log.warning("periodic_ticks_late", task=plan.entry.name, since=iso(plan.next_at))
            plan.next_at = schedule.next_after(now)
            for tick in ticks:
                self._fire(plan, tick, now)
            return
        while plan.next_at <= now and not self._stop.is_set():
            tick = Tick(plan.next_at, plan.entry.name)
            plan.next_at = schedule.next_after(plan.next_at)
            self._fire(plan, tick, now)

    def _fire(self, plan: _Plan, tick: Tick, now: dt.datetime, *, claimed: bool = False) -> None:
        """Claim, send and mark one tick. A failed claim or send is tried again (keeping a
        claim already won) until the tick is too late; a failed mark is only logged: the claim
        is taken over later (see :mod:`ebsqs.periodic.django_store`)."""
        assert self.store is not None
        try:
            if not claimed:
                with self._guard:
                    if not self.store.claim(tick, self._now()):
                        return
                claimed = True
            if self._warm:
                self.send(plan.entry, tick)
            else:  # a first request may import modules lazily: no fork meanwhile (see above)
                with self._guard:
                    self.send(plan.entry, tick)
                self._warm = True
        except Exception as exc:  # noqa: BLE001 - a broker or database failure: try again
            late = (now - tick.scheduled_at).total_seconds() > SEND_UNTIL
            log.error(
                "periodic_tick_failed",
                task=tick.task,
                scheduled_at=tick.iso,
                error_type=type(exc).__name__,
                error=str(exc),
                retrying=not late,
            )
            if not late:
                plan.retry.append((tick, claimed))
            return
        try:
            with self._guard:
                self.store.sent(tick, self._now())
        except Exception as exc:  # noqa: BLE001 - sent, not marked: never send it again here
            log.error(
                "periodic_tick_unmarked",
                task=tick.task,
                scheduled_at=tick.iso,
                error_type=type(exc).__name__,
                error=str(exc),
            )

    def send(self, entry: PeriodicTask, tick: Tick) -> str:
        """Send one tick's message (deduplicated by the tick on a FIFO queue); its task id."""
        kwargs = {"scheduled_at": tick.iso} if entry.takes_tick else {}
        options = SendOptions(deduplication_id=tick.dedup_id)
        task_id = producer.send_now(entry.task, [Call((), kwargs)], options, settings=self.settings)
        log.info("periodic_tick_sent", task=tick.task, scheduled_at=tick.iso, task_id=task_id[0])
        return task_id[0]

    def _wait(self) -> float:
        now = self._now()
        soonest = min((plan.next_at for plan in self._plans.values()), default=None)
        wait = MAX_WAIT if soonest is None else (soonest - now).total_seconds()
        if any(plan.retry for plan in self._plans.values()):
            wait = min(wait, RETRY_WAIT)
        return min(max(wait, 0.0), MAX_WAIT)

    # -- helpers -----------------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def _queue(self, entry: PeriodicTask) -> str:
        logical = entry.task.queue_name or self.settings.default_queue
        return self.settings.physical_queue(logical)

    def _state_path(self) -> Path:
        """Beside the status file (the poll tokens' directory is there too)."""
        tokens = self.config.poll_token_dir
        if tokens:
            return Path(tokens).parent / STATE_FILE
        # A master built without a status file (not by the CLI): where ebsqs.ops.status keeps
        # status files when $XDG_RUNTIME_DIR is not set.
        return Path(tempfile.gettempdir()) / f"ebsqs-{os.getuid()}" / STATE_FILE


def _django_store() -> Store | None:
    """The Django store, when Django is set up with ``ebsqs.contrib.django`` installed."""
    if "django" not in sys.modules:  # never import Django for a process that did not
        return None
    from django.apps import apps

    if not apps.ready or not apps.is_installed("ebsqs.contrib.django"):
        return None
    from ebsqs.periodic.django_store import DjangoStore

    return DjangoStore()


def schedulers(config: SupervisorConfig) -> list[Extension]:
    """The scheduler of this master (idle unless the app defines periodic tasks)."""
    return [Scheduler(config)]
