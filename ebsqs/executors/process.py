"""The process executor: jobs run in a pool of forked subprocesses that can be killed.

For CPU-bound tasks, and for tasks that must be stoppable. Each of the N pool processes is
forked from the worker's process (so the task registry and the app are already imported) and
serves one job at a time over a pipe, job after job, until it is killed or told to exit.

Each pool process starts its own session (``os.setsid``), so the process group holds the task
and everything it spawned; killing the group (``os.killpg``) stops the whole tree, and signals
meant for the worker (a terminal's Ctrl-C, systemd's SIGTERM to the cgroup) do not stop a task
half-way: the worker decides when a task stops.

Time limits:
    * soft: the pool process runs jobs in its main thread, so it arms ``SIGALRM`` and the task
      gets :class:`~ebsqs.errors.SoftTimeLimitExceeded`, which it may catch.
    * hard: :meth:`ProcessExecutor.stop_overdue` kills the job's process group and reports
      TIMED_OUT; a fresh process takes the slot.

A pool process that dies mid-job (a segfault, the OOM killer, ``os._exit``) is reported as a
FAILED outcome naming the signal or exit code, and replaced. Pool processes do not outlive the
worker: an idle one exits at end of file on its pipe, a busy one is killed by Linux
(``PR_SET_PDEATHSIG``) when the worker dies.

Forking happens in the worker loop's thread. The first pool is forked in :meth:`start`, before
the worker starts its keeper thread; replacements are forked while the keeper runs. A lock the
keeper happened to hold at that instant (say, mid log line) stays locked in the new process, the
known limit of forking a threaded process that every prefork server shares; the keeper writes
rarely, and the pool process does little before serving. Broker clients and database
connections are made afresh in each process (the ``before_fork`` hook lets integrations such
as Django close connections before each fork).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from types import FrameType

import structlog

from ebsqs import middleware
from ebsqs.executors.base import Capabilities
from ebsqs.executors.execution import Job, Outcome, OutcomeKind, failure, run_job
from ebsqs.log import get_logger
from ebsqs.registry import TaskRegistry, registry

log = get_logger(__name__)

#: Seconds an idle pool process gets to exit by itself at shutdown before it is killed.
EXIT_GRACE = 2.0

#: Seconds between a process closing its pipes (exiting) and the latest we expect to reap it.
REAP_GRACE = 0.5

_PR_SET_PDEATHSIG = 1


class ProcessDied(Exception):
    """A pool process ended while running a job."""


@dataclass
class _PoolProcess:
    """A forked pool process, seen from the worker: its pid, pipe and exit status.

    Attributes:
        pid: its process id, which is also its process group id (it calls ``setsid``).
        conn: our end of the job/outcome pipe.
        sentinel: a pipe end that becomes readable (end-of-file) when the process exits.
        status: its exit code once reaped (negative: the signal that killed it).
    """

    pid: int
    conn: Connection
    sentinel: int
    status: int | None = None

    def alive(self) -> bool:
        """Whether it still runs (reaps it, without blocking, if it has exited)."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for it to exit (and reap it); True once it has."""
        give_up = time.monotonic() + timeout
        if self.status is None and wait([self.sentinel], timeout):
            # Its pipes close a moment before it can be reaped: poll for that moment.
            while self.alive() and time.monotonic() < give_up + REAP_GRACE:
                time.sleep(0.001)
        return not self.alive()

    def kill(self) -> None:
        """SIGKILL its whole process group (the task and anything it spawned), and reap it."""
        if self.status is None:
            _kill_group(self.pid, leader=True)
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
        else:
            # Reaped already: only what it left behind in its group may remain. (The pid alone
            # may belong to a stranger by now; a group id in use is never handed out again.)
            _kill_group(self.pid, leader=False)

    def close(self) -> None:
        """Release our file descriptors (once it is reaped)."""
        if not self.conn.closed:
            self.conn.close()
            os.close(self.sentinel)

    def fds(self) -> list[int]:
        """Our open file descriptors for it (which a newly forked sibling must close)."""
        return [] if self.conn.closed else [self.conn.fileno(), self.sentinel]


@dataclass
class _Slot:
    """One place in the pool: a process and the job it runs, if any."""

    number: int
    process: _PoolProcess
    job: Job | None = None
    started: float = 0.0  # monotonic
    deadline: float | None = None  # monotonic hard limit


class ProcessExecutor:
    """Runs up to ``concurrency`` jobs at once, each in a pool process it can kill."""

    capabilities = Capabilities(
        soft_limit_sync=True, soft_limit_async=True, hard_limit_sync=True, hard_limit_async=True
    )

    def __init__(self, concurrency: int = 1, registry: TaskRegistry = registry) -> None:
        self.concurrency = concurrency
        self._registry = registry
        self._slots: list[_Slot] = []
        self._done: list[Outcome] = []
        self._wake_r = self._wake_w = -1  # a pipe that wake() writes to, from start()

    # -- the worker's side: everything below runs in the worker loop's thread -------------

    def start(self) -> None:
        """Fork the pool (in the worker's process, before its keeper thread starts)."""
        for number in range(self.concurrency):
            self._slots.append(_Slot(number, self._spawn()))
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        log.info(
            "process_pool_started",
            processes=self.concurrency,
            pids=[slot.process.pid for slot in self._slots],
        )

    def submit(self, job: Job) -> None:
        """Send a job to an idle pool process. Only called while ``free_slots() > 0``."""
        slot = next((s for s in self._slots if s.job is None), None)
        if slot is None:
            raise RuntimeError("submit() called with no free slot")
        if not slot.process.alive():
            # It died between jobs (after its last outcome was collected): replace it quietly.
            self._replace(slot)
        deadline = time.time() + job.time_limit if job.time_limit else None
        slot.job, slot.started = job, time.monotonic()
        slot.deadline = slot.started + job.time_limit if job.time_limit else None
        try:
            slot.process.conn.send((job, deadline))
        except OSError:
            # It died just now; collect() sees the dead process and reports the job FAILED.
            log.warning("process_send_failed", pid=slot.process.pid, task=job.envelope.task)

    def free_slots(self) -> int:
        """Idle pool processes."""
        return sum(1 for slot in self._slots if slot.job is None)

    def running(self) -> int:
        """Jobs sent to a pool process and not yet collected."""
        return sum(1 for slot in self._slots if slot.job is not None)

    def collect(self, timeout: float) -> list[Outcome]:
        """Outcomes of finished (or dead) jobs, waiting up to ``timeout`` s for the first one.

        The wait ends early at the next hard deadline, so the loop's ``stop_overdue`` is on time.
        """
        busy = [slot for slot in self._slots if slot.job is not None]
        if busy:
            now = time.monotonic()
            deadlines = [slot.deadline - now for slot in busy if slot.deadline is not None]
            wait_for = 0.0 if self._done else max(min([timeout, *deadlines]), 0)
            ready = set(wait([*_waitables(busy), self._wake_r], timeout=wait_for))
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            for slot in busy:
                if slot.process.conn in ready or slot.process.sentinel in ready:
                    self._reap(slot)
        done, self._done = self._done, []
        return done

    def wake(self) -> None:
        """End a ``collect`` that waits (a byte on the wake pipe)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"w")

    def stop_overdue(self, now: float) -> list[Outcome]:
        """Kill the process tree of every job past its hard limit; TIMED_OUT outcomes."""
        for slot in self._slots:
            if slot.job is not None and slot.deadline is not None and slot.deadline <= now:
                if slot.process.conn.poll():
                    self._reap(slot)  # it finished at the wire: keep its real outcome
                else:
                    self._kill_overdue(slot, now)
        done, self._done = self._done, []
        return done

    def shutdown(self, deadline: float) -> list[Outcome]:
        """Let running jobs finish until ``deadline``; kill the rest (INTERRUPTED); end the pool."""
        outcomes: list[Outcome] = []
        while self.running() and time.monotonic() < deadline:
            outcomes += self.collect(deadline - time.monotonic())
            outcomes += self.stop_overdue(time.monotonic())  # hard limits hold while draining
        outcomes += self.collect(0)
        now = time.monotonic()
        for slot in self._slots:
            if slot.job is not None:
                slot.process.kill()
                outcomes.append(Outcome(slot.job.key, OutcomeKind.INTERRUPTED, now - slot.started))
                log.warning(
                    "task_interrupted",
                    task=slot.job.envelope.task,
                    task_id=slot.job.envelope.id,
                    duration=round(now - slot.started, 3),
                )
                slot.job = None
        self._stop_pool()
        return outcomes

    def _kill_overdue(self, slot: _Slot, now: float) -> None:
        assert slot.job is not None
        job, limit = slot.job, slot.job.time_limit or 0
        slot.process.kill()
        log.warning(
            "task_killed",
            task=job.envelope.task,
            task_id=job.envelope.id,
            message_id=job.key,
            duration=round(now - slot.started, 3),
            time_limit=limit,
            pid=slot.process.pid,
        )
        self._done.append(
            Outcome(
                job.key,
                OutcomeKind.TIMED_OUT,
                now - slot.started,
                error=f"hard time limit of {limit:g} s exceeded; its process was killed",
            )
        )
        self._replace(slot)

    def _stop_pool(self) -> None:
        """Ask idle processes to exit, give them a moment, then kill what is left."""
        for slot in self._slots:
            with contextlib.suppress(OSError):
                slot.process.conn.send(None)
        give_up = time.monotonic() + EXIT_GRACE
        for slot in self._slots:
            if not slot.process.wait(max(give_up - time.monotonic(), 0)):
                log.warning("pool_process_killed", pid=slot.process.pid, reason="did not exit")
            slot.process.kill()
            slot.process.close()
        self._slots = []

    def _reap(self, slot: _Slot) -> None:
        """Take a busy slot's outcome, or describe its process's death and replace it."""
        job = slot.job
        assert job is not None
        with contextlib.suppress(EOFError, OSError):
            if slot.process.conn.poll():
                self._done.append(slot.process.conn.recv())
                slot.job = None
                return
        # No outcome and the pipe is closed: the process is gone or going.
        if not slot.process.wait(1.0):
            slot.process.kill()
        reason = _death(slot.process.status)
        log.error(
            "task_process_died",
            task=job.envelope.task,
            task_id=job.envelope.id,
            message_id=job.key,
            pid=slot.process.pid,
            reason=reason,
        )
        # A crash, as when a whole child dies: the message is redelivered, not failed. Work that
        # finished before the death may run again (at-least-once); a task that kills its process
        # every time reaches the dead-letter queue through the queue's redrive policy.
        died = failure(job.key, ProcessDied(reason), time.monotonic() - slot.started)
        self._done.append(replace(died, kind=OutcomeKind.CRASHED))
        self._replace(slot)

    def _replace(self, slot: _Slot) -> None:
        """Kill what is left of a slot's process group; fork a fresh process in its place."""
        slot.process.kill()
        slot.process.close()
        slot.process = self._spawn()
        slot.job, slot.deadline = None, None

    def _spawn(self) -> _PoolProcess:
        """Fork a pool process; return it as the worker sees it."""
        ours, theirs = Pipe(duplex=True)
        sentinel, alive = os.pipe()
        # The child must hold none of the worker's pipe ends (its own or its siblings'),
        # or it would never see end-of-file when the worker dies.
        inherited = [ours.fileno(), sentinel, *(fd for s in self._slots for fd in s.process.fds())]
        middleware.before_fork()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves through os._exit
            _child_main(theirs, inherited, self._registry)
        os.close(alive)
        theirs.close()
        return _PoolProcess(pid, ours, sentinel)


def _waitables(slots: Sequence[_Slot]) -> list[Connection | int]:
    return [item for slot in slots for item in (slot.process.conn, slot.process.sentinel)]


def _death(status: int | None) -> str:
    if status is not None and status < 0:
        return f"worker process died with signal {-status} ({signal.Signals(-status).name})"
    return f"worker process exited with code {status} while running the task"


def _kill_group(pid: int, leader: bool) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        if leader:
            # Not yet its own group leader: killed right after the fork, before its setsid().
            os.kill(pid, signal.SIGKILL)
    except PermissionError:
        pass  # a group of someone else's processes: not ours to kill


# -- the pool process's side: everything below runs in the forked child -----------------------


def _child_main(conn: Connection, inherited: Sequence[int], registry: TaskRegistry) -> None:
    """Entry point of a forked pool process; never returns (leaves through ``os._exit``)."""
    code = 1
    try:
        parent = os.getppid()
        os.setsid()  # its own process group: killpg reaches the task's whole tree
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        _reset_signals()
        _die_with(parent)
        structlog.contextvars.clear_contextvars()
        _serve(conn, registry)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - whatever happens, leave through os._exit
        with contextlib.suppress(Exception):
            log.error("pool_process_failed", error=repr(exc))
    finally:
        # os._exit skips the worker's atexit handlers, which belong to the worker, not to us;
        # flush what the tasks printed first.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _serve(conn: Connection, registry: TaskRegistry) -> None:
    """Run jobs from the pipe, one at a time, in this (the only, so main) thread."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        if message is None:
            return
        job, deadline = message
        conn.send(_run(job, registry, deadline))


def _run(job: Job, registry: TaskRegistry, deadline: float | None) -> Outcome:
    started = time.monotonic()
    try:
        return run_job(job, registry, deadline, soft_limit=True)
    except Exception as exc:  # noqa: BLE001 - a failing hook must still answer the worker
        return failure(job.key, exc, time.monotonic() - started)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGINT in a pool process: the worker decides when a task stops, not the sender.

    A Python handler rather than SIG_IGN, so programs the task executes start with the default.
    """


def _reset_signals() -> None:
    """Drop the worker's signal handlers, which mean nothing in a pool process."""
    for signum in signal.valid_signals():
        if signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _ignore)
        elif callable(signal.getsignal(signum)):
            signal.signal(signum, signal.SIG_DFL)


def _die_with(parent: int) -> None:
    """Have Linux kill this process when the worker dies, even in the middle of a task."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the worker died before the request was in place
