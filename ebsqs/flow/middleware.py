"""Flow control as worker middleware (:class:`FlowControl`), in the loop's thread.

Before a job starts: a duplicate delivery of a unique task that already completed is skipped
(acked, counted ``skipped``); a concurrency slot is leased; a rate slot is taken. A task over its
limit is *deferred*: its message is released for as long as it must wait (its rate slot's time,
or a short jittered pause for a full concurrency limit), never held in memory or a worker slot,
and never counted as a failure. After the outcome (every outcome, a crash included) the lease is
given back and a unique task's success is recorded. Leases are renewed from a thread of their own
while their tasks run (:class:`_Leases`).

When the store fails, flow control fails open: the task runs, and ``flow_store_unavailable`` is
logged (at most every :data:`WARN_EVERY` seconds per process). A task queue must not stop because
its limiter did.
"""

from __future__ import annotations

import functools
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ebsqs.config import Settings, load_settings
from ebsqs.errors import UnknownTaskError
from ebsqs.executors.execution import Job, Outcome, OutcomeKind
from ebsqs.flow.base import FlowStore, FlowStoreError
from ebsqs.flow.spec import FlowKeyError, FlowSpec, Scope
from ebsqs.flow.store import host_store, store_for
from ebsqs.log import get_logger
from ebsqs.middleware import RUN, Decision, Middleware, defer, reject, skip
from ebsqs.registry import TaskRegistry
from ebsqs.registry import registry as default_registry

log = get_logger(__name__)

#: A slot due within this many seconds is taken now (a deferred message comes back a little
#: early or late; a whole extra deferral for a few milliseconds costs a receive).
EARLY = 0.1
#: Seconds (whole, picked at random) a task waits when its concurrency limit is full: there is
#: no turn to reserve, so waiters come back spread out.
CONCURRENCY_WAIT = (1, 3)
#: Seconds a concurrency lease lasts past its last renewal. A thread of the holding process
#: renews its leases every :data:`RENEW_EVERY` seconds while their tasks run, so a task of any
#: length keeps its slot, and a holder that was killed (or hangs with the GIL) frees it within
#: a minute. The host store also frees the leases of dead processes at once.
LEASE_SECONDS = 60.0
RENEW_EVERY = 20.0
#: The least time a completed unique task is remembered, for duplicate deliveries.
MIN_DONE_SECONDS = 60.0
#: Seconds between two ``flow_store_unavailable`` warnings of one process.
WARN_EVERY = 30.0


@dataclass(frozen=True, slots=True)
class _Lease:
    store: FlowStore
    key: str
    limit: int
    holder: str


class _Leases:
    """The concurrency leases this process holds, by job key, renewed from a thread of their
    own (started in the process that takes the first lease: never across a fork)."""

    def __init__(self, on_error: Callable[[FlowStoreError], None]) -> None:
        self._held: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._on_error = on_error

    def add(self, key: str, lease: _Lease) -> None:
        with self._lock:
            self._held[key] = lease
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(
                    target=self._renew_forever, name="ebsqs-flow-leases", daemon=True
                ).start()

    def pop(self, key: str) -> _Lease | None:
        with self._lock:
            return self._held.pop(key, None)

    def _renew_forever(self) -> None:
        # In the renewal thread, for the life of the process.
        while not threading.Event().wait(RENEW_EVERY):
            self.renew(time.time())

    def renew(self, now: float) -> None:
        """Extend every lease held by :data:`LEASE_SECONDS` from ``now``."""
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            try:
                kept = lease.store.acquire(lease.key, lease.limit, lease.holder, LEASE_SECONDS, now)
            except FlowStoreError as exc:
                self._on_error(exc)
                continue
            if not kept:  # it ran out (the store was down, the process stalled) and was taken
                log.warning("concurrency_lease_lost", key=lease.key, holder=lease.holder)


class FlowControl(Middleware):
    """Rate limits, concurrency limits and duplicate skips for the tasks of one registry.

    Args:
        registry: where tasks (and their :class:`~ebsqs.flow.spec.FlowSpec`) are looked up.
    """

    def __init__(self, registry: TaskRegistry = default_registry) -> None:
        self.registry = registry
        self._settings: Settings | None = None
        self._warned_at = -math.inf
        self._leases = _Leases(self._store_failed)

    def worker_started(self) -> None:
        """In the worker's process: read the settings once and make the store they name, so a
        bad ``flow_store`` stops the worker at boot (a ``ConfigurationError``), not at the
        first limited task."""
        settings = self._settings = load_settings()
        store_for(settings.flow_store, settings.flow_host_store)

    def _spec(self, name: str) -> FlowSpec | None:
        try:
            task = self.registry.get(name)
        except UnknownTaskError:  # the worker's to reject
            return None
        spec = getattr(task, "flow", None)
        return spec if isinstance(spec, FlowSpec) else None

    def _store(self, spec: FlowSpec, *, limits: bool = True) -> FlowStore:
        settings = self._settings = self._settings or load_settings()
        if limits and spec.scope is Scope.HOST:
            return host_store(settings.flow_host_store)
        return store_for(settings.flow_store, settings.flow_host_store)

    def before_start(self, job: Job) -> Decision:
        """Skip, defer or run (see the module's docstring)."""
        spec = self._spec(job.envelope.task)
        if spec is None:
            return RUN
        try:
            return self._decide(spec, job)
        except FlowKeyError as exc:
            return reject(str(exc))  # the arguments cannot change: it would never run
        except FlowStoreError as exc:
            self._store_failed(exc)
            return RUN

    def _decide(self, spec: FlowSpec, job: Job) -> Decision:
        envelope = job.envelope
        now = time.time()
        if spec.unique_for is not None:
            done = self._store(spec, limits=False).get(_done_key(envelope.id), now)
            if done is not None:
                return skip("a duplicate of a unique task that already completed")
        if spec.concurrency is not None:
            lease = _Lease(
                self._store(spec),
                spec.concurrency_name(envelope.args, envelope.kwargs),
                spec.concurrency,
                f"{socket.gethostname()}:{os.getpid()}:{job.key}",
            )
            if not lease.store.acquire(lease.key, lease.limit, lease.holder, LEASE_SECONDS, now):
                wait = random.randint(*CONCURRENCY_WAIT)
                return defer(wait, f"concurrency limit {spec.concurrency} reached")
            self._leases.add(job.key, lease)
        if spec.rate is not None:
            try:
                slot = self._store(spec).take_slot(
                    spec.rate_name(envelope.args, envelope.kwargs),
                    spec.rate.interval,
                    envelope.id,
                    now,
                    EARLY,
                )
            except (FlowKeyError, FlowStoreError):
                self._give_back(job.key)
                raise
            if slot > now + EARLY:
                self._give_back(job.key)
                # Whole seconds (a visibility timeout), rounded up: it comes back at or just
                # after its turn, and then runs.
                return defer(math.ceil(slot - now), f"rate limit {spec.rate}")
        return RUN

    def after_outcome(self, job: Job, outcome: Outcome) -> None:
        """Give the lease back (whatever the outcome); remember a unique task's success."""
        self._give_back(job.key)
        spec = self._spec(job.envelope.task) if outcome.kind is OutcomeKind.SUCCEEDED else None
        if spec is None or spec.unique_for is None:
            return
        try:
            self._store(spec, limits=False).claim(
                _done_key(job.envelope.id), "1", max(spec.unique_for, MIN_DONE_SECONDS), time.time()
            )
        except FlowStoreError as exc:
            self._store_failed(exc)

    def _give_back(self, key: str) -> None:
        lease = self._leases.pop(key)
        if lease is None:
            return
        try:
            lease.store.release(lease.key, lease.holder)
        except FlowStoreError as exc:
            self._store_failed(exc)  # the lease runs out by itself

    def _store_failed(self, exc: FlowStoreError) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("flow_store_unavailable", error=str(exc), failing="open")


def _done_key(task_id: str) -> str:
    return f"done:{task_id}"


@functools.cache
def flow_control(registry: TaskRegistry) -> FlowControl:
    """The one :class:`FlowControl` of a registry in this process."""
    return FlowControl(registry)
